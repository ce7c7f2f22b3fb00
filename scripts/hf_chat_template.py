#!/usr/bin/env python3
"""The Llama 3 chat template rendered and tokenized by transformers, as an external check of lexflow's
`input.qa_template = "llama3"`.

Usage: hf_chat_template.py TOKENIZER_JSON < pairs.jsonl
  each input line: {"question", "answer", "system" (optional)}
Prints one JSON line per pair: `prompt` (system + user turns and the assistant header: add_generation_prompt),
`full` (the whole conversation, answer included), and their token ids `prompt_ids`, `full_ids`
(apply_chat_template(tokenize=True), i.e. without extra special tokens).
"""
import json
import sys

from chat_templates import LLAMA3, messages, tokenizer


def main() -> int:
    tok = tokenizer(sys.argv[1])
    for line in sys.stdin:
        if not line.strip():
            continue
        p = json.loads(line)
        sys_msg = p.get("system")
        ask = messages(p["question"], sys_msg)
        full = messages(p["question"], sys_msg, p["answer"])
        out = {
            "prompt": tok.apply_chat_template(ask, chat_template=LLAMA3, tokenize=False, add_generation_prompt=True),
            "full": tok.apply_chat_template(full, chat_template=LLAMA3, tokenize=False),
            "prompt_ids": list(
                tok.apply_chat_template(ask, chat_template=LLAMA3, tokenize=True, add_generation_prompt=True,
                                        return_dict=False)
            ),
            "full_ids": list(tok.apply_chat_template(full, chat_template=LLAMA3, tokenize=True, return_dict=False)),
        }
        print(json.dumps(out, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
