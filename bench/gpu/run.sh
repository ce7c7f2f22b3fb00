#!/usr/bin/env bash
# lexflow GPU benchmark: ONE command on a GPU machine (H100 80 GB), no cargo needed, < 9 minutes.
#
#   bash bench/gpu/run.sh            # from the repository root (a copy of it is fine)
#
# Expects (carried with the repo copy, git-ignored): bench/gpu/bin/{lexflow,train_synthetic,gpu_step} (release builds
# with `--features cuda`, stripped) and bench/gpu/tokenizer.json (the Llama 3 tokenizer). Uses the system python's
# torch (2.11) for libtorch, its NCCL wheel for cudarc (`libnccl.so` symlink in a temp dir) and for part (c).
#
# Stages, each under its own time limit, each printing its result as soon as it has one (a global timeout still
# leaves numbers), all written to $OUT (default /tmp/lexflow-gpu-bench-out):
#   peak      measured bf16 matmul peak (torch, 8k/16k squares)                          -> peak.json
#   check     scripts/gpu_check.sh: CPU-vs-GPU logits, per-document flash vs mask, a few bf16 steps with the
#             gradient all-reduce through NCCL (world size 1)                             -> gpu_check.log
#   (b)       lexflow trainer actor fed synthetic in-memory batches (train_synthetic)    -> synthetic.json
#   (b')      the same with BENCH_DOCS_PER_SEQ (5) documents per sequence: varlen flash attention
#                                                                                         -> synthetic_packed.json
#   (c)       PyTorch reference, eager                                                    -> torch_eager.json
#   profile   Kineto traces of two steps, lexflow (LEXFLOW_PROFILE_STEPS) and torch eager (torch.profiler),
#             compared kernel category by category by kernels.py                          -> kernels.txt
#   means     short (b)/(b') runs with one means switched off each: unfused AdamW, recomputation on, segments
#             instead of varlen                                                           -> means.txt
#   parity    50 steps, same initial weights (exported by lexflow as HF safetensors) and same tokens, lexflow vs
#             torch eager; the reference is trained twice (micro-batch 2 x 2 and 1 x 4: the same steps, other bf16
#             roundings) and lexflow must stay within 3x that noise floor (max and mean), step 1 within 1e-3
#                                                                                         -> parity.json
#   (a)       lexflow trainer fed by the full streaming dataflow (`lexflow run stream.toml`, generated corpus)
#                                                                                         -> stream.json
#   (c)       PyTorch reference, torch.compile (per-block)                               -> torch_compile.json
#   summary   the table with ratios                                                       -> summary.md
# At exit every file but run.log, summary.md and the traces is packed into $OUT/results.tar.gz (the device tool
# brings back 8 files at most; BENCH_PACK=0 keeps them loose).
# Model: `1b` preset (Llama 3.2 1B shapes, 1.236B params, tied embeddings), seq_len 4096, micro_batch 2 × grad_accum 8
# = 65,536 tokens per optimizer step, bf16 params + fp32 master AdamW; BENCH_WARMUP (5) untimed + BENCH_TIMED (20)
# timed steps per throughput run.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
T0=$(date +%s)
BUDGET=${BENCH_BUDGET_S:-525}
OUT=${OUT:-/tmp/lexflow-gpu-bench-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
WARMUP=${BENCH_WARMUP:-5}
TIMED=${BENCH_TIMED:-20}
STEPS=$((WARMUP + TIMED))
SEQ=${BENCH_SEQ_LEN:-4096}
MB=${BENCH_MICRO_BATCH:-2}
GA=${BENCH_GRAD_ACCUM:-8}
PARITY_STEPS=${BENCH_PARITY_STEPS:-50}
PARITY_SEQ=${BENCH_PARITY_SEQ_LEN:-1024}
# BENCH_DEVICE=cpu BENCH_MODEL=tiny (+ small BENCH_* sizes): a CPU dry run of the same stages and scripts, so the
# plumbing is checked without a GPU (tests/gpu_bench_dry_run.rs); the numbers of such a run mean nothing.
DEV=${BENCH_DEVICE:-cuda:0}
TDEV=${DEV%%:*}
MODEL=${BENCH_MODEL:-1b}
TOKENIZER=${BENCH_TOKENIZER:-$ROOT/bench/gpu/tokenizer.json}
BIN=${BENCH_BIN:-$ROOT/bench/gpu/bin}
PY=${PYTHON:-$(command -v python3 || command -v python)}
W=$(mktemp -d /tmp/lexflow-gpu-bench.XXXX)
export ROOT OUT WARMUP TIMED STEPS SEQ MB GA PARITY_STEPS PARITY_SEQ DEV TDEV MODEL TOKENIZER PY W
# Checkpoints of the 1B model are 17.5 GB (weights + fp32 master and moments): tmpfs when it has room.
CK=$W
if [ "$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2{print $4}')" -gt 45000000 ] 2>/dev/null; then CK=$(mktemp -d /dev/shm/lexflow-ck.XXXX); fi
export CK
# The device tool brings back at most 8 files from $OUT (16 MiB each, the rest is dropped): at exit (also after a failed
# stage) every file but run.log, summary.md and the two traces goes into $OUT/results.tar.gz (`tar xzf` it to read
# the JSON of each stage). BENCH_PACK=0 leaves them loose.
pack_out() {
  [ "${BENCH_PACK:-1}" = 0 ] && return 0
  local files
  files=$(cd "$OUT" && find . -maxdepth 1 -type f ! -name run.log ! -name summary.md ! -name results.tar.gz \
    ! -name 'trace_*.json.gz' -printf '%P\n' | sort)
  [ -n "$files" ] || return 0
  # shellcheck disable=SC2086  # plain names (letters, digits, '.', '_', '-')
  (cd "$OUT" && tar czf results.tar.gz $files && rm -f $files)
}
trap 'kill $(jobs -p) 2>/dev/null; pack_out; rm -rf "$W" "$CK"' EXIT

# --- libraries: libtorch from the system torch, NCCL from its wheel (cudarc wants `libnccl.so`) -----------------
TORCH_DIR=$("$PY" -c 'import torch,os;print(os.path.dirname(torch.__file__))')
SITE=$(dirname "$TORCH_DIR")
NCCL_DIR=$("$PY" -c 'import nvidia.nccl,os;print(os.path.join(list(nvidia.nccl.__path__)[0],"lib"))' 2>/dev/null || echo "$SITE/nvidia/nccl/lib")
mkdir -p "$W/nccl-shim"
[ -e "$NCCL_DIR/libnccl.so.2" ] && ln -sf "$NCCL_DIR/libnccl.so.2" "$W/nccl-shim/libnccl.so"
LD_LIBRARY_PATH="$W/nccl-shim:$NCCL_DIR:$TORCH_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for d in "$SITE"/nvidia/*/lib; do LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"; done
export LD_LIBRARY_PATH
export GPU_STEP_BIN="$BIN/gpu_step" PYTHON="$PY"
# Carried binaries may arrive compressed (carry limit): *.xz next to the name.
for b in lexflow train_synthetic gpu_step lexflow_gpu_tests; do
  if [ ! -x "$BIN/$b" ] && [ -e "$BIN/$b.xz" ]; then
    mkdir -p "$W/bin"; "$PY" -c 'import lzma,sys;open(sys.argv[2],"wb").write(lzma.open(sys.argv[1]).read())' "$BIN/$b.xz" "$W/bin/$b"
    chmod +x "$W/bin/$b"
  fi
done
[ -d "$W/bin" ] && { for b in "$BIN"/*; do [ -x "$b" ] && [ ! -e "$W/bin/$(basename "$b")" ] && ln -s "$b" "$W/bin/"; done; BIN=$W/bin; export GPU_STEP_BIN="$BIN/gpu_step"; }
# scripts/gpu_check.sh (stage check) runs the gpu crate's unit tests from here (a decompressed copy included).
export BIN GPU_TESTS_BIN="$BIN/lexflow_gpu_tests"

elapsed() { echo $(( $(date +%s) - T0 )); }
# stage NAME LIMIT_S CMD...: runs CMD under min(LIMIT, remaining budget), logs GPU memory, prints rc and time.
stage() {
  local name=$1 limit=$2; shift 2
  # BENCH_STAGES="peak stream" runs only those stages.
  if [ -n "${BENCH_STAGES:-}" ] && [[ " $BENCH_STAGES " != *" $name "* ]]; then echo "=== [$name] not selected"; return 0; fi
  local left=$(( BUDGET - $(elapsed) - 15 ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "=== [$name] SKIPPED: budget spent ($(elapsed)s)"; return 124; fi
  echo "=== [$name] start at $(elapsed)s, limit ${limit}s"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/mem_$name.txt" 2>/dev/null &
  local smi=$!
  local t=$(date +%s)
  if declare -F "$1" >/dev/null; then
    # A shell function (parity, stream): run it in a child bash so `timeout` can bound it.
    timeout -k 10 "$limit" bash -c "$(declare -f "$1"); set -o pipefail; $1"
  else
    timeout -k 10 "$limit" "$@"
  fi
  local rc=$?
  kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
  local mem; mem=$(sort -n "$OUT/mem_$name.txt" 2>/dev/null | tail -1)
  echo "=== [$name] rc=$rc in $(( $(date +%s) - t ))s (peak GPU memory used ${mem:-?} MiB; total elapsed $(elapsed)s)"
  "$PY" bench/gpu/summarize.py "$OUT" > /dev/null 2>&1 || true
  return $rc
}

echo "=== lexflow GPU bench: $(date -u +%FT%TZ) warmup=$WARMUP timed=$TIMED seq_len=$SEQ micro_batch=$MB grad_accum=$GA"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
"$PY" -c 'import torch;print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "(no GPU)")'
ls -la "$BIN"/ "$TOKENIZER" 2>&1 | sed 's/^/  /'
for b in lexflow train_synthetic gpu_step; do
  missing=$(ldd "$BIN/$b" 2>/dev/null | grep "not found"); [ -n "$missing" ] && echo "WARNING $b: $missing"
done

# --- peak ---------------------------------------------------------------------------------------------------------
stage peak 60 "$PY" bench/gpu/torch_ref.py peak --json "$OUT/peak.json"
BENCH_MATMUL_PEAK=$("$PY" -c 'import json,sys;print(json.load(open(sys.argv[1]))["flops"])' "$OUT/peak.json" 2>/dev/null || echo "")
export BENCH_MATMUL_PEAK

# --- GPU check (NCCL at world size 1) -------------------------------------------------------------------------------
stage check 120 bash scripts/gpu_check.sh 125m 8 1024 4 2>&1 | tee "$OUT/gpu_check.log" | grep -v "^step [3-7] "

# --- (b) lexflow trainer, synthetic in-memory batches ----------------------------------------------------------------
stage synthetic 170 "$BIN/train_synthetic" --device "$DEV" --model "$MODEL" --seq-len "$SEQ" --micro-batch "$MB" \
  --grad-accum "$GA" --steps "$STEPS" --warmup "$WARMUP" --run-dir "$CK/synthetic" --json "$OUT/synthetic.json"
rm -rf "$CK/synthetic"

# --- (b') the same with packed documents (varlen flash attention), as many per sequence as the stream has -----------
stage synthetic_packed 150 "$BIN/train_synthetic" --device "$DEV" --model "$MODEL" --seq-len "$SEQ" --micro-batch "$MB" \
  --grad-accum "$GA" --steps "$STEPS" --warmup "$WARMUP" --docs-per-seq "${BENCH_DOCS_PER_SEQ:-5}" \
  --run-dir "$CK/synthetic_packed" --json "$OUT/synthetic_packed.json"
rm -rf "$CK/synthetic_packed"

# --- (c) torch eager -------------------------------------------------------------------------------------------------
stage torch_eager 120 "$PY" bench/gpu/torch_ref.py perf --device "$TDEV" --model "$MODEL" --mode eager --seq-len "$SEQ" --micro-batch "$MB" \
  --grad-accum "$GA" --warmup "$WARMUP" --timed "$TIMED" --json "$OUT/torch_eager.json"

# --- profile: where the device time of a step goes, lexflow vs torch eager, kernel by kernel ------------------------
# Kineto traces of steps 4..5 on both sides (libtorch's profiler through the shim / torch.profiler), summarised by the
# same script: device ms per step by category (matmul, attention, loss, optimizer, elementwise, ...) and GPU idle share.
profile() {
  LEXFLOW_PROFILE_STEPS=4..5 "$BIN/train_synthetic" --device "$DEV" --model "$MODEL" --seq-len "$SEQ" --micro-batch "$MB" \
    --grad-accum "$GA" --steps 5 --warmup 3 --run-dir "$CK/profile" --json "$W/profile_lexflow.json" > /dev/null || return 1
  "$PY" bench/gpu/torch_ref.py perf --device "$TDEV" --model "$MODEL" --mode eager --seq-len "$SEQ" --micro-batch "$MB" --grad-accum "$GA" --warmup 3 \
    --timed 2 --profile-steps 4..5 --trace "$W/torch_trace.json" --json "$W/profile_torch.json" > /dev/null || return 1
  "$PY" bench/gpu/kernels.py lexflow="$CK/profile/profile/trace-rank0.json" torch="$W/torch_trace.json" --steps 2 \
    --top 25 --json "$OUT/kernels.json" | tee "$OUT/kernels.txt"
  gzip -c "$CK/profile/profile/trace-rank0.json" > "$OUT/trace_lexflow.json.gz"
  gzip -c "$W/torch_trace.json" > "$OUT/trace_torch.json.gz"
  rm -rf "$CK/profile"
}
stage profile 200 profile

# --- means: each of lexflow's means switched off in turn (issue: "measure each") -----------------------------------
# Short runs (3 untimed + 5 timed steps) of (b)/(b') with one switch each: whole-buffer AdamW instead of the fused
# kernel; per-layer recomputation on; the gradient all-reduce through NCCL at world size 1 (torchrun-style env)
# instead of no collective; per-segment SDPA instead of varlen for packed documents. Each variant's JSON goes to $OUT
# as soon as it has one (means_NAME.json): a stage cut short by its limit keeps the variants that finished.
means() {
  local common=(--device "$DEV" --model "$MODEL" --seq-len "$SEQ" --micro-batch "$MB" --grad-accum "$GA" --steps 8 --warmup 3)
  local rows=()
  run1() {  # NAME ENV... -- ARGS...
    local name=$1; shift; local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
    env "${envs[@]}" "$BIN/train_synthetic" "${common[@]}" "$@" --run-dir "$CK/means" --json "$OUT/means_$name.json" \
      > /dev/null 2>> "$OUT/means.log" || echo "means: $name failed" >&2
    rm -rf "$CK/means"
    rows+=("$name")
  }
  run1 baseline X=1 --
  run1 adamw_unfused LEXFLOW_ADAMW=unfused --
  run1 recompute X=1 -- --recompute
  run1 nccl_world1 RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29611 --
  run1 packed_varlen X=1 -- --docs-per-seq "${BENCH_DOCS_PER_SEQ:-5}"
  run1 packed_segments LEXFLOW_DOC_ATTENTION=segments -- --docs-per-seq "${BENCH_DOCS_PER_SEQ:-5}"
  "$PY" - "$OUT" "$OUT/means.json" "${rows[@]}" <<'PYEOF' | tee "$OUT/means.txt"
import json, os, sys
w, out, names = sys.argv[1], sys.argv[2], sys.argv[3:]
res = {}
for n in names:
    p = os.path.join(w, f"means_{n}.json")
    res[n] = json.load(open(p)) if os.path.exists(p) else None
json.dump(res, open(out, "w"))
base = res.get("baseline"); pv = res.get("packed_varlen")
print("| variant | tokens/s | s/step | MFU vs 989 | vs reference |")
print("|---|---|---|---|---|")
for n in names:
    r = res[n]
    ref = pv if n == "packed_segments" else base
    if not r:
        print(f"| {n} | failed | | | |"); continue
    rel = f"{r['tokens_per_s'] / ref['tokens_per_s']:.3f} x {'packed_varlen' if ref is pv else 'baseline'}" if ref else "—"
    print(f"| {n} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {r['mfu_vs_989'] * 100:.1f}% | {rel} |")
PYEOF
}
stage means 330 means

# --- loss parity: lexflow's initial weights + token stream → torch --------------------------------------------------
# 1b at seq_len 1024, 4 sequences per step, a learnable token pattern (the loss must move), lr warm-up 5 steps.
parity() {
  "$BIN/train_synthetic" --device "$DEV" --model "$MODEL" --seq-len "$PARITY_SEQ" --micro-batch 2 --grad-accum 2 \
    --steps "$PARITY_STEPS" --warmup 1 --pattern ramp --lr 5e-4 --min-lr 5e-5 --lr-warmup 5 \
    --run-dir "$CK/parity" --export-init "$W/init" --dump-tokens "$W/tokens.bin" --json "$OUT/parity_lexflow.json" \
    && rm -rf "$CK/parity" \
    && "$PY" bench/gpu/torch_ref.py parity --init "$W/init" --tokens "$W/tokens.bin" --lexflow-json "$OUT/parity_lexflow.json" \
         --device "$TDEV" --model "$MODEL" --seq-len "$PARITY_SEQ" --micro-batch 2 --grad-accum 2 --lr 5e-4 --min-lr 5e-5 --lr-warmup 5 --floor-split 1x4 \
         --json "$OUT/parity.json"
}
stage parity 150 parity
rm -rf "$W/init" "$W/tokens.bin" "$CK/parity"

# --- (a) lexflow run: full streaming dataflow -------------------------------------------------------------------------
stream() {
  "$BIN/lexflow" gen-sample "$W/corpus" --acts-per-language 200 > "$OUT/gen_sample.json" || return 1
  local port=9401
  # A tokenizer.json with added tokens past the 128,256-row embedding table (the Llama 3.2 *vision* one adds
  # `<|image|>` = 128256, which the `1b` preset rightly refuses): drop them (ids of any text without a literal
  # "<|image|>" are unchanged). lexflow's own export (bench/gpu/build.sh) has none.
  "$PY" - "$TOKENIZER" "$W/tokenizer.json" <<'PYEOF' || return 1
import json, sys
t = json.load(open(sys.argv[1], encoding="utf-8"))
n = len(t["added_tokens"])
t["added_tokens"] = [a for a in t["added_tokens"] if a["id"] < 128256]
json.dump(t, open(sys.argv[2], "w", encoding="utf-8"), ensure_ascii=False)
print(f"tokenizer: {n - len(t['added_tokens'])} added token(s) with id >= 128256 dropped for the 128,256-row embedding")
PYEOF
  sed -e "s|@RUN_DIR@|$CK/stream|" -e "s|@TOKENIZER@|$W/tokenizer.json|" -e "s|@CORPUS@|$W/corpus|" -e "s|@STEPS@|$STEPS|" -e "s|@PORT@|$port|" \
    -e "s|@DEVICE@|$DEV|" -e "s|@MODEL@|$MODEL|" -e "s|@SEQ@|$SEQ|" -e "s|@MB@|$MB|" -e "s|@GA@|$GA|" bench/gpu/stream.toml > "$W/stream.toml"
  local fpt
  fpt=$("$PY" -c 'import sys;sys.path.insert(0,"bench/gpu");import torch_ref as R;print(R.flops_per_token(R.preset(sys.argv[2]),int(sys.argv[1])))' "$SEQ" "$MODEL")
  "$PY" bench/gpu/scrape.py --url "http://127.0.0.1:$port/metrics" --warmup "$WARMUP" --steps "$STEPS" \
    --step-tokens $((MB * GA * SEQ)) --flops-per-token "$fpt" --json "$OUT/stream.json" &
  local scr=$!
  RUST_LOG=info "$BIN/lexflow" run "$W/stream.toml" --quiet 2> "$OUT/stream.log"
  local rc=$?
  # The scraper normally finished at the last step (before the final checkpoint); never wait on it for long.
  ( sleep 5; kill "$scr" 2>/dev/null ) &
  wait "$scr"; local src=$?
  [ $rc -ne 0 ] && { echo "lexflow run failed (rc=$rc):"; tail -5 "$OUT/stream.log"; }
  grep -E "train step|error|WARN" "$OUT/stream.log" | tail -8
  cp "$CK/stream/stats.json" "$OUT/stream_stats.json" 2>/dev/null
  "$PY" - "$OUT/stream.json" "$CK/stream/stats.json" "$SEQ" "$MB" "$GA" "$MODEL" <<'PYEOF' || true
import json, sys
sys.path.insert(0, "bench/gpu")
import torch_ref as R
s = json.load(open(sys.argv[1])); st = json.load(open(sys.argv[2]))
s.update(seq_len=int(sys.argv[3]), micro_batch=int(sys.argv[4]), grad_accum=int(sys.argv[5]), model=sys.argv[6],
         params=R.num_params(R.preset(sys.argv[6])),
         packer=st.get("packer"), preprocess_tokens_per_second=st.get("preprocess_tokens_per_second"),
         losses=(st.get("train") or {}).get("losses"), outcome=st.get("outcome"))
json.dump(s, open(sys.argv[1], "w"))
print("stream: packer", json.dumps(st.get("packer")))
PYEOF
  [ $rc -eq 0 ] && [ $src -eq 0 ]
}
stage stream 170 stream
rm -rf "$CK/stream" "$W/corpus"

# --- (c) torch.compile -------------------------------------------------------------------------------------------------
stage torch_compile 240 "$PY" bench/gpu/torch_ref.py perf --device "$TDEV" --model "$MODEL" --mode compile --seq-len "$SEQ" --micro-batch "$MB" \
  --grad-accum "$GA" --warmup "$WARMUP" --timed "$TIMED" --json "$OUT/torch_compile.json"

echo "=== summary (total $(elapsed)s)"
"$PY" bench/gpu/summarize.py "$OUT"
grep -h "GPU CHECK OK\|PARITY" "$OUT/gpu_check.log" "$OUT/run.log" 2>/dev/null | sort -u
