#!/usr/bin/env bash
# GPU check for lexflow-gpu, to run on a CUDA machine (H100/H200): builds with `--features cuda` and runs a few bf16
# training steps on cuda:0 at world size 1 with the gradient all-reduce through NCCL (cudarc), after an fp32
# CPU-vs-GPU logit comparison (causal and document-masked). Prints "GPU CHECK OK" on success.
#
#   scripts/gpu_check.sh [preset=125m] [steps=20] [seq_len=1024] [micro_batch=4]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

# cudarc dlopens `libnccl.so`; the PyPI wheel ships only `libnccl.so.2`: provide the symlink.
site="$(python -c 'import site; print(site.getsitepackages()[0])')"
nccl_dir="$site/nvidia/nccl/lib"
shim="$LEXFLOW_CACHE/nccl-shim"
mkdir -p "$shim"
if [ -e "$nccl_dir/libnccl.so.2" ]; then
  ln -sf "$nccl_dir/libnccl.so.2" "$shim/libnccl.so"
  export LD_LIBRARY_PATH="$shim:$nccl_dir:$LD_LIBRARY_PATH"
else
  echo "warning: $nccl_dir/libnccl.so.2 not found; relying on the system libnccl.so" >&2
fi
for d in "$site"/nvidia/*/lib; do export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"; done

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT="${MASTER_PORT:-29533}"
cargo build --release -p lexflow-gpu --features cuda --example gpu_step
"$CARGO_TARGET_DIR/release/examples/gpu_step" "${1:-125m}" "${2:-20}" "${3:-1024}" "${4:-4}"
# The same unit tests on this machine (CPU path; the model tests also cover the mask and GQA kernels).
cargo test --release -p lexflow-gpu --features cuda 2>&1 | tail -3
