"""Chat templates as the model publishers ship them (Jinja, rendered by transformers' `apply_chat_template`), for the
external checks of lexflow's `input.qa_template` (scripts/hf_chat_template.py, scripts/hf_generate.py).

LLAMA3 is the `chat_template` of Meta-Llama-3-8B-Instruct's tokenizer_config.json, verbatim.
"""
from transformers import PreTrainedTokenizerFast

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def tokenizer(tokenizer_json: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_file=tokenizer_json, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
    )


def messages(question: str, system: str | None, answer: str | None = None) -> list[dict]:
    m = [{"role": "system", "content": system}] if system is not None else []
    m.append({"role": "user", "content": question})
    if answer is not None:
        m.append({"role": "assistant", "content": answer})
    return m
