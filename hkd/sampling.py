"""Batched sampling with the KV cache, shared by data distillation, evaluation and RL.

Prompts are left-padded so every row's continuation starts at the same column; generation
stops at EOS or ``max_new_tokens``. Returns token ids as well as text, because the RL stage
scores the student's own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel


@dataclass
class Samples:
    """``n`` samples per prompt, prompt-major: row ``i * n + j`` is sample ``j`` of prompt ``i``."""

    prompt_ids: Tensor  # [P*n, Sp] left-padded
    prompt_mask: Tensor  # [P*n, Sp]
    completion_ids: Tensor  # [P*n, Sc] right-padded with pad_id after EOS
    completion_mask: Tensor  # [P*n, Sc] 1 for generated tokens up to and including EOS
    texts: list[str]  # decoded completions (without EOS/padding)


def encode_prompts(tokenizer: Any, prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: list[str],
    *,
    n: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> Samples:
    """Sample ``n`` completions per prompt; ``temperature == 0`` means greedy decoding."""
    device = next(model.parameters()).device
    ids, mask = encode_prompts(tokenizer, prompts, device)
    ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    greedy = temperature <= 0
    out = model.generate(  # type: ignore[operator]
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if greedy else top_p,
        top_k=None,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    model.train(was_training)
    completion = out[:, ids.shape[1]:]
    eos = tokenizer.eos_token_id
    completion_mask = torch.ones_like(completion)
    if eos is not None:
        # tokens after the first EOS are padding; the EOS itself belongs to the completion
        after_eos = (completion == eos).long().cumsum(1) - (completion == eos).long()
        completion_mask = (after_eos == 0).long()
    completion = completion.masked_fill(completion_mask == 0, pad)
    texts = [
        tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(completion, completion_mask)
    ]
    return Samples(ids, mask, completion, completion_mask, texts)
