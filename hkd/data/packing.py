"""Packing: several examples in one row of at most ``data.max_length`` tokens.

``data.packing: true`` concatenates consecutive examples (in a seeded shuffled order when
``data.shuffle``) into rows of at most ``data.max_length`` tokens. Each example keeps its own
position ids (0, 1, ...), which transformers turns into a block-diagonal causal mask, so no
token attends across an example boundary; the first token of each example is never a target,
so no loss crosses one either. A packed batch carries ``position_ids`` and its
``attention_mask`` marks real tokens; :func:`hkd.models.taps.forward_with_taps` runs it without a 2-D
mask so transformers detects the packing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hkd.data.hf import HFEncoded
from hkd.data.labels import IGNORE_INDEX


class Packed(Sequence[tuple[list[int], list[int]]]):
    """Examples packed into rows of at most ``max_length`` tokens (see the module docstring).

    ``packed[j] == (ids, labels)`` of row ``j``; :meth:`position_ids` gives the rows' position
    ids, restarting at 0 for every example (and for the padding after the last one).
    """

    def __init__(self, encoded: Sequence[tuple[list[int], list[int]]], max_length: int, seed: int | None) -> None:
        self.encoded = encoded
        lengths = encoded.lengths() if isinstance(encoded, HFEncoded) else np.array([len(ids) for ids, _ in encoded])
        order = np.arange(len(lengths), dtype=np.int64)
        if seed is not None:
            np.random.default_rng(seed).shuffle(order)
        starts, used = [0], 0
        for position, length in enumerate(lengths[order].tolist()):
            if used + length > max_length and used > 0:
                starts.append(position)
                used = 0
            used += length
        starts.append(len(order))
        self.order = order
        self.starts = np.asarray(starts, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def _examples(self, row: int) -> list[tuple[list[int], list[int]]]:
        return [self.encoded[int(i)] for i in self.order[self.starts[row]: self.starts[row + 1]]]

    def __getitem__(self, row: int | slice) -> Any:
        if isinstance(row, slice):
            return [self[r] for r in range(len(self))[row]]
        ids: list[int] = []
        labels: list[int] = []
        for example_ids, example_labels in self._examples(row):
            ids += example_ids
            labels += [IGNORE_INDEX] + example_labels[1:]  # an example's first token is never a target
        return ids, labels

    def position_ids(self, rows: list[int], width: int) -> Tensor:
        """``[len(rows), width]`` position ids; padding continues as its own segment from 0."""
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            values = [p for ids, _ in self._examples(row) for p in range(len(ids))]
            values += range(width - len(values))
            positions[r] = torch.tensor(values, dtype=torch.long)
        return positions
