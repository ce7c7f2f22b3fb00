#!/usr/bin/env python3
"""Final table of bench/gpu/run.sh from the JSON files in OUT (any subset: a stage that did not run is '—')."""
import json
import os
import sys

out = sys.argv[1]


def load(name):
    p = os.path.join(out, name + ".json")
    try:
        return json.load(open(p))
    except Exception:
        return None


peak = load("peak")
sp = load("synthetic_packed")
rows = [("(a) lexflow, streaming dataflow", load("stream")), ("(b) lexflow, synthetic batches", load("synthetic")),
        (f"(b') lexflow, synthetic, {sp.get('docs_per_seq', '?') if sp else '?'} documents per sequence (varlen)", sp),
        ("(c) torch eager", load("torch_eager")), ("(c) torch.compile", load("torch_compile"))]
eager = load("torch_eager")
comp = load("torch_compile")
lines = []
if peak:
    lines.append(f"GPU: {peak.get('device')}; measured bf16 matmul peak {peak['tflops']:.0f} TFLOP/s (datasheet 989)")
cfg = next((r for _, r in rows if r), None)
if cfg:
    lines.append(f"model {cfg.get('model', '1b')} ({cfg.get('params', 1235814400) / 1e9:.3f}B params), seq_len {cfg.get('seq_len', 4096)}, "
                 f"global batch {int(cfg['global_batch_tokens'])} tokens/step "
                 f"(micro_batch {cfg.get('micro_batch', 2)} × grad_accum {cfg.get('grad_accum', 8)}), bf16 + fp32 master AdamW")
lines.append("")
lines.append("| run | tokens/s | s/step | MFU vs 989 | MFU vs measured peak | × torch eager | × torch.compile |")
lines.append("|---|---|---|---|---|---|---|")


def fmt(x, f):
    return "—" if x is None else format(x, f)


for name, r in rows:
    if not r:
        lines.append(f"| {name} | — | — | — | — | — | — |")
        continue
    tps = r["tokens_per_s"]
    mm = r.get("mfu_vs_measured_matmul")
    if mm is None and peak:
        mm = tps * r["flops_per_token"] / peak["flops"]
    lines.append(f"| {name} | {tps:,.0f} | {r['step_s']:.3f} | {r['mfu_vs_989'] * 100:.1f}% | "
                 f"{fmt(mm and mm * 100, '.1f')}% | {fmt(eager and tps / eager['tokens_per_s'], '.3f')} | "
                 f"{fmt(comp and tps / comp['tokens_per_s'], '.3f')} |")
st = load("stream")
if st:
    lines.append(f"\n(a) waited for data {st['data_wait_fraction_timed'] * 100:.1f}% of the timed steps")
    for label, ref in (("(b)", load("synthetic")), ("(b')", sp)):
        if ref:
            lines.append(f"(a) / {label} = {st['tokens_per_s'] / ref['tokens_per_s']:.3f} (target ≥ 0.99)")
par = load("parity")
if par:
    if par.get("floor_split"):
        lines.append(f"loss parity (lexflow vs torch, same initial weights and tokens, {par['steps']} steps): "
                     f"first-step rel. diff {par['rel_diff_first']:.1e} (tol {par['tol_first']:g}), max "
                     f"{par['rel_diff_max']:.1e} at step {par['step_of_max']} (limit {par['limit_max']:.1e} = "
                     f"{par['tol_factor']:g} x torch-vs-torch floor {par['floor_rel_max']:.1e}), mean "
                     f"{par['rel_diff_mean']:.1e} (limit {par['limit_mean']:.1e}, floor {par['floor_rel_mean']:.1e}): "
                     f"{'OK' if par['ok'] else 'FAILED'}; loss {par['lexflow_losses'][0]:.3f} → "
                     f"{par['lexflow_losses'][-1]:.3f}")
    else:
        lines.append(f"loss parity (lexflow vs torch, same initial weights and tokens, {par['steps']} steps): "
                     f"first-step rel. diff {par['rel_diff_first']:.1e} (tol {par['tol_first']:g}), max "
                     f"{par['rel_diff_max']:.1e} at step {par['step_of_max']} (tol {par['tol']:g}), mean "
                     f"{par['rel_diff_mean']:.1e}: {'OK' if par['ok'] else 'FAILED'}; loss "
                     f"{par['lexflow_losses'][0]:.3f} → {par['lexflow_losses'][-1]:.3f}")
elif load("parity_lexflow"):
    lines.append("loss parity: lexflow side ran, torch side missing")
text = "\n".join(lines)
print(text)
open(os.path.join(out, "summary.md"), "w").write(text + "\n")
