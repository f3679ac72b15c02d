r"""Chunked torch backend for ``sparse_distill_loss``: student logits against cached top-k teacher targets.

Per row, with :math:`p = \mathrm{softmax}(z_s/T)` over the whole vocabulary, teacher targets
:math:`q_j` on the ``k`` cached ids (and :math:`q_\text{tail}` on the bucket of all other tokens
with ``tail="bucket"``; both from :func:`hkd.kernels.reference.sparse_teacher_log_probs`, only
``[N, k]``), the soft term is

.. math:: \sum_j q_j(\log q_j - \log p_{id_j}) + q_\text{tail}(\log q_\text{tail} - \log p_\text{tail}),
          \qquad \log p_\text{tail} = \operatorname{logsumexp}_{v \notin ids} \log p_v .

Since :math:`\sum_j q_j + q_\text{tail} = 1`, its gradient w.r.t. the tempered logits is

* a cached token: :math:`p_v - q_v` (``renormalize`` is the case :math:`q_\text{tail} = 0`);
* any other token: :math:`p_v - q_\text{tail}\, p_v / p_\text{tail}`;

times :math:`(1-\alpha)c/T`, plus :math:`\alpha(\mathrm{softmax}(z_s) - \mathrm{onehot})` for the
cross-entropy term, exactly as :mod:`hkd.kernels.chunked` does for dense targets: one row block
(about 4M elements) at a time, the gradient written during the forward into one ``[N, V]`` buffer
of the student's dtype, scaled by the upstream gradient (fp32) in the backward. The cached ids of
a row must be distinct for ``bucket`` (top-k ids are); ``renormalize`` counts a repeated id twice,
like the formula it reproduces.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import chunked
from .chunked import StoredGradLoss, accumulation_dtype, hard_labels_and_mask, tempered
from .reference import sparse_teacher_log_probs


class SparseOptions(NamedTuple):
    ignore_index: int
    temperature: float
    tail: str
    scale_t2: bool
    alpha: float

    @property
    def soft_weight(self) -> float:
        return (1.0 - self.alpha) * (self.temperature**2 if self.scale_t2 else 1.0)


def block_loss_and_grad(student: Tensor, ids: Tensor, values: Tensor, teacher_lse: Tensor | None,
                        labels: Tensor | None, o: SparseOptions, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Row losses ``[R]`` and their gradient w.r.t. the student logits ``[R, V]`` (accumulation dtype)."""
    acc = accumulation_dtype(student)
    s = student.to(acc)
    keep = None if labels is None else labels != o.ignore_index
    if keep is not None:  # ignored rows may hold NaN padding and garbage ids: compute on zeros / id 0
        s = torch.where(keep[:, None], s, 0.0)
        ids = torch.where(keep[:, None], ids, 0)
        values = torch.where(keep[:, None], values, 0.0)
        if teacher_lse is not None:
            teacher_lse = torch.where(keep, teacher_lse, 1.0)
    log_q, log_q_tail = sparse_teacher_log_probs(values, teacher_lse, vocab=s.shape[-1], temperature=o.temperature,
                                                 tail=o.tail)
    log_q = log_q.to(acc)
    q = log_q.exp()
    log_p = F.log_softmax(tempered(s, o.temperature), dim=-1)
    loss = (q * torch.where(q > 0, log_q - log_p.gather(-1, ids), 0.0)).sum(-1)
    rest = q_tail = log_p_tail = None
    if log_q_tail is not None:
        rest = log_p.scatter(-1, ids, float("-inf"))  # log p of the tail tokens, -inf at the cached ids
        log_p_tail = rest.logsumexp(-1)
        q_tail = log_q_tail.to(acc).exp()
        loss = loss + q_tail * torch.where(q_tail > 0, log_q_tail.to(acc) - log_p_tail, 0.0)
    loss = loss * o.soft_weight
    grad = None
    if need_grad:
        grad = log_p.exp_().scatter_add_(-1, ids, -q)  # p - q on the cached ids, p elsewhere
        if rest is not None:
            assert q_tail is not None and log_p_tail is not None
            # -q_tail * p_v / p_tail on tail tokens (exp(-inf) = 0 on the cached ids)
            # (no tail tokens at k = V: log p_tail = -inf, clamped so that -inf - (-inf) gives no NaN)
            floor = torch.finfo(acc).min
            grad.sub_(rest.sub_(log_p_tail.clamp_min(floor)[:, None]).exp_().mul_(q_tail[:, None]))
        grad.mul_(o.soft_weight / o.temperature)
    return hard_labels_and_mask(loss, grad, s, labels, keep, o.alpha)


