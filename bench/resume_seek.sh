#!/usr/bin/env bash
# Resume cost early vs late in a corpus: train to step E (early) and to step L (late), then time `lexflow run --resume`
# for one more step from each checkpoint. With seek-based resume both take about the same time; a loader that replays
# the stream from the start would take longer the later the checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
BIN="$CARGO_TARGET_DIR/debug/lexflow"
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
"$BIN" gen-sample "$W/corpus" --acts-per-language "${ACTS:-120}" > /dev/null
# A small BPE keeps the tiny model's training cheap, so the late checkpoint is deep into the corpus.
"$BIN" tokenizer train --vocab-size 2000 --out "$W/tok.json" "$W/corpus" > /dev/null 2>&1
cfg() { # dir steps
cat > "$W/$1.toml" <<TOML
[run]
name = "seek"
dir = "$W/$1"
[input]
paths = ["$W/corpus"]
[tokenizer]
path = "$W/tok.json"
[packer]
eot_token = "<|end_of_text|>"
pad_token = "<|end_of_text|>"
seq_len = 256
mode = "best-fit"
[train]
devices = ["cpu"]
model = "tiny"
micro_batch = 8
steps = $2
checkpoint_every = $2
[metrics]
enabled = false
TOML
}
E=${EARLY:-2}; L=${LATE:-120}
for pair in "early $E" "late $L"; do
  set -- $pair
  cfg "$1" "$2"; "$BIN" run "$W/$1.toml" --quiet 2> /dev/null > /dev/null
  cfg "$1" "$(( $2 + 1 ))"
  t0=$(date +%s.%N); "$BIN" run "$W/$1.toml" --resume --quiet 2> "$W/$1.log" > /dev/null; t1=$(date +%s.%N)
  consumed=$(python3 -c "import json,glob;print(json.load(open(sorted(glob.glob('$W/$1/checkpoints/step-*/trainer_state.json'))[0]))['sequences_consumed'])")
  printf "%-6s resume from step %-4s (%s sequences already consumed): one more step took %.2f s\n" "$1" "$2" "$consumed" "$(echo "$t1 - $t0" | bc)"
done
