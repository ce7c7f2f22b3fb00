#!/usr/bin/env python3
"""Reference tokenization with Python `tokenizers` (used by tests/tokenizer_exact.rs and bench/run.sh).

  tokenize_ref.py extract [--max-files N] PATH...   JSON list of {"path", "text"}: a crude tag strip of FORMEX files
                                                    (.zst decompressed), independent of lexflow's FORMEX parser
  tokenize_ref.py encode TOKENIZER_JSON             stdin: JSON list of strings; stdout: JSON list of id lists
                                                    (add_special_tokens=False)
  tokenize_ref.py encode-text TOKENIZER_JSON        the same with special-token text encoded as ordinary text
                                                    (encode_special_tokens=True: how lexflow encodes documents)
  tokenize_ref.py hash TOKENIZER_JSON               stdin: JSONL of {"text"}; stdout: {"docs","tokens","ids_hash"}, the ids
                                                    hash of actors/examples/preprocess_bench.rs
"""
import hashlib
import html
import json
import os
import re
import struct
import sys

TAG = re.compile(r"<[^>]*>")


def read_xml(path):
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    return raw.decode("utf-8")


def crude_text(xml):
    return html.unescape(TAG.sub(" ", xml))


def files_of(paths):
    out = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in os.walk(p):
                out += [os.path.join(root, n) for n in names if n.endswith((".xml", ".xml.zst"))]
        else:
            out.append(p)
    return sorted(out)


def load(tokenizer_json):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(tokenizer_json)


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd = argv[1]
    if cmd == "extract":
        args = argv[2:]
        max_files = None
        if args[:1] == ["--max-files"]:
            max_files = int(args[1])
            args = args[2:]
        files = files_of(args)[:max_files]
        json.dump([{"path": f, "text": crude_text(read_xml(f))} for f in files], sys.stdout, ensure_ascii=False)
        return 0
    if cmd in ("encode", "encode-text"):
        tok = load(argv[2])
        # encode-text: special-token text is ordinary text (lexflow's encode_text, for documents)
        tok.encode_special_tokens = cmd == "encode-text"
        texts = json.load(sys.stdin)
        encs = tok.encode_batch(texts, add_special_tokens=False)
        json.dump([e.ids for e in encs], sys.stdout)
        return 0
    if cmd == "hash":
        # Same definition as actors/examples/preprocess_bench.rs: sha256 over sha256(ids LE u32) per document.
        tok = load(argv[2])
        h = hashlib.sha256()
        docs = tokens = 0

        def flush(batch):
            nonlocal docs, tokens
            for e in tok.encode_batch(batch, add_special_tokens=False):
                ids = e.ids
                h.update(hashlib.sha256(struct.pack(f"<{len(ids)}I", *ids)).digest())
                docs += 1
                tokens += len(ids)

        batch = []
        for line in sys.stdin:
            if line.strip():
                batch.append(json.loads(line)["text"])
            if len(batch) >= 64:
                flush(batch)
                batch = []
        flush(batch)
        print(json.dumps({"docs": docs, "tokens": tokens, "ids_hash": h.hexdigest()}))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
