"""Tokenizer helpers shared by every data kind: chat prompts, encoder special tokens, the length cap."""

from __future__ import annotations

from typing import Any

from hkd.errors import HkdError

CHARS_PER_TOKEN_CAP = 64  # no tokenizer averages more characters per token: text beyond this cannot fit


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """``prompt`` as one user turn in the tokenizer's chat template, ready for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise HkdError("data.chat_template: the tokenizer has no chat template; set data.chat_template: false")
    messages = [{"role": "user", "content": prompt}]
    return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def is_encoder_tokenizer(tokenizer: Any) -> bool:
    """A masked-LM (BERT-family) tokenizer: it has cls, sep and mask tokens. Causal LM tokenizers have no mask token."""
    return all(getattr(tokenizer, f"{name}_token_id", None) is not None for name in ("cls", "sep", "mask"))


def encoder_special_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prefix, suffix) the tokenizer itself puts around one sequence: ``[CLS]``/``[SEP]`` for BERT, ``<s>``/``</s>``
    for RoBERTa. Read from the tokenizer's own post-processor on a probe text, so no family is hard-coded."""
    cached = getattr(tokenizer, "_hkd_encoder_special_ids", None)
    if cached is not None:
        return cached
    probe = "hello world"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    found = ([tokenizer.cls_token_id], [tokenizer.sep_token_id])
    for start in range(len(full) - len(plain) + 1):
        if plain and full[start:start + len(plain)] == plain:
            found = (full[:start], full[start + len(plain):])
            break
    try:
        tokenizer._hkd_encoder_special_ids = found  # asked once per example; the answer never changes
    except AttributeError:
        pass
    return found
