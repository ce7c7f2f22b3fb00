#!/usr/bin/env bash
# `make bench`: lexflow's preprocessing (read → FORMEX parse → Llama 3 tokenize) against the seed's Python pipeline
# (lxml + itertext + HF tokenizers) on the same corpus in the same run; 1 and 2 cores (taskset); the tokenizer alone
# against tiktoken (Meta's Llama 3 encoder, which has no FORMEX parser) on the same extracted texts, 1 core each;
# peak RSS (/usr/bin/time -v); token-id identity (lexflow's ids hash vs tiktoken's on lexflow's own texts); RSS
# flatness on a 10x generated corpus. Results go to stdout and $BENCH_OUT (default target/bench/).
#   BENCH_CORPUS=DIR      corpus (default ../shared/corpus/bench: 610 zstd consolidated acts, 140 MB raw)
#   BENCH_MAX_FILES=N     only the first N files (sorted), for a quick run
#   BENCH_SKIP_RSS=1      skip the gen-sample RSS flatness check
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
CORPUS="${BENCH_CORPUS:-../shared/corpus/bench}"
OUT="${BENCH_OUT:-$CARGO_TARGET_DIR/bench}"
mkdir -p "$OUT"
[ -d "$CORPUS" ] || { echo "bench: corpus $CORPUS missing" >&2; exit 1; }
[ -f "${LEXFLOW_LLAMA3_TIKTOKEN:-}" ] || { echo "bench: LEXFLOW_LLAMA3_TIKTOKEN missing (make setup)" >&2; exit 1; }
command -v taskset >/dev/null || { echo "bench: taskset missing (util-linux)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "bench: /usr/bin/time missing (apt-get install time)" >&2; exit 1; }

echo "== build (release)"
cargo build --release -q -p lexflow-actors --bin lexflow --example preprocess_bench
BIN="$CARGO_TARGET_DIR/release/examples/preprocess_bench"
LEXFLOW="$CARGO_TARGET_DIR/release/lexflow"

# lexflow's "llama3" as a tokenizer.json, for the Python pipeline (the same ids: tests/tokenizer_exact.rs).
"$LEXFLOW" tokenizer export --out "$OUT/llama3.tokenizer.json"
TOKENIZER_JSON="$OUT/llama3.tokenizer.json"

mapfile -t FILES < <(find "$CORPUS" -type f \( -name '*.xml' -o -name '*.xml.zst' \) | LC_ALL=C sort | head -n "${BENCH_MAX_FILES:-1000000}")
echo "== corpus: ${#FILES[@]} files from $CORPUS; $(nproc) cores; $(date -u +%Y-%m-%dT%H:%MZ)"

# run NAME CPUS CMD...: JSON result to $OUT/NAME.json, peak RSS (kB) to $OUT/NAME.rss
run() {
  local name=$1 cpus=$2; shift 2
  /usr/bin/time -v -o "$OUT/$name.time" taskset -c "$cpus" "$@" > "$OUT/$name.json"
  awk -F': ' '/Maximum resident set size/ {print $2}' "$OUT/$name.time" > "$OUT/$name.rss"
  echo "   $name: $(cat "$OUT/$name.json") peak_rss_kb=$(cat "$OUT/$name.rss")"
}

echo "== python reference (1 core)"
RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false run python 0 python bench/reference_pipeline.py "$TOKENIZER_JSON" "${FILES[@]}"
echo "== lexflow (1 core, 2 cores)"
run lexflow1 0 "$BIN" --threads 1 "${FILES[@]}"
if [ "$(nproc)" -ge 2 ]; then run lexflow2 0,1 "$BIN" --threads 2 "${FILES[@]}"; fi

echo "== tokenizer alone on lexflow's extracted texts (1 core): lexflow vs tiktoken; token-id identity"
"$BIN" --threads "$(nproc)" --dump-texts "$OUT/texts.jsonl" "${FILES[@]}" > "$OUT/ident.json"
run tok_lexflow 0 "$BIN" --threads 1 --texts "$OUT/texts.jsonl"
run tok_tiktoken 0 python scripts/tokenize_ref.py tiktoken-hash "$LEXFLOW_LLAMA3_TIKTOKEN" < "$OUT/texts.jsonl"
rm -f "$OUT/texts.jsonl"

RSS_SMALL="" ; RSS_BIG=""
if [ "${BENCH_SKIP_RSS:-0}" != 1 ]; then
  echo "== RSS flatness: gen-sample corpus 1x vs 10x"
  rm -rf "$OUT/gen1" "$OUT/gen10"
  "$LEXFLOW" gen-sample "$OUT/gen1" --acts-per-language 20 > /dev/null
  "$LEXFLOW" gen-sample "$OUT/gen10" --acts-per-language 200 > /dev/null
  run gen1 0 "$BIN" --threads 1 "$OUT/gen1"
  run gen10 0 "$BIN" --threads 1 "$OUT/gen10"
  RSS_SMALL=gen1; RSS_BIG=gen10
fi

python - "$OUT" "$RSS_SMALL" "$RSS_BIG" <<'PY'
import json, os, sys
out, small, big = sys.argv[1], sys.argv[2], sys.argv[3]
def j(n):
    p = os.path.join(out, n + ".json")
    return json.load(open(p)) if os.path.exists(p) else None
def rss(n):
    return int(open(os.path.join(out, n + ".rss")).read().strip()) / 1024
py, l1, l2 = j("python"), j("lexflow1"), j("lexflow2")
print("\n== summary")
print(f"{'run':<22}{'cores':>6}{'files':>7}{'tokens':>12}{'seconds':>9}{'tokens/s/core':>15}{'files/s/core':>14}{'vs python':>11}{'peak RSS MB':>13}")
base = py["tokens"] / py["seconds"]
for name, r, cores in [("python lxml+HF", py, 1), ("lexflow", l1, 1), ("lexflow", l2, 2)]:
    if r is None:
        continue
    tps = r["tokens"] / r["seconds"] / cores
    fps = r["files"] / r["seconds"] / cores
    print(f"{name:<22}{cores:>6}{r['files']:>7}{r['tokens']:>12}{r['seconds']:>9.2f}{tps:>15,.0f}{fps:>14.1f}{tps / base:>10.1f}x{rss('python' if r is py else ('lexflow1' if cores == 1 else 'lexflow2')):>13.1f}")
tl, tt = j("tok_lexflow"), j("tok_tiktoken")
print(f"\ntokenizer alone, 1 core, {tl['docs']} texts, {tl['text_bytes'] / 1e6:.1f} MB:")
print(f"  lexflow  {tl['tokens_per_s']:>12,.0f} tokens/s  ({tl['seconds']:.2f} s, load {tl['tokenizer_load_s']:.2f} s not counted)")
print(f"  tiktoken {tt['tokens_per_s']:>12,.0f} tokens/s  ({tt['seconds']:.2f} s)")
print(f"  lexflow / tiktoken: {tl['tokens_per_s'] / tt['tokens_per_s']:.2f}x tokenize only; "
      f"{l1['tokens'] / l1['seconds'] / tt['tokens_per_s']:.2f}x lexflow parse + tokenize (1 core) vs tiktoken tokenize only")
a, b = j("ident"), tt
same = a["ids_hash"] == b["ids_hash"] and a["tokens"] == b["tokens"] and a["docs"] == b["docs"]
same_tok = tl["ids_hash"] == b["ids_hash"]
print(f"\ntoken ids: lexflow docs={a['docs']} tokens={a['tokens']} hash={a['ids_hash'][:16]}  tiktoken docs={b['docs']} tokens={b['tokens']} hash={b['ids_hash'][:16]}  -> {'IDENTICAL' if same and same_tok else 'DIFFERENT'}")
same = same and same_tok
if small:
    s, g = j(small), j(big)
    print(f"RSS flatness: {s['text_bytes']/1e6:.1f} MB text -> {rss(small):.1f} MB peak; {g['text_bytes']/1e6:.1f} MB text -> {rss(big):.1f} MB peak (ratio {rss(big)/rss(small):.2f} for {g['text_bytes']/max(s['text_bytes'],1):.1f}x input)")
if not same:
    sys.exit(1)
PY
