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
# The gpu crate's unit tests with CUDA (the NCCL world-of-one test is #[ignore]d without a GPU: gpu_check.sh runs it).
tests_bin=$(cargo test --release --features cuda -p lexflow-gpu --lib --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "lexflow_gpu":
        print(m["executable"])' | tail -1)
[ -n "$tests_bin" ] || { echo "could not find the lexflow-gpu unit test binary" >&2; exit 1; }
strip -o bench/gpu/bin/lexflow_gpu_tests "$tests_bin"
# lexflow's "llama3" (Meta's tokenizer.model, embedded) as a tokenizer.json, for the Python reference side.
bench/gpu/bin/lexflow tokenizer export --out bench/gpu/tokenizer.json
ls -la bench/gpu/bin bench/gpu/tokenizer.json
