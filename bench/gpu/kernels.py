#!/usr/bin/env python3
"""Where the GPU time of a training step goes: summarises Chrome traces written by libtorch's Kineto profiler — the
lexflow trainer's (`LEXFLOW_PROFILE_STEPS=A..B` → run_dir/profile/trace-rank0.json) and the PyTorch reference's
(`torch_ref.py perf --profile-steps A..B --trace FILE`) — in the same terms, side by side.

  kernels.py TRACE [--steps N] [--top K]                 one trace
  kernels.py lexflow=TRACE torch=TRACE [--steps N ...]   several, columns side by side (ms per step)

Device time is the sum of kernel (and GPU memcpy/memset) durations divided by the number of profiled steps; kernels
are grouped into categories by name (matmul, attention, norm, elementwise, loss, optimizer, ...). The "busy" line is
the union of kernel intervals against the trace's wall span: 1 - busy is the share of time the GPU sat idle (host
overhead, syncs). On a CPU-only trace (no kernels) the top-level CPU operators are summarised instead.
"""
import argparse
import collections
import json
import re
import sys

CATEGORIES = [
    ("attention", re.compile(r"flash|fmha|attention|sdpa", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|sm90_|sm80_|s16816|wgmma", re.I)),
    ("nccl", re.compile(r"nccl", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor_apply", re.I)),
    ("loss", re.compile(r"softmax|nll_loss|cross_entropy|log_softmax", re.I)),
    ("norm", re.compile(r"rms_norm|RowwiseMoments|layer_norm|rmsnorm", re.I)),
    ("embedding", re.compile(r"embedding|indexing_backward|index_select|index_put|scatter|gather|sort|radix", re.I)),
    ("reduce", re.compile(r"reduce_kernel|norm_kernel|sum_kernel", re.I)),
    ("copy/cast", re.compile(r"copy|memcpy|memset|cast|fill", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|silu|mul|add|roll|cat", re.I)),
]


def category(name):
    for cat, rx in CATEGORIES:
        if rx.search(name):
            return cat
    return "other"


def short(name, width=90):
    name = re.sub(r"\s+", " ", name)
    return name if len(name) <= width else name[: width - 3] + "..."


def load(path):
    with open(path, encoding="utf-8") as fh:
        trace = json.load(fh)
    return trace.get("traceEvents", trace if isinstance(trace, list) else [])


def summarise(path, steps):
    events = [e for e in load(path) if e.get("ph") == "X" and "dur" in e]
    gpu = [e for e in events if str(e.get("cat", "")).lower() in ("kernel", "gpu_memcpy", "gpu_memset")]
    out = {"path": path, "steps": steps}
    if gpu:
        by_kernel = collections.Counter()
        calls = collections.Counter()
        for e in gpu:
            by_kernel[e["name"]] += e["dur"]
            calls[e["name"]] += 1
        by_cat = collections.Counter()
        for name, dur in by_kernel.items():
            by_cat[category(name)] += dur
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in gpu)
        busy, cur_s, cur_e = 0.0, None, None
        for s, e in spans:
            if cur_e is None or s > cur_e:
                if cur_e is not None:
                    busy += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None:
            busy += cur_e - cur_s
        wall = spans[-1][1] - spans[0][0] if spans else 0.0
        out.update(kind="gpu", total_ms=sum(by_kernel.values()) / 1e3 / steps, busy_ms=busy / 1e3 / steps,
                   wall_ms=wall / 1e3 / steps, launches=sum(calls.values()) / steps,
                   categories={k: v / 1e3 / steps for k, v in by_cat.items()},
                   kernels=[(n, d / 1e3 / steps, calls[n] / steps) for n, d in by_kernel.most_common()])
    else:
        ops = [e for e in events if str(e.get("cat", "")).lower() == "cpu_op"]
        # Top-level operators only: those not nested inside another operator of the same thread.
        ops.sort(key=lambda e: (e.get("tid"), e["ts"], -e["dur"]))
        top, end = [], {}
        for e in ops:
            tid = e.get("tid")
            if e["ts"] >= end.get(tid, -1):
                top.append(e)
                end[tid] = e["ts"] + e["dur"]
        by_op = collections.Counter()
        calls = collections.Counter()
        for e in top:
            by_op[e["name"]] += e["dur"]
            calls[e["name"]] += 1
        out.update(kind="cpu", total_ms=sum(by_op.values()) / 1e3 / steps, launches=len(top) / steps,
                   categories={}, kernels=[(n, d / 1e3 / steps, calls[n] / steps) for n, d in by_op.most_common()])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="+", help="TRACE or LABEL=TRACE")
    ap.add_argument("--steps", type=int, default=1, help="training steps inside each trace (per-step figures)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json", help="also write the summaries here")
    a = ap.parse_args()
    runs = []
    for t in a.traces:
        label, _, path = t.rpartition("=")
        try:
            runs.append((label or path, summarise(path, a.steps)))
        except (OSError, ValueError) as e:
            sys.exit(f"{path}: cannot read the trace: {e}")
    labels = [l for l, _ in runs]
    w = max(12, *(len(l) for l in labels))
    kind = runs[0][1]["kind"]
    unit = "device ms/step" if kind == "gpu" else "CPU ms/step (top-level operators)"
    print(f"{'':24}" + "".join(f"{l:>{w}}" for l in labels) + f"   ({unit})")
    print(f"{'total':24}" + "".join(f"{r['total_ms']:>{w}.1f}" for _, r in runs))
    if kind == "gpu":
        print(f"{'GPU busy (union)':24}" + "".join(f"{r.get('busy_ms', 0):>{w}.1f}" for _, r in runs))
        print(f"{'wall span':24}" + "".join(f"{r.get('wall_ms', 0):>{w}.1f}" for _, r in runs))
        print(f"{'idle share':24}" + "".join(
            f"{(1 - r['busy_ms'] / r['wall_ms']) * 100 if r.get('wall_ms') else 0:>{w - 1}.1f}%" for _, r in runs))
    print(f"{'launches/step':24}" + "".join(f"{r['launches']:>{w}.0f}" for _, r in runs))
    cats = sorted({c for _, r in runs for c in r["categories"]},
                  key=lambda c: -max(r["categories"].get(c, 0) for _, r in runs))
    for c in cats:
        print(f"  {c:22}" + "".join(f"{r['categories'].get(c, 0):>{w}.1f}" for _, r in runs))
    for label, r in runs:
        print(f"\n{label}: top {a.top} by time ({r['path']})")
        for name, ms, n in r["kernels"][: a.top]:
            print(f"  {ms:9.2f} ms {n:7.0f}x  [{category(name) if kind == 'gpu' else 'op'}] {short(name)}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({l: r for l, r in runs}, fh)


if __name__ == "__main__":
    main()
