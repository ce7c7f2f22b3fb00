"""External check of lexflow's deduplication: datasketch MinHash + MinHashLSH on the same texts.

Input: `lexflow dedup CONFIG --texts --out F.jsonl` (first line: the MinHash parameters; then one line per
document in lane order, with lexflow's verdict and, in near mode, its MinHash values).
The reference decides with the same streaming rule — per language, in order: a document whose text equals a kept
one's is an exact duplicate; else one that shares an LSH band with a kept one (datasketch MinHashLSH.query) is a
near duplicate; else it is kept and inserted — and with datasketch's MinHash ("legacy" scheme: (a*h + b) mod
(2^61 - 1), low 32 bits) fed lexflow's shingles (lower-cased text, split on Unicode white space, n words joined by
one space) hashed with xxh3-64 (low 32 bits), and the permutations lexflow drew; a band match counts only when
MinHash.jaccard reaches dedup.threshold, and the document repeated is the earliest such one.

Prints a JSON summary; exits 1 on any difference (MinHash values or verdicts).
Usage: python scripts/dedup_ref.py F.jsonl
"""

import hashlib
import json
import re
import sys

import numpy as np
import xxhash
from datasketch import MinHash, MinHashLSH

# Rust's char::is_whitespace (Unicode White_Space), which str.split() does not match exactly (it also splits on
# U+001C..U+001F).
WS = re.compile(
    "[\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+"
)


def shingles(text, n):
    words = [w for w in WS.split(text.lower()) if w]
    if not words:
        return []
    n = min(n, len(words))
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


def h32(b):
    return xxhash.xxh3_64_intdigest(b) & 0xFFFFFFFF


def main(path):
    with open(path, encoding="utf-8") as f:
        head = json.loads(f.readline())["minhash"]
        docs = [json.loads(line) for line in f]
    near = head["mode"] == "near"
    bands, rows, n, threshold = head["bands"], head["rows"], head["ngram"], head["threshold"]
    perms = (np.array(head["a"], dtype=np.uint64), np.array(head["b"], dtype=np.uint64))
    if head["held_out_documents"]:
        sys.exit("the reference does not model held-out documents: audit a config without them")
    exact_seen = {}
    lsh = {}
    kept_minhash = {}
    mismatches = []
    counts = {}
    minhash_checked = 0
    for i, d in enumerate(docs):
        lang = d["lang"]
        key = hashlib.sha256(d["text"].encode("utf-8")).digest()
        verdict = None
        m = None
        if key in exact_seen.setdefault(lang, set()):
            verdict = "exact"
        elif near and not d.get("qa"):
            sh = shingles(d["text"], n)
            if sh:
                m = MinHash(
                    num_perm=bands * rows, hashfunc=h32, permutations=perms, scheme="legacy"
                )
                m.update_batch([s.encode("utf-8") for s in sh])
                if "minhash" in d:
                    minhash_checked += 1
                    if [int(v) for v in m.hashvalues] != d["minhash"]:
                        mismatches.append({"doc": i, "path": d["path"], "what": "minhash values"})
                index = lsh.setdefault(
                    lang, MinHashLSH(num_perm=bands * rows, params=(bands, rows))
                )
                # Candidates share a band; a duplicate is one whose estimated Jaccard reaches the threshold.
                similar = [int(c) for c in index.query(m) if m.jaccard(kept_minhash[c]) >= threshold]
                if similar:
                    verdict = "near"
                    of = docs[min(similar)]
                    if (of["path"], of["ordinal"]) != (d["of_path"], d["of_ordinal"]):
                        mismatches.append({"doc": i, "path": d["path"], "what": "of", "lexflow": [d["of_path"], d["of_ordinal"]], "datasketch": [of["path"], of["ordinal"]]})
        if verdict is None:
            verdict = "kept"
            exact_seen[lang].add(key)
            if m is not None:
                lsh[lang].insert(str(i), m)
                kept_minhash[str(i)] = m
        counts[verdict] = counts.get(verdict, 0) + 1
        if verdict != d["verdict"]:
            mismatches.append(
                {"doc": i, "path": d["path"], "ordinal": d["ordinal"], "lexflow": d["verdict"], "datasketch": verdict}
            )
    print(
        json.dumps(
            {
                "documents": len(docs),
                "counts": counts,
                "minhash_checked": minhash_checked,
                "mismatches": mismatches[:20],
                "mismatch_count": len(mismatches),
            }
        )
    )
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main(sys.argv[1])
