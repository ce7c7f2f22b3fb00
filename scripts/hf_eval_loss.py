#!/usr/bin/env python3
"""Held-out loss of a lexflow checkpoint, recomputed with transformers (an independent check of `[eval]`).

Usage: hf_eval_loss.py MODEL_DIR SEQUENCES_JSONL
  MODEL_DIR        a checkpoint in HF layout (config.json + model.safetensors), as lexflow writes them
  SEQUENCES_JSONL  `lexflow heldout CONFIG --out FILE`: one packed sequence per line
                   (`lang`, `tokens` = seq_len + 1 ids, `padding`, `doc_starts`, `no_loss`)

Each document segment of a packed sequence is run through LlamaForCausalLM on its own (eager attention, fp32,
positions from 0), which is what lexflow's block-diagonal attention computes. Position p predicts tokens[p + 1],
including the first token of the next document; targets in the trailing padding or in a `no_loss` range do not
count. Prints one JSON object: per language and "all", the cross-entropy sum, the target count and the mean.
"""
import json
import sys

import torch
from transformers import LlamaForCausalLM


def main() -> int:
    model_dir, seqs_file = sys.argv[1], sys.argv[2]
    model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    acc: dict[str, list[float]] = {}
    with open(seqs_file, encoding="utf-8") as f:
        for line in f:
            s = json.loads(line)
            toks = s["tokens"]
            t = len(toks) - 1
            trained = [p < t - s["padding"] for p in range(t)]
            for a, b in s.get("no_loss", []):
                for p in range(min(a, t), min(b, t)):
                    trained[p] = False
            starts = sorted({x for x in s["doc_starts"] if 0 < x < t} | {0}) + [t]
            total = 0.0
            n = 0
            for a, b in zip(starts, starts[1:]):
                ids = torch.tensor([toks[a:b]], dtype=torch.long)
                with torch.no_grad():
                    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
                for i, p in enumerate(range(a, b)):
                    if trained[p]:
                        total -= logp[i, toks[p + 1]].item()
                        n += 1
            for key in (s["lang"], "all"):
                v = acc.setdefault(key, [0.0, 0])
                v[0] += total
                v[1] += n
    print(json.dumps({k: {"sum": v[0], "tokens": v[1], "loss": v[0] / max(v[1], 1)} for k, v in acc.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
