#!/usr/bin/env python3
"""A lexflow checkpoint as a user of Hugging Face loads it: nothing but the checkpoint directory.

Usage: hf_checkpoint.py generate CKPT_DIR MAX_NEW_TOKENS PROMPT...
  AutoTokenizer + AutoModelForCausalLM (fp32, eager attention) + GenerationConfig from CKPT_DIR alone; greedy
  `model.generate` of each prompt (the tokenizer adds <|begin_of_text|> itself); prints one JSON line per prompt:
  {"prompt", "input_ids", "token_ids"}, token_ids without the stop token generation_config.json names.
Usage: hf_checkpoint.py sample
  Reads JSON lines {"logits": [...], "temperature", "top_k", "top_p"} on stdin and prints, per line, the
  distribution transformers' logits warpers (Temperature, TopK, TopP, in generate's order) leave:
  {"ids": [...], "probs": [...]} for every token of non-zero probability, most likely first.
"""
import json
import sys

import torch


def generate(ckpt: str, max_new: int, prompts: list[str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(ckpt)
    # Batch tokenization needs the pad token the checkpoint declares (the packer's).
    tok(prompts, padding=True)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    gen = GenerationConfig.from_pretrained(ckpt)
    stops = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    for p in prompts:
        enc = tok(p, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new, generation_config=gen)
        ids = out[0, enc["input_ids"].shape[1]:].tolist()
        if ids and ids[-1] in stops:
            ids = ids[:-1]
        print(json.dumps({"prompt": p, "input_ids": enc["input_ids"][0].tolist(), "token_ids": ids}))


def sample() -> None:
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    for line in sys.stdin:
        if not line.strip():
            continue
        c = json.loads(line)
        scores = torch.tensor([c["logits"]], dtype=torch.float32)
        ids = torch.zeros((1, 1), dtype=torch.long)
        scores = TemperatureLogitsWarper(c["temperature"])(ids, scores)
        if c["top_k"] > 0:
            scores = TopKLogitsWarper(c["top_k"])(ids, scores)
        if c["top_p"] < 1.0:
            scores = TopPLogitsWarper(c["top_p"])(ids, scores)
        probs = scores.softmax(-1)[0].double()
        keep = [i for i in range(probs.shape[0]) if probs[i] > 0]
        keep.sort(key=lambda i: (-probs[i].item(), i))
        print(json.dumps({"ids": keep, "probs": [probs[i].item() for i in keep]}))


if __name__ == "__main__":
    if sys.argv[1] == "generate":
        generate(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    else:
        sample()
