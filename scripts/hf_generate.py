#!/usr/bin/env python3
"""Greedy generation with transformers, as an external check of `lexflow qa eval --model`.

Usage: hf_generate.py MODEL_DIR TOKENIZER_JSON GOLD_JSONL LIMIT MAX_NEW_TOKENS [TEMPLATE [SYSTEM]]
Prints one JSON line per question: {"id", "token_ids"}: the ids transformers' LlamaForCausalLM (eager attention,
fp32) generates greedily after the prompt, stopping at <|end_of_text|> or <|eot_id|> (not included), as lexflow does.
TEMPLATE `plain` (default): `<bos>` + "### Question\\n{question}\\n### Answer\\n"; `llama3`: the Llama 3 chat template
(scripts/chat_templates.py) with add_generation_prompt, and SYSTEM as the system turn if given.
"""
import json
import sys

import torch
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM


def main() -> int:
    model_dir, tok_path, gold, limit, max_new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    tok = Tokenizer.from_file(tok_path)
    bos = tok.token_to_id("<|begin_of_text|>")
    stops = [t for t in (tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")) if t is not None]
    template = sys.argv[6] if len(sys.argv) > 6 else "plain"
    system = sys.argv[7] if len(sys.argv) > 7 else None
    pairs = [json.loads(line) for line in open(gold, encoding="utf-8") if line.strip()][:limit]
    for p in pairs:
        if template == "llama3":
            from chat_templates import LLAMA3, messages, tokenizer

            ids = list(
                tokenizer(tok_path).apply_chat_template(
                    messages(p["question"], system), chat_template=LLAMA3, tokenize=True,
                    add_generation_prompt=True, return_dict=False,
                )
            )
        else:
            prompt = f"### Question\n{p['question']}\n### Answer\n"
            ids = [bos] + tok.encode(prompt, add_special_tokens=False).ids
        out = []
        with torch.no_grad():
            x = torch.tensor([ids])
            for _ in range(max_new):
                nxt = int(model(x).logits[0, -1].argmax())
                if nxt in stops:
                    break
                out.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
        print(json.dumps({"id": p["id"], "token_ids": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
