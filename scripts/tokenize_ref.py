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

Meta's Llama 3 tokenizer, with tiktoken (the referee of lexflow's `tokenizer.path = "llama3"`); MODEL is its
tokenizer.model (base64 token, rank per line), the split pattern and the 256 special tokens are Llama 3.1's:
  tokenize_ref.py tiktoken-encode MODEL             stdin: JSON list of strings; stdout: JSON list of id lists
                                                    (special-token text becomes the special id: allowed_special="all")
  tokenize_ref.py tiktoken-encode-text MODEL        the same with encode_ordinary (special-token text is ordinary text)
  tokenize_ref.py tiktoken-hash MODEL               stdin: JSONL of {"text"}; stdout: {"docs","tokens","ids_hash","seconds"}
                                                    with encode_ordinary, one thread; seconds = encoding time only
  tokenize_ref.py convert MODEL OUT_JSON            transformers' TikTokenConverter: the Hugging Face tokenizer.json of
                                                    MODEL, as the official Llama 3.x tokenizer.json is made
  tokenize_ref.py unreachable MODEL                 JSON list of the ranks no merge of two tokens can produce
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


LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def llama3_specials():
    """Llama 3.1's special tokens (Meta-Llama-3.1's tokenizer.json), ids 128000..128255."""
    names = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    names += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(names))]
    return {n: 128000 + i for i, n in enumerate(names)}


def tiktoken_encoding(model):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(model)
    return tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=llama3_specials())


def ids_hash(ids_lists):
    h = hashlib.sha256()
    docs = tokens = 0
    for ids in ids_lists:
        h.update(hashlib.sha256(struct.pack(f"<{len(ids)}I", *ids)).digest())
        docs += 1
        tokens += len(ids)
    return {"docs": docs, "tokens": tokens, "ids_hash": h.hexdigest()}


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
    if cmd in ("tiktoken-encode", "tiktoken-encode-text"):
        enc = tiktoken_encoding(argv[2])
        texts = json.load(sys.stdin)
        if cmd == "tiktoken-encode":
            out = [enc.encode(t, allowed_special="all") for t in texts]
        else:
            out = [enc.encode_ordinary(t) for t in texts]
        json.dump(out, sys.stdout)
        return 0
    if cmd == "tiktoken-hash":
        import time

        enc = tiktoken_encoding(argv[2])
        texts = [json.loads(line)["text"] for line in sys.stdin if line.strip()]
        t0 = time.perf_counter()
        ids = [enc.encode_ordinary(t) for t in texts]
        seconds = time.perf_counter() - t0
        r = ids_hash(ids)
        r["seconds"] = round(seconds, 3)
        r["tokens_per_s"] = round(r["tokens"] / seconds)
        print(json.dumps(r))
        return 0
    if cmd == "convert":
        from transformers.convert_slow_tokenizer import TikTokenConverter

        specials = sorted(llama3_specials().items(), key=lambda kv: kv[1])
        conv = TikTokenConverter(argv[2], extra_special_tokens=[n for n, _ in specials]).converted()
        conv.save(argv[3])
        return 0
    if cmd == "unreachable":
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(argv[2])

        def merged(tok):
            # tiktoken's byte-pair merge of `tok`'s bytes, without its whole-piece shortcut
            parts = [tok[i : i + 1] for i in range(len(tok))]
            while len(parts) > 1:
                best = None
                for i in range(len(parts) - 1):
                    r = ranks.get(parts[i] + parts[i + 1])
                    if r is not None and (best is None or r < best[0]):
                        best = (r, i)
                if best is None:
                    break
                i = best[1]
                parts[i : i + 2] = [parts[i] + parts[i + 1]]
            return parts

        json.dump([r for tok, r in ranks.items() if len(tok) > 1 and merged(tok) != [tok]], sys.stdout)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
