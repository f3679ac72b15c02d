"""Training data: JSONL records or synthetic problems -> deterministic padded batches.

Batches are a pure function of (seed, micro-batch index), so a resumed run sees exactly the
batches the uninterrupted run would have seen, with no loader state to checkpoint. Each batch
carries ``example_index`` (positions in the encoded dataset) so per-example data stored
elsewhere, such as the offline teacher cache, can be looked up for it.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import torch
from torch import Tensor

from hkd.tasks.arith import make_problems
from hkd.config import DataConfig
from hkd.data.hf import encode_hf
from hkd.data.packing import Packed
from hkd.data.chat import encode_conversation
from hkd.data.chat import prompt_ids as chat_prompt_ids
from hkd.data.labels import IGNORE_INDEX, next_token_targets
from hkd.data.records import read_jsonl
from hkd.data.text import CHARS_PER_TOKEN_CAP, encoder_special_ids, is_encoder_tokenizer
from hkd.errors import HkdError

def load_records(config: DataConfig, seed: int) -> list[tuple[str, str]]:
    """(prompt, completion) pairs; prompt is "" for plain text (every token is a target).
    Conversations (``data.messages_field``) are read by :func:`load_conversations`."""
    if config.kind == "synthetic":
        return [(p.prompt, p.worked_solution()) for p in make_problems(config.num_examples, config.digits, seed)]
    assert config.path is not None
    if config.prompt_field is None:
        records = read_jsonl(config.path, config.on_bad_line, (config.text_field,))
        return [("", str(r[config.text_field])) for r in records]
    records = read_jsonl(config.path, config.on_bad_line, (config.prompt_field, config.completion_field))
    return [(str(r[config.prompt_field]), str(r[config.completion_field])) for r in records]


def load_conversations(config: DataConfig) -> list[list[dict[str, Any]]]:
    """The ``data.messages_field`` conversation of every record (TRL's conversational format)."""
    assert config.path is not None and config.messages_field is not None
    records = read_jsonl(config.path, config.on_bad_line, (config.messages_field,), {config.messages_field: True})
    return [r[config.messages_field] for r in records]


def encode(
    tokenizer: Any, prompt: str, completion: str, max_length: int, chat_template: bool = False,
    encoder: bool | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids and labels: [bos] prompt completion [eos]; prompt and bos are not targets (IGNORE_INDEX).

    With ``chat_template`` the prompt is rendered by the tokenizer's template, which writes its
    own special tokens (bos included), so none is added here.

    An encoder's tokenizer (``encoder``; ``None``: :func:`is_encoder_tokenizer`) gets its own
    special tokens instead, ``[CLS] prompt completion [SEP]`` for BERT, and truncation keeps the
    final one: BERT was pretrained only on sequences that end in ``[SEP]``.
    """
    cap = CHARS_PER_TOKEN_CAP * max_length  # a 10 MB line is cut here, not tokenised whole
    prompt, completion = prompt[:cap], completion[:cap]
    if encoder is None:
        encoder = is_encoder_tokenizer(tokenizer)
    if encoder:
        prefix, suffix = encoder_special_ids(tokenizer)
        prompt_ids = prefix + (tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else [])
        body = tokenizer(completion, add_special_tokens=False)["input_ids"]
        keep = max(max_length - len(suffix), 0)
        ids = (prompt_ids + body)[:keep] + suffix
        labels = ([IGNORE_INDEX] * len(prompt_ids) + body)[:keep] + suffix
        return ids[:max_length], labels[:max_length]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    # what every sampler is given for this prompt too (on-policy, RL, generate, eval)
    prompt_ids = chat_prompt_ids(tokenizer, prompt, chat_template and bool(prompt), "data.chat_template")
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
    ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    return ids, labels


def encode_dataset(tokenizer: Any, config: DataConfig, seed: int) -> list[tuple[list[int], list[int]]]:
    """Every record of the configured data set, encoded; what training and the teacher cache share."""
    if config.kind == "hf":  # memory-mapped Arrow rows, not Python lists
        return encode_hf(tokenizer, config, seed)  # type: ignore[return-value]
    if config.messages_field is not None:  # conversations: the template's tokens, assistant turns learned
        encoded = [encode_conversation(tokenizer, messages, config.max_length,
                                       f"{config.path}: conversation {i + 1} ({config.messages_field})")
                   for i, messages in enumerate(load_conversations(config))]
    else:
        encoded = [encode(tokenizer, p, c, config.max_length, config.chat_template)
                   for p, c in load_records(config, seed)]
    if encoded and not any(target_count(labels) for _, labels in encoded):
        raise HkdError(
            f"all {len(encoded)} examples have no target tokens after truncation to data.max_length="
            f"{config.max_length} (the prompt fills every sequence); raise data.max_length or shorten the prompts"
        )
    return encoded


def target_count(labels: list[int]) -> int:
    """Tokens a causal LM is trained to predict: labelled positions after the first."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int, causal: bool = True) -> dict[str, Tensor]:
    """Right-pad to the longest sequence; ``loss_mask`` marks positions whose prediction counts."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    batch["loss_mask"] = loss_mask(batch, causal)
    return batch


def loss_mask(batch: dict[str, Tensor], causal: bool) -> Tensor:
    """Positions every stage counts: for a causal LM, position i whose target token i+1 is real."""
    if not causal:
        return batch["attention_mask"].bool()
    mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
    mask[:, :-1] = next_token_targets(batch["labels"])
    return mask


class Batches:
    """Deterministic micro-batches: ``batch(i)`` depends only on the seed and ``i``."""

    def __init__(self, encoded: list[tuple[list[int], list[int]]], config: DataConfig, pad_id: int, seed: int, causal: bool = True):
        if not encoded:
            raise HkdError("the training set is empty (data.num_examples is 0 or the data file has no records)")
        if config.packing:
            encoded = Packed(encoded, config.max_length, seed if config.shuffle else None)  # type: ignore[assignment]
        self.encoded = encoded
        self.config = config
        self.pad_id = pad_id
        self.seed = seed
        self.causal = causal
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.encoded)))
            if self.config.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}  # keep one epoch: memory stays O(dataset)
        return self._orders[epoch]

    def _indices(self, index: int) -> list[int]:
        if self.config.streaming:  # positions in the stream, which shuffles and wraps epochs itself
            return list(range(index * self.config.batch_size, (index + 1) * self.config.batch_size))
        size, n = self.config.batch_size, len(self.encoded)
        return [self._order(k // n)[k % n] for k in range(index * size, (index + 1) * size)]

    def counts(self, index: int) -> tuple[int, int]:
        """``(targets, tokens)`` of ``batch(index)``: ``loss_mask`` and ``attention_mask`` sums,
        counted from the encoded lists so the loop never reads a tensor for them."""
        rows = [self.encoded[i] for i in self._indices(index)]
        tokens = sum(len(ids) for ids, _ in rows)
        if not self.causal:
            return tokens, tokens
        return sum(target_count(labels) for _, labels in rows), tokens

    def batch(self, index: int) -> dict[str, Tensor]:
        indices = self._indices(index)
        batch = collate([self.encoded[i] for i in indices], self.pad_id, self.causal)
        batch["example_index"] = torch.tensor(indices, dtype=torch.long)
        if self.config.packing:  # per-example positions: forward_with_taps masks block-diagonally
            batch["position_ids"] = self.encoded.position_ids(indices, batch["input_ids"].shape[1])  # type: ignore[attr-defined]
        return batch

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        index = 0
        while True:
            yield self.batch(index)
            index += 1