def sparse_block_pass(student: Tensor, targets: tuple[Tensor, Tensor, Tensor | None], labels: Tensor | None,
                      o: SparseOptions, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Row losses ``[N]`` and the ``[N, V]`` gradient (student dtype), one row block at a time."""
    ids, values, teacher_lse = targets
    n, vocab = student.shape
    rows = torch.empty(n, dtype=accumulation_dtype(student), device=student.device)
    grad = torch.empty_like(student) if need_grad else None
    step = max(1, chunked.BLOCK_ELEMENTS // max(vocab, 1))
    for i in range(0, n, step):
        j = min(i + step, n)
        loss, g = block_loss_and_grad(student[i:j], ids[i:j], values[i:j],
                                      None if teacher_lse is None else teacher_lse[i:j],
                                      None if labels is None else labels[i:j], o, need_grad)
        rows[i:j] = loss
        if grad is not None and g is not None:
            grad[i:j] = g
    return rows, grad


def exact_bucket_inputs(values: Tensor, logsumexp: Tensor, temperature: float, vocab: int) -> tuple[Tensor, Tensor]:
    r"""``(values', logsumexp')`` for ``sparse_distill_loss(tail="bucket", temperature=T)`` such that it
    compares the student with the teacher's **exact** tempered targets.

    Input: raw teacher logits ``values [..., k]`` and ``logsumexp [...]`` = the teacher's full
    :math:`\log\sum_v e^{z_v/T}` at this ``T`` (what a cache built at ``T`` stores), so
    :math:`q_j = e^{v_j/T - L_T}` and the tail :math:`q_t = 1 - \sum_j q_j` are exact. The kernels
    take a log-normaliser at ``T = 1`` and re-temper (:math:`q_j^{1/T}`, the tail as if spread evenly
    over its :math:`m = V - k` tokens), which is exact only at ``T = 1``. Feeding them
    :math:`v'_j = T(\log q_j + c)` and :math:`L' = 0` with
    :math:`Tc = -\log(\sum_j q_j^T + m^{1-T} q_t^T)` makes their re-tempering land on exactly
    :math:`(q_j, q_t)`: their "tail at ``T = 1``" is :math:`r' = m^{1-T} q_t^T e^{Tc}`, and
    :math:`m (r'/m)^{1/T} = q_t e^c`, beside :math:`e^{v'_j/T} = q_j e^c`. At ``T = 1`` the inputs
    are returned as they are.
    """
    if temperature == 1.0:
        return values, logsumexp
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    t = float(temperature)
    log_q = values.to(acc) / t - logsumexp.to(acc)[..., None]
    covered = log_q.logsumexp(-1)
    # log q_t = log(1 - sum q_j); an exhausted tail (rounding: covered >= 0) is probability 0
    log_tail = torch.where(covered < 0, torch.log(-torch.expm1(torch.clamp(covered, max=-1e-30))), float("-inf"))
    log_m = math.log(max(vocab - values.shape[-1], 1))
    tc = -torch.logaddexp((t * log_q).logsumexp(-1), (1 - t) * log_m + t * log_tail)
    return t * log_q + tc[..., None], torch.zeros_like(logsumexp, dtype=acc)


def chunked_sparse_row_losses(student_logits: Tensor, topk_ids: Tensor, topk_values: Tensor,
                              teacher_logsumexp: Tensor | None, labels: Tensor | None, **options: Any) -> Tensor:
    """``sparse_distill_loss`` backend: per-row losses ``[N]`` (fp32)."""
    targets = (topk_ids, topk_values.detach(), None if teacher_logsumexp is None else teacher_logsumexp.detach())
    return StoredGradLoss.apply(sparse_block_pass, student_logits, targets, labels, SparseOptions(**options))
