#!/usr/bin/env bash
# Cost of `[dedup]`, measured against the rest of preprocessing in the same run (docs/DEDUP.md):
#  1. dedup_bench, one core: parse, tokenize, exact keys, near keys (MinHash), decisions over the same documents;
#  2. `lexflow run` without training on the same corpus (EN + FR lanes, 2 reader and 2 tokenizer threads per lane),
#     dedup off vs exact vs near: wall time, tokens/s, peak RSS;
#  3. `lexflow dedup` (the audit) in near mode: wall time and peak RSS.
#   BENCH_CORPUS=DIR   corpus (default ../shared/corpus/bench: 610 zstd consolidated acts, EN + FR, 140 MB raw)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
CORPUS="$(realpath "${BENCH_CORPUS:-../shared/corpus/bench}")"
OUT="${BENCH_OUT:-$CARGO_TARGET_DIR/bench/dedup}"
mkdir -p "$OUT"
[ -x /usr/bin/time ] || { echo "bench: /usr/bin/time missing (apt-get install time)" >&2; exit 1; }
cargo build --release -q -p lexflow-actors --bin lexflow --example dedup_bench
BIN="$CARGO_TARGET_DIR/release/lexflow"
echo "== $(nproc) cores; corpus $CORPUS; $(date -u +%Y-%m-%dT%H:%MZ)"

echo "== 1. stages on one core (same documents, same run)"
taskset -c 0 "$CARGO_TARGET_DIR/release/examples/dedup_bench" "$CORPUS" | tee "$OUT/stages.json"

config() { # MODE
  cat > "$OUT/run-$1.toml" <<EOF
[run]
name = "dedup-bench-$1"
dir = "$OUT/run-$1"
[input]
paths = ["$CORPUS"]
[reader]
threads = 2
[tokenizer]
threads = 2
[sampler]
mix = { en = 0.5, fr = 0.5 }
on_exhausted = "renormalize"
[shards]
ranks = 1
[dedup]
mode = "$1"
[metrics]
enabled = false
EOF
}

echo "== 2. lexflow run without training: dedup off / exact / near"
for mode in off exact near; do
  config $mode
  rm -rf "$OUT/run-$mode"
  /usr/bin/time -v -o "$OUT/run-$mode.time" "$BIN" run "$OUT/run-$mode.toml" --quiet > /dev/null 2> "$OUT/run-$mode.log"
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = {}
for mode in ["off", "exact", "near"]:
    s = json.load(open(f"{out}/run-{mode}/stats.json"))
    rss = next(int(l.split(":")[1]) for l in open(f"{out}/run-{mode}.time") if "Maximum resident" in l)
    d = s.get("dedup") or {}
    dropped = sum(v["documents"] - v["kept"] for v in d.get("per_lang", {}).values())
    rows[mode] = (s["elapsed_seconds"], s["input"]["tokens"], s["input"]["documents"], dropped, rss / 1024)
base = rows["off"][0]
print("| dedup | seconds | tokens | documents read | dropped | peak RSS MB | time vs off |")
print("|---|---|---|---|---|---|---|")
for m, (sec, tok, docs, dr, rss) in rows.items():
    print(f"| {m} | {sec:.2f} | {tok:,} | {docs:,} | {dr:,} | {rss:.1f} | {sec / base:.3f}× |")
PY

echo "== 3. lexflow dedup (audit, near)"
/usr/bin/time -v -o "$OUT/audit.time" "$BIN" dedup "$OUT/run-near.toml" --out "$OUT/audit.jsonl" > "$OUT/audit.json"
echo "   seconds $(awk -F': ' '/Elapsed/ {print $2}' "$OUT/audit.time"), peak RSS $(awk -F': ' '/Maximum resident/ {print $2}' "$OUT/audit.time") kB"
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('   index keys', r['index_keys'], 'dropped', {l: v['documents']-v['kept'] for l, v in r['per_lang'].items()})" "$OUT/audit.json"
