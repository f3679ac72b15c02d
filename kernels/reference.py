"""The readable torch reference for both loss ops (fp32 accumulation, autograd backward).

Per row (token) ``i`` with temperature ``T`` and ``P = softmax(z / T)``:

* ``forward_kl`` = KL(P_t || P_s) = Σ_v P_t (log P_t - log P_s)
* ``reverse_kl`` = KL(P_s || P_t)
* ``jsd`` (generalized, weight ``beta``) = beta·KL(P_t || M) + (1-beta)·KL(P_s || M),
  M = beta·P_t + (1-beta)·P_s. At the end points this is identically 0, so — as in TRL's
  ``generalized_jsd_loss`` — ``beta=0`` means forward KL and ``beta=1`` means reverse KL
  (the limits of JSD_beta/beta and JSD_beta/(1-beta)).

``loss_i = (1-alpha)·scale·soft_i + alpha·CE_i`` with ``scale = T²`` when ``scale_t2`` and
``CE_i`` the student's cross-entropy at temperature 1 against ``labels[i]``. Rows whose
label is ``ignore_index`` contribute 0 and are not counted by ``mean``. Terms with zero
probability mass contribute 0 (``0·log 0 = 0``); a NaN in a row's logits makes that row's
loss NaN (it is not hidden), and ``-inf`` logits are tokens of probability 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _xlogy_diff(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """Σ p (log p - log q) with 0 where p == 0 (also when log q is -inf there). The mask goes
    inside the product: masking after it would still send 0 * inf = NaN into the gradient."""
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)


def tempered(x: Tensor, temperature: float) -> Tensor:
    """``x / T`` shifted by the row max first (softmax ignores the shift): with logits that share a
    large offset, ``x / T`` alone rounds at the offset's scale when T is not a power of two."""
    if temperature == 1:
        return x
    return (x - x.detach().amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).min)) / temperature


def soft_divergence(student_logits: Tensor, teacher_logits: Tensor, divergence: str, beta: float, temperature: float) -> Tensor:
    """Per-row divergence between temperature-softened distributions, ``[N]``."""
    log_ps = tempered(student_logits, temperature).log_softmax(-1)
    log_pt = tempered(teacher_logits, temperature).log_softmax(-1)
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        return _xlogy_diff(log_pt.exp(), log_pt, log_ps)
    if divergence == "reverse_kl":
        return _xlogy_diff(log_ps.exp(), log_ps, log_pt)
    pt, ps = log_pt.exp(), log_ps.exp()
    # log M in log space; where both probabilities are 0 (-inf logits) logaddexp's gradient is
    # NaN, so those entries (whose terms are masked anyway) get a dummy 0 inside.
    mass = (pt > 0) | (ps > 0)
    log_m = torch.where(mass, torch.logaddexp(torch.where(mass, log_pt, 0.0) + math.log(beta),
                                              torch.where(mass, log_ps, 0.0) + math.log(1 - beta)), float("-inf"))
    return beta * _xlogy_diff(pt, log_pt, log_m) + (1 - beta) * _xlogy_diff(ps, log_ps, log_m)


def row_losses(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, *, ignore_index: int,
               divergence: str, beta: float, temperature: float, scale_t2: bool, alpha: float) -> Tensor:
    """``[N]`` per-row losses (ignored rows are 0) from ``[N, V]`` logits."""
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    student = student_logits.to(acc)
    teacher = teacher_logits.detach().to(acc)
    if labels is not None:  # ignored rows may hold anything (NaN padding): keep it out of loss and grad
        keep = (labels != ignore_index)[:, None]
        student, teacher = torch.where(keep, student, 0.0), torch.where(keep, teacher, 0.0)
    loss = soft_divergence(student, teacher, divergence, beta, temperature)
    if scale_t2:
        loss = loss * temperature**2
    if labels is None:
        return loss
    valid = labels != ignore_index
    if alpha > 0:
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        ce = student.logsumexp(-1) - student.gather(-1, safe[:, None]).squeeze(-1)
        loss = (1 - alpha) * loss + alpha * ce
    return torch.where(valid, loss, torch.zeros_like(loss))


def distill_loss_torch(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, **options) -> Tensor:
    """``[N]`` per-row losses; the public wrapper applies the reduction."""
    return row_losses(student_logits, teacher_logits, labels, **options)


def fused_linear_distill_loss_torch(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                                    teacher_weight: Tensor, labels: Tensor | None, *, student_bias: Tensor | None,
                                    teacher_bias: Tensor | None, **options) -> Tensor:
    """Reference for the fused op: it *does* materialise both ``[N, V]`` logits tensors."""
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    student_logits = student_hidden.to(acc) @ student_weight.to(acc).T
    teacher_logits = teacher_hidden.detach().to(acc) @ teacher_weight.detach().to(acc).T
    if student_bias is not None:
        student_logits = student_logits + student_bias.to(acc)
    if teacher_bias is not None:
        teacher_logits = teacher_logits + teacher_bias.detach().to(acc)
    return row_losses(student_logits, teacher_logits, labels, **options)
