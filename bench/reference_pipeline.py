#!/usr/bin/env python3
"""The seed's preprocessing, as the baseline for `make bench`: for every FORMEX file (decompressing .zst), an lxml
parse, itertext-style text extraction, and a Hugging Face `tokenizers` encode of the text with the Llama 3 tokenizer
(no special tokens), one document at a time on one thread. Prints one JSON line:
{"files", "docs", "input_bytes", "text_bytes", "tokens", "seconds", "tokens_per_s", "mb_per_s"}.

  RAYON_NUM_THREADS=1 taskset -c 0 python bench/reference_pipeline.py TOKENIZER_JSON PATH...
"""
import json
import os
import sys
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import zstandard  # noqa: E402
from lxml import etree  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402


def files_of(paths):
    out = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in os.walk(p):
                out += [os.path.join(root, n) for n in names if n.endswith((".xml", ".xml.zst"))]
        else:
            out.append(p)
    return sorted(out)


def main():
    tok = Tokenizer.from_file(sys.argv[1])
    files = files_of(sys.argv[2:])
    dctx = zstandard.ZstdDecompressor()
    parser = etree.XMLParser(resolve_entities=False, huge_tree=True)
    docs = tokens = input_bytes = text_bytes = 0
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            raw = fh.read()
        if f.endswith(".zst"):
            raw = dctx.decompressobj().decompress(raw)
        input_bytes += len(raw)
        root = etree.fromstring(raw, parser)
        text = "".join(root.itertext())
        if not text:
            continue
        text_bytes += len(text.encode("utf-8"))
        tokens += len(tok.encode(text, add_special_tokens=False).ids)
        docs += 1
    secs = time.perf_counter() - t0
    print(json.dumps({
        "files": len(files), "docs": docs, "input_bytes": input_bytes, "text_bytes": text_bytes, "tokens": tokens,
        "seconds": round(secs, 3), "tokens_per_s": round(tokens / secs), "mb_per_s": round(input_bytes / secs / 1e6, 3),
    }))


if __name__ == "__main__":
    main()
