#!/usr/bin/env python3
"""Times `lexflow run` from outside (bench/gpu/run.sh, part a): polls the run's /metrics endpoint and snapshots
rank 0's `lexflow_trainer_step_seconds` histogram (sum, count) once `--warmup` steps are done and again after the
last step. Timed tokens / timed step seconds excludes warm-up and the final checkpoint; the step time includes any
wait for data, so a data-starved trainer shows up here. Prints one JSON line (RESULT ...) and writes --json.

  scrape.py --url http://127.0.0.1:9401/metrics --warmup 5 --steps 25 --step-tokens 65536 --flops-per-token F
"""
import argparse
import json
import os
import re
import sys
import time
import urllib.request


def read(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            text = r.read().decode()
    except Exception:
        return None
    vals = {}
    for name in ("lexflow_trainer_step_seconds_sum", "lexflow_trainer_step_seconds_count",
                 "lexflow_trainer_data_wait_seconds_total", "lexflow_trainer_loss"):
        m = re.search(r"^" + name + r"\{[^}]*rank=\"0\"[^}]*\} (\S+)$", text, re.M)
        if m:
            vals[name] = float(m.group(1))
    return vals


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--step-tokens", type=float, required=True)
    ap.add_argument("--flops-per-token", type=float, required=True)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json")
    a = ap.parse_args()
    t0 = time.time()
    warm = last = None
    seen = -1
    while time.time() - t0 < a.timeout:
        v = read(a.url)
        c = int(v.get("lexflow_trainer_step_seconds_count", 0)) if v else 0
        if v and c != seen:
            seen = c
            print(f"scrape: step {c}/{a.steps} at {time.time() - t0:.1f}s loss {v.get('lexflow_trainer_loss', 0):.4f}",
                  file=sys.stderr, flush=True)
        if v and warm is None and c >= a.warmup:
            warm = (c, v["lexflow_trainer_step_seconds_sum"], time.time(), v.get("lexflow_trainer_data_wait_seconds_total", 0))
        if v and c >= a.steps:
            last = (c, v["lexflow_trainer_step_seconds_sum"], time.time(), v.get("lexflow_trainer_data_wait_seconds_total", 0))
            break
        time.sleep(0.005)
    if not (warm and last):
        print(f"scrape: incomplete (warm={warm}, last={last})", file=sys.stderr)
        sys.exit(1)
    steps = last[0] - warm[0]
    secs = last[1] - warm[1]
    tps = steps * a.step_tokens / secs
    peak = float(os.environ.get("BENCH_MATMUL_PEAK") or 0) or None
    out = dict(name="lexflow_stream", timed_steps=steps, step_s=secs / steps, tokens_per_s=tps,
               tokens_per_s_wall=steps * a.step_tokens / (last[2] - warm[2]),
               data_wait_fraction_timed=(last[3] - warm[3]) / secs, flops_per_token=a.flops_per_token,
               mfu_vs_989=tps * a.flops_per_token / 989e12,
               mfu_vs_measured_matmul=(tps * a.flops_per_token / peak) if peak else None,
               global_batch_tokens=a.step_tokens)
    line = json.dumps(out)
    print("RESULT " + line, flush=True)
    if a.json:
        open(a.json, "w").write(line)


if __name__ == "__main__":
    main()
