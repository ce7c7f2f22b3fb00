#!/usr/bin/env bash
# GPU check for lexflow-gpu, to run on a CUDA machine (H100/H200): a few bf16 training steps on cuda:0 at world size 1
# with the gradient all-reduce through NCCL (cudarc), after fp32 CPU-vs-GPU logit comparisons (causal, document mask,
# per-document flash segments) and a bf16 segments-vs-mask comparison on the GPU. Prints "GPU CHECK OK" on success.
#
#   scripts/gpu_check.sh [preset=125m] [steps=20] [seq_len=1024] [micro_batch=4]
#
# Two ways to run:
# * with cargo (dev machine with a GPU): builds `gpu_step` with `--features cuda`, runs it, then the unit tests;
# * without cargo (the lent GPU machine, one command; bench/gpu/run.sh calls this): runs the prebuilt binary
#   $GPU_STEP_BIN (default bench/gpu/bin/gpu_step) against the system python's torch (libtorch) and NCCL wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v cargo >/dev/null && [ -f scripts/env.sh ]; then source scripts/env.sh; fi
PY=${PYTHON:-$(command -v python3 || command -v python)}

# libtorch from the python torch; cudarc dlopens `libnccl.so` but the wheel ships only `libnccl.so.2`: symlink it.
torch_dir="$("$PY" -c 'import torch,os;print(os.path.dirname(torch.__file__))')"
site="$(dirname "$torch_dir")"
nccl_dir="$site/nvidia/nccl/lib"
shim="$(mktemp -d /tmp/lexflow-nccl-shim.XXXX)"
trap 'rm -rf "$shim"' EXIT
if [ -e "$nccl_dir/libnccl.so.2" ]; then
  ln -sf "$nccl_dir/libnccl.so.2" "$shim/libnccl.so"
  export LD_LIBRARY_PATH="$shim:$nccl_dir:$torch_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
  echo "warning: $nccl_dir/libnccl.so.2 not found; relying on the system libnccl.so" >&2
  export LD_LIBRARY_PATH="$torch_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
for d in "$site"/nvidia/*/lib; do export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"; done

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT="${MASTER_PORT:-29533}"
bin="${GPU_STEP_BIN:-bench/gpu/bin/gpu_step}"
built=0
if [ ! -x "$bin" ]; then
  command -v cargo >/dev/null || { echo "no $bin and no cargo to build it" >&2; exit 1; }
  cargo build --release -p lexflow-gpu --features cuda --example gpu_step
  bin="$CARGO_TARGET_DIR/release/examples/gpu_step"
  built=1
fi
"$bin" "${1:-125m}" "${2:-20}" "${3:-1024}" "${4:-4}"
# The gpu crate's unit tests with CUDA, including the GPU-only ones (#[ignore]d elsewhere: the NCCL collectives at
# world size 1 on cuda:0). Prebuilt by bench/gpu/build.sh, or built here with cargo.
tests_bin="${GPU_TESTS_BIN:-bench/gpu/bin/lexflow_gpu_tests}"
# --quiet: one line of dots, then (on a failure) each failing test's output and the summary: the tail keeps the panic
# messages, which a tail of the per-test lines would cut off.
if [ "$built" = 1 ]; then
  cargo test --release -p lexflow-gpu --features cuda --lib -- --include-ignored --quiet 2>&1 | tail -40
elif [ -x "$tests_bin" ]; then
  "$tests_bin" --include-ignored --quiet 2>&1 | tail -40
else
  echo "warning: no $tests_bin: the GPU unit tests did not run" >&2
fi
