"""Batched sampling with the KV cache: the built-in ``transformers`` generation backend.

Prompts arrive as token ids (:class:`hkd.sampling.backends.PromptBatch`, texts are encoded as
training data encodes prompts) and are left-padded so every row's continuation starts at the
same column; generation stops at EOS, at a stop token (a chat template's end-of-turn) or
``max_new_tokens``. Returns token ids as well as text, because the RL stage scores the
student's own tokens, and the log-probability of every sampled token under the distribution
it was drawn from (temperature and top-p applied), which on-policy losses and importance
weights need. Other engines plug in through :mod:`hkd.sampling.backends`.

Randomness: tokens are drawn from the sampler's own ``torch.Generator`` (seeded with ``seed``),
never from torch's global generator, so sampling neither depends on nor moves the global
random state that dropout and the rest of training draw from. A seed's samples are the ones
``torch.manual_seed(seed)`` followed by ``model.generate(do_sample=True)`` would draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from hkd.sampling.backends import PromptBatch


@dataclass
class Samples:
    """``n`` samples per prompt, prompt-major: row ``i * n + j`` is sample ``j`` of prompt ``i``."""

    prompt_ids: Tensor  # [P*n, Sp] left-padded
    prompt_mask: Tensor  # [P*n, Sp]
    completion_ids: Tensor  # [P*n, Sc] right-padded with pad_id after EOS or a stop token
    completion_mask: Tensor  # [P*n, Sc] 1 for generated tokens up to and including EOS or a stop token
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
    """Left-padded ids and mask of text prompts, BOS first when the tokenizer has one."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return PromptBatch.from_texts(tokenizer, prompts).padded(pad, device)


class _Draw:
    """The last logits processor: draws each row's next token from the final (tempered, top-p
    filtered) scores with the sampler's own generator, records its log-probability, and leaves
    only that token possible, so ``generate`` run greedily takes it and draws nothing from the
    global generator. The draw is the one ``generate(do_sample=True)`` makes: ``multinomial`` of
    the softmax of the same float32 scores."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.logprobs: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        token = torch.multinomial(scores.softmax(-1), num_samples=1, generator=self.generator)
        self.logprobs.append(scores.float().log_softmax(-1).gather(-1, token).squeeze(-1))
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)

    def finish(self, completion: Tensor) -> Tensor:
        """``[rows, Sc]`` log-probs of ``completion``'s tokens."""
        if not self.logprobs:
            return torch.zeros(completion.shape, dtype=torch.float32, device=completion.device)
        return torch.stack(self.logprobs[: completion.shape[1]], 1)


def _generate(model: PreTrainedModel, ids: Tensor, mask: Tensor, max_new_tokens: int,
              processors: Any, pad: int, eos: list[int] | None) -> Tensor:
    return model.generate(  # type: ignore[operator,no-any-return]
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,  # the draw is _Draw's, with its own generator
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        logits_processor=processors,
        pad_token_id=pad,
        eos_token_id=eos,
        use_cache=True,
    )


def sampling_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator of its own on ``device``: seeded with ``seed``, or from fresh entropy without one."""
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    return generator


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: PromptBatch | Sequence[str],
    *,
    n: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> Samples:
    """Sample ``n`` completions per prompt; ``temperature == 0`` means greedy decoding.

    ``prompts``: token ids, or texts encoded as training data's prompts (``[bos] + text``).
    ``stop_token_ids``: tokens that also end a sample (``None``: the chat template's end-of-turn
    token). ``generator``: draw from this one instead of a new one seeded with ``seed``.
    """
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from hkd.data.chat import end_of_turn_ids

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if not isinstance(prompts, PromptBatch):
        prompts = PromptBatch.from_texts(tokenizer, list(prompts))
    ids, mask = prompts.padded(pad, device)
    ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    stops = list(end_of_turn_ids(tokenizer) if stop_token_ids is None else stop_token_ids)
    if tokenizer.eos_token_id is not None:
        stops = [tokenizer.eos_token_id] + [s for s in stops if s != tokenizer.eos_token_id]
    was_training = model.training
    model.eval()
    greedy = temperature <= 0
    draw = _Draw(generator if generator is not None else sampling_generator(device, seed))
    # The warpers are ours, not generate()'s: generate() runs greedily (the draw is ours) and
    # temperature=1, top_p=1, top_k=0 keep it from adding any, also from a model's
    # generation_config (Llama/Qwen ship top_k/top_p defaults).
    processors = LogitsProcessorList()
    if not greedy:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p, min_tokens_to_keep=1))
        processors.append(draw)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    # generate() calls our neutral temperature=1/top_k=0 "not valid flags": they are set on purpose
    hf_logging.set_verbosity_error()
    try:
        out = _generate(model, ids, mask, max_new_tokens, processors, pad, stops or None)
    finally:
        hf_logging.set_verbosity(verbosity)
        model.train(was_training)
    completion = out[:, ids.shape[1]:]
    completion_mask = torch.ones_like(completion)
    if stops:
        # tokens after the first stop token are padding; the stop token itself belongs to the completion
        is_stop = torch.isin(completion, torch.tensor(stops, device=completion.device)).long()
        completion_mask = ((is_stop.cumsum(1) - is_stop) == 0).long()
    completion = completion.masked_fill(completion_mask == 0, pad)
    logprobs = draw.finish(completion) if not greedy else torch.zeros(completion.shape, device=completion.device)
    logprobs = logprobs.masked_fill(completion_mask == 0, 0.0)
    texts = [
        tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(completion, completion_mask)
    ]
    return Samples(ids, mask, completion, completion_mask, texts, logprobs)
