#!/usr/bin/env python3
"""Logit (and loss/gradient) parity of lexflow's Rust LLaMA against transformers' LlamaForCausalLM.

Usage: hf_parity.py MODEL_DIR IO_FILE [--whole-rows]
  MODEL_DIR  config.json + model.safetensors written by lexflow (HF layout)
  IO_FILE    safetensors with `input_ids` (B, T) int64 and `logits` (B, T, V) float32 computed by lexflow, and
             optionally:
             `doc_ids` (B, T) int64   packed documents: transformers runs every document of a row on its own
                                      (positions from 0, nothing seen across the boundary) and the rows' logits are
                                      those pieces side by side;
             `labels` (B, T) int64    then also the summed cross-entropy (ignore index -100) of those logits is
                                      back-propagated, and `loss` (scalar) and `grad.<HF key>` from lexflow are
                                      compared with it.
  --whole-rows  ignore `doc_ids` (negative control: a packed row seen as one document must not match)

Loads the model with attn_implementation="eager" in fp32, checks every weight was consumed (no missing or unexpected
keys), and prints `max_abs_diff <value>` (logits) and, with labels, `loss_abs_diff <value>` and `grad_max_rel_diff
<value>` (per parameter: max |Δ| / max |torch grad|, the worst parameter) for the caller to judge.
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM


def segments(doc_ids_row):
    """[start, end) of each run of equal document ids."""
    out, start = [], 0
    t = doc_ids_row.shape[0]
    for p in range(1, t + 1):
        if p == t or doc_ids_row[p] != doc_ids_row[p - 1]:
            out.append((start, p))
            start = p
    return out


def main() -> int:
    model_dir, io_file = sys.argv[1], sys.argv[2]
    whole_rows = "--whole-rows" in sys.argv[3:]
    model, info = LlamaForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager", dtype=torch.float32, output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        print(f"loading problems: {bad}", file=sys.stderr)
        return 2
    rope = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None)
    print(f"rope {rope}", file=sys.stderr)
    model.eval()
    io = load_file(io_file)
    ids = io["input_ids"]
    labels = io.get("labels")
    doc_ids = None if whole_rows else io.get("doc_ids")
    with torch.set_grad_enabled(labels is not None):
        rows = []
        for r in range(ids.shape[0]):
            spans = segments(doc_ids[r]) if doc_ids is not None else [(0, ids.shape[1])]
            rows.append(torch.cat([model(input_ids=ids[r : r + 1, a:b]).logits[0] for a, b in spans], 0))
        logits = torch.stack(rows, 0).float()
    if logits.shape != io["logits"].shape:
        print(f"shape {tuple(logits.shape)} vs {tuple(io['logits'].shape)}", file=sys.stderr)
        return 2
    diff = (logits.detach() - io["logits"]).abs().max().item()
    print(f"max_abs_diff {diff:.6e}")
    if labels is not None:
        v = logits.shape[-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, v), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        loss.backward()
        print(f"loss_abs_diff {abs(loss.item() - io['loss'].item()):.6e}")
        worst, worst_name = 0.0, None
        named = dict(model.named_parameters())
        for key, got in io.items():
            if not key.startswith("grad."):
                continue
            want = named[key[len("grad."):]].grad
            rel = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
            if rel >= worst:
                worst, worst_name = rel, key
        print(f"grad_max_rel_diff {worst:.6e}")
        print(f"worst gradient: {worst_name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
