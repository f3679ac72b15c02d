"""The label conventions every stage, sampler and metric shares, named once.

* :data:`IGNORE_INDEX` (``-100``, what ``torch.nn.functional.cross_entropy`` ignores by default):
  the label of a token no loss counts: the prompt, padding, and template text outside the
  assistant's turns.
* The shift: a causal LM's logits at position ``i`` predict token ``i + 1``, so
  ``logits[:, :-1]`` lines up with :func:`next_token_labels` (``labels[:, 1:]``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

IGNORE_INDEX = -100


def next_token_labels(labels: Tensor) -> Tensor:
    """``[B, S-1]``: the label each position's prediction is scored on (``labels[:, 1:]``, the
    counterpart of ``logits[:, :-1]``)."""
    return labels[:, 1:]


def next_token_targets(labels: Tensor) -> Tensor:
    """``[B, S-1]`` bool: positions whose next token is a target (not :data:`IGNORE_INDEX`)."""
    return next_token_labels(labels) != IGNORE_INDEX
