"""Stand-ins shared by the data-distillation tests (generate, pseudo-labels, augmentation)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from hkd.sampling.backends import PromptBatch
from hkd.sampling.hf_sampler import Samples


def scripted(make_texts: Callable[[str, int, int], list[str]]) -> Any:
    """A stand-in for :func:`hkd.sampling.hf_sampler.sample` (what the transformers backend calls):
    ``make_texts(prompt, n, seed)`` per prompt, the prompt being its token ids decoded without special
    tokens; ``.calls`` records each call's prompts so decoded. Its samples hold the prompt ids it was given,
    as the contract asks."""
    calls: list[list[str]] = []

    def fake_sample(model, tokenizer, prompts, *, n, seed, **options):
        if not isinstance(prompts, PromptBatch):
            prompts = PromptBatch.from_texts(tokenizer, list(prompts))
        decoded = [tokenizer.decode(row, skip_special_tokens=True) for row in prompts.ids]
        calls.append(decoded)
        texts = [t for p in decoded for t in make_texts(p, n, seed)]
        ids, mask = prompts.padded(tokenizer.pad_token_id or 0)
        empty = torch.zeros(len(texts), 0, dtype=torch.long)
        return Samples(ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), empty, empty, texts, empty.float())

    fake_sample.calls = calls  # type: ignore[attr-defined]
    return fake_sample


def crash_after(fake: Any, served: int) -> Callable[..., Any]:
    """``fake``, except that the call after ``served`` successful ones dies (a killed process)."""

    def sample(*args: Any, **kwargs: Any) -> Any:
        if len(fake.calls) == served:
            raise RuntimeError("killed")
        return fake(*args, **kwargs)

    return sample
