"""Batched sampling with the KV cache: the built-in ``transformers`` generation backend.

Prompts are left-padded so every row's continuation starts at the same column; generation
stops at EOS or ``max_new_tokens``. Returns token ids as well as text, because the RL stage
scores the student's own tokens, and the log-probability of every sampled token under the
distribution it was drawn from (temperature and top-p applied), which on-policy losses and
importance weights need. Other engines plug in through :mod:`hkd.sampling.backends`.
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
    # [P*n, Sc] float32: log p(token) under the sampling distribution (logits / temperature,
    # top-p renormalised); 0 where completion_mask is 0, and 0 everywhere for greedy decoding
    # (a point mass). None only from hand-made Samples (tests); every backend fills it.
    token_logprobs: Tensor | None = None

    def scoring_inputs(self) -> tuple[dict[str, Tensor], int]:
        """Model inputs that score prompt + completion in one forward, and the column from which
        ``logits[:, start:-1]`` predict the completion tokens. The prompts are left-padded, so the
        positions are the ones generate() used: a model scores exactly what it sampled."""
        input_ids = torch.cat([self.prompt_ids, self.completion_ids], 1)
        attention_mask = torch.cat([self.prompt_mask, self.completion_mask], 1)
        position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)
        start = self.prompt_ids.shape[1] - 1  # logits at column j predict token j + 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}, start


def encode_prompts(tokenizer: Any, prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-padded ids and mask, BOS first when the tokenizer has one (what every backend must use)."""
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


class _SampledLogprobs:
    """A logits processor, run last, that records log p(sampled token) one step late.

    At step ``t`` it sees the final (tempered, top-p filtered) scores of step ``t`` but not yet
    the token drawn from them; that token is the last column of ``input_ids`` at step ``t + 1``.
    So it keeps one step's log-softmax ([rows, vocab], not the whole [rows, steps, vocab]
    history ``output_scores`` would hold) and gathers from it on the next call.
    """

    def __init__(self) -> None:
        self.previous: Tensor | None = None
        self.logprobs: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.previous = scores.float().log_softmax(-1)
        return scores

    def finish(self, completion: Tensor) -> Tensor:
        """``[rows, Sc]`` log-probs of ``completion``'s tokens (the last one gathered here)."""
        if self.previous is not None and len(self.logprobs) < completion.shape[1]:
            self.logprobs.append(self.previous.gather(-1, completion[:, len(self.logprobs):][:, :1]).squeeze(-1))
        if not self.logprobs:
            return torch.zeros(completion.shape, dtype=torch.float32, device=completion.device)
        return torch.stack(self.logprobs[: completion.shape[1]], 1)


def _generate(model: PreTrainedModel, ids: Tensor, mask: Tensor, max_new_tokens: int, greedy: bool,
              processors: Any, pad: int, eos: int | None) -> Tensor:
    return model.generate(  # type: ignore[operator,no-any-return]
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        logits_processor=processors,
        pad_token_id=pad,
        eos_token_id=eos,
        use_cache=True,
    )


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
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    device = next(model.parameters()).device
    ids, mask = encode_prompts(tokenizer, prompts, device)
    ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    greedy = temperature <= 0
    recorder = _SampledLogprobs()
    # The warpers are ours, not generate()'s: its own run after user processors, so a recorder
    # could not see the final distribution. temperature=1, top_p=1, top_k=0 keep generate from
    # adding any, also from a model's generation_config (Llama/Qwen ship top_k/top_p defaults).
    processors = LogitsProcessorList()
    if not greedy:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p, min_tokens_to_keep=1))
        processors.append(recorder)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    # generate() calls our neutral temperature=1/top_k=0 "not valid flags": they are set on purpose
    hf_logging.set_verbosity_error()
    try:
        out = _generate(model, ids, mask, max_new_tokens, greedy, processors, pad, tokenizer.eos_token_id)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.train(was_training)
    completion = out[:, ids.shape[1]:]
    eos = tokenizer.eos_token_id
    completion_mask = torch.ones_like(completion)
    if eos is not None:
        # tokens after the first EOS are padding; the EOS itself belongs to the completion
        after_eos = (completion == eos).long().cumsum(1) - (completion == eos).long()
        completion_mask = (after_eos == 0).long()
    completion = completion.masked_fill(completion_mask == 0, pad)
    logprobs = recorder.finish(completion) if not greedy else torch.zeros(completion.shape, device=completion.device)
    logprobs = logprobs.masked_fill(completion_mask == 0, 0.0)
    texts = [
        tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(completion, completion_mask)
    ]
    return Samples(ids, mask, completion, completion_mask, texts, logprobs)
