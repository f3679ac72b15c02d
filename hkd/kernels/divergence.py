"""The one KL helper outside the loss kernels.

Stages, probes and evaluation compare two distributions given as log-probabilities over their
last dimension (attention rows, vocabularies, top-k targets). The loss kernels
(:mod:`hkd.kernels`) compute the same quantity fused with softmax for large vocabularies;
this is the plain version for everything else.
"""

from __future__ import annotations

import torch
from torch import Tensor


def kl_divergence(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """``KL(p || q) = sum p (log p - log q)`` over the last dimension.

    Entries where ``p`` is 0 contribute 0 even where ``q`` is 0 too (masked attention keys,
    vocabulary outside a top-k), instead of the NaN that ``0 * (-inf - -inf)`` would give.
    """
    p = p_logp.exp()
    terms = p * (p_logp - q_logp)
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(-1)
