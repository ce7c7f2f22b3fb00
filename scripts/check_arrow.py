#!/usr/bin/env python3
"""Reads every lexflow Arrow tee file (`shard-*.arrow`) in a directory with pyarrow and prints one JSON object:

    {"files": {"shard-00000.arrow": {"metadata": {...}, "schema": [...], "num_batches": N, "bytes": N,
                                     "uncompressed_bytes": N,
                                     "rows": [{"index": ..., "shard": ..., "tokens": [...], "doc_starts": [...],
                                               "padding": ..., "pieces": [{"lane": ..., ...}]}]}}}

Used by tests/arrow_pyarrow.rs to check the Rust writer against an independent reader. Exits non-zero on any error.
"""
import json
import pathlib
import sys

import pyarrow as pa
import pyarrow.ipc as ipc


def uncompressed_size(table, schema):
    """Size of the same table written by pyarrow as an uncompressed IPC file (to show the original is compressed)."""
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, schema, options=ipc.IpcWriteOptions(compression=None)) as w:
        w.write_table(table)
    return sink.getvalue().size


def main():
    if len(sys.argv) != 2:
        print("usage: check_arrow.py DIR", file=sys.stderr)
        return 2
    d = pathlib.Path(sys.argv[1])
    files = sorted(d.glob("shard-*.arrow"))
    if not files:
        print(f"no shard-*.arrow files in {d}", file=sys.stderr)
        return 1
    result = {"pyarrow": pa.__version__, "files": {}}
    for f in files:
        with pa.OSFile(str(f), "rb") as src:
            r = ipc.open_file(src)
            schema = r.schema
            table = r.read_all()
            nb = r.num_record_batches
        meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
        result["files"][f.name] = {
            "metadata": meta,
            "schema": [[fld.name, str(fld.type), fld.nullable] for fld in schema],
            "num_batches": nb,
            "bytes": f.stat().st_size,
            "uncompressed_bytes": uncompressed_size(table, schema),
            "rows": table.to_pylist(),
        }
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
