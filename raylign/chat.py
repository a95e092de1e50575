"""Chat messages -> prompt token ids, with the model's own chat template (no re-tokenization later)."""

from __future__ import annotations


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
