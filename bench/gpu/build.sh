#!/usr/bin/env bash
# Builds what bench/gpu/run.sh carries to the GPU machine (which has no cargo): release binaries with `--features
# cuda`, stripped, into bench/gpu/bin/ (git-ignored), and the Llama 3 tokenizer.json into bench/gpu/. Run here, then
# hand `bench/gpu/bin` and `bench/gpu/tokenizer.json` to the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
cargo build --release --features cuda -p lexflow-gpu --example gpu_step
cargo build --release --features cuda -p lexflow-actors --bin lexflow --example train_synthetic
mkdir -p bench/gpu/bin
for f in bin:lexflow example:train_synthetic example:gpu_step; do
  kind=${f%%:*} name=${f#*:}
  src=$CARGO_TARGET_DIR/release/$name
  [ "$kind" = example ] && src=$CARGO_TARGET_DIR/release/examples/$name
  strip -o "bench/gpu/bin/$name" "$src"
done
cp "$LEXFLOW_TOKENIZER_JSON" bench/gpu/tokenizer.json
ls -la bench/gpu/bin bench/gpu/tokenizer.json
