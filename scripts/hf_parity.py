#!/usr/bin/env python3
"""Logit parity of lexflow's Rust LLaMA against transformers' LlamaForCausalLM.

Usage: hf_parity.py MODEL_DIR IO_FILE
  MODEL_DIR  config.json + model.safetensors written by lexflow (HF layout)
  IO_FILE    safetensors with `input_ids` (B, T) int64 and `logits` (B, T, V) float32 computed by lexflow

Loads the model with attn_implementation="eager" in fp32, checks every weight was consumed (no missing or unexpected
keys), and prints `max_abs_diff <value>` for the caller to judge.
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM


def main() -> int:
    model_dir, io_file = sys.argv[1], sys.argv[2]
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
    with torch.no_grad():
        logits = model(input_ids=io["input_ids"]).logits.float()
    if logits.shape != io["logits"].shape:
        print(f"shape {tuple(logits.shape)} vs {tuple(io['logits'].shape)}", file=sys.stderr)
        return 2
    diff = (logits - io["logits"]).abs().max().item()
    print(f"max_abs_diff {diff:.6e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
