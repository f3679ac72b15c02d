"""The readable torch reference for both loss ops (fp32 accumulation, autograd backward).

Per row (token) ``i`` with temperature ``T`` and ``P = softmax(z / T)``:

* ``forward_kl`` = KL(P_t || P_s) = Σ_v P_t (log P_t - log P_s)
* ``reverse_kl`` = KL(P_s || P_t)
* ``jsd`` (generalized, weight ``beta``) = beta·KL(P_t || M) + (1-beta)·KL(P_s || M),
  M = beta·P_t + (1-beta)·P_s. At the end points this is identically 0, so — as in TRL's
  ``generalized_jsd_loss`` — ``beta=0`` means forward KL and ``beta=1`` means reverse KL
  (the limits of JSD_beta/beta and JSD_beta/(1-beta)).
* ``skew_forward_kl`` (weight ``skew`` = a) = KL(P_t || a·P_t + (1-a)·P_s) and
  ``skew_reverse_kl`` = KL(P_s || a·P_s + (1-a)·P_t): the skew KL and skew reverse KL of
  DistiLLM (Ko et al., ICML 2024: ``SKL_a(p, q) = KL(p || a p + (1-a) q)`` with p the
  teacher, ``SRKL_a(p, q) = KL(q || (1-a) p + a q)``, as in their ``distillm/losses.py``; the
  paper uses a = 0.1). Mixing the other distribution into the second argument bounds the
  log-ratio by ``log(1/a)``, so a student token of probability ~0 does not blow the loss up.
  ``skew=0`` is plain forward / reverse KL; ``skew=1`` would be identically 0, so ``ops``
  accepts ``0 <= skew < 1``. (DistiLLM's own ``skewed_forward_kl`` code drops the
  teacher-entropy constant; here the value is the KL itself, which is 0 when the distributions
  agree; the gradient is the same.)

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


def _log_mixture(log_pt: Tensor, log_ps: Tensor, weight: float) -> Tensor:
    """``log(weight·P_t + (1-weight)·P_s)`` for ``0 < weight < 1``, in log space. Where both
    probabilities are 0 (-inf logits) logaddexp's gradient is NaN, so those entries (whose terms
    are masked anyway) get a dummy 0 inside."""
    mass = (log_pt > float("-inf")) | (log_ps > float("-inf"))
    return torch.where(mass, torch.logaddexp(torch.where(mass, log_pt, 0.0) + math.log(weight),
                                             torch.where(mass, log_ps, 0.0) + math.log(1 - weight)), float("-inf"))


def soft_divergence(student_logits: Tensor, teacher_logits: Tensor, divergence: str, beta: float, temperature: float,
                    skew: float = 0.1) -> Tensor:
    """Per-row divergence between temperature-softened distributions, ``[N]``."""
    log_ps = tempered(student_logits, temperature).log_softmax(-1)
    log_pt = tempered(teacher_logits, temperature).log_softmax(-1)
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "skew_forward_kl" and skew == 0.0:
        divergence = "forward_kl"
    if divergence == "skew_reverse_kl" and skew == 0.0:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        return _xlogy_diff(log_pt.exp(), log_pt, log_ps)
    if divergence == "reverse_kl":
        return _xlogy_diff(log_ps.exp(), log_ps, log_pt)
    if divergence == "skew_forward_kl":  # KL(P_t || skew·P_t + (1-skew)·P_s)
        return _xlogy_diff(log_pt.exp(), log_pt, _log_mixture(log_pt, log_ps, skew))
    if divergence == "skew_reverse_kl":  # KL(P_s || skew·P_s + (1-skew)·P_t)
        return _xlogy_diff(log_ps.exp(), log_ps, _log_mixture(log_pt, log_ps, 1 - skew))
    log_m = _log_mixture(log_pt, log_ps, beta)
    return beta * _xlogy_diff(log_pt.exp(), log_pt, log_m) + (1 - beta) * _xlogy_diff(log_ps.exp(), log_ps, log_m)


def row_losses(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, *, ignore_index: int,
               divergence: str, beta: float, temperature: float, scale_t2: bool, alpha: float,
               skew: float = 0.1) -> Tensor:
    """``[N]`` per-row losses (ignored rows are 0) from ``[N, V]`` logits."""
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    student = student_logits.to(acc)
    teacher = teacher_logits.detach().to(acc)
    if labels is not None:  # ignored rows may hold anything (NaN padding): keep it out of loss and grad
        keep = (labels != ignore_index)[:, None]
        student, teacher = torch.where(keep, student, 0.0), torch.where(keep, teacher, 0.0)
    loss = soft_divergence(student, teacher, divergence, beta, temperature, skew)
    if scale_t2:
        loss = loss * temperature**2
    if labels is None:
        return loss
    valid = labels != ignore_index
    if alpha > 0:
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        ce = -student.log_softmax(-1).gather(-1, safe[:, None]).squeeze(-1)  # not lse - z: both round at 1e4
        loss = (1 - alpha) * loss + alpha * ce
    return torch.where(valid, loss, torch.zeros_like(loss))


def distill_loss_torch(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, **options) -> Tensor:
    """``[N]`` per-row losses; the public wrapper applies the reduction."""
    return row_losses(student_logits, teacher_logits, labels, **options)


def operand_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The precision of the fused LM head's GEMM operands, the same in every backend: autocast's dtype
    when autocast is on for their device (what the model's own LM head would multiply in; fp64 is left
    alone, as autocast leaves it), else the wider of the two dtypes (an fp32 master weight with bf16
    hidden states multiplies in fp32). The products are summed and the logits kept in fp32 (fp64 for
    fp64) whatever the operands are: bf16 logits would be 0.25 apart at 64."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and torch.float64 not in (hidden.dtype, weight.dtype):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def rounded(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` rounded to ``dtype`` (kept in its own dtype), with the gradient passed straight through, so
    the reference rounds the operands as a bf16 GEMM does but never its own gradient."""
    if torch.promote_types(x.dtype, dtype) == dtype:  # dtype holds every value of x: nothing to round
        return x
    return x + (x.to(dtype).to(x.dtype) - x).detach()


def fused_linear_distill_loss_torch(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                                    teacher_weight: Tensor, labels: Tensor | None, *, student_bias: Tensor | None,
                                    teacher_bias: Tensor | None, weight_grad_fp32: bool = False, **options) -> Tensor:
    """Reference for the fused op: it *does* materialise both ``[N, V]`` logits tensors, from operands
    rounded to :func:`operand_dtype` and multiplied in fp32 (fp64 for fp64) with autocast off. Autograd
    sums every gradient in that dtype, so ``weight_grad_fp32`` (fp32 accumulation of ``grad_W``) is how
    this backend always works."""
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    s_dtype, t_dtype = operand_dtype(student_hidden, student_weight), operand_dtype(teacher_hidden, teacher_weight)
    with torch.autocast(student_hidden.device.type, enabled=False):
        student_logits = rounded(student_hidden, s_dtype).to(acc) @ rounded(student_weight, s_dtype).to(acc).T
        teacher_logits = (rounded(teacher_hidden.detach(), t_dtype).to(acc)
                          @ rounded(teacher_weight.detach(), t_dtype).to(acc).T)
        if student_bias is not None:
            student_logits = student_logits + student_bias.to(acc)
        if teacher_bias is not None:
            teacher_logits = teacher_logits + teacher_bias.detach().to(acc)
        return row_losses(student_logits, teacher_logits, labels, **options)


# --------------------------------------------------------------------------- sparse (top-k) teacher targets

def sparse_teacher_log_probs(topk_values: Tensor, teacher_logsumexp: Tensor | None, *, vocab: int, temperature: float,
                             tail: str) -> tuple[Tensor, Tensor | None]:
    """Tempered teacher log-probabilities on its ``k`` cached tokens ``[N, k]`` and, for ``tail="bucket"``,
    on the bucket of the other ``V - k`` tokens ``[N]`` (``None`` for ``renormalize``).

    ``renormalize``: ``log_softmax(values / T)`` over the ``k`` slots (the tail is dropped; values may be
    logits or log-probs, a per-row shift changes nothing). ``bucket``: at ``T = 1`` the cached values
    and the teacher's full log-normaliser ``L`` give exact probabilities ``q_j = exp(v_j - L)`` and the
    tail mass ``r = 1 - sum q_j``. Re-tempering needs each tail token's probability, which the cache
    does not hold, so the tail mass is taken as spread evenly over its ``m = V - k`` tokens:
    ``q_j^(1/T)`` for the cached tokens and ``m (r / m)^(1/T)`` for the bucket, renormalised. Exact
    at ``T = 1``; for ``T > 1`` it is the largest tail mass any spread could give (``x^(1/T)`` is
    concave), for ``T < 1`` the smallest. Slots whose value is ``-inf`` are empty (probability 0).
    """
    acc = torch.float64 if topk_values.dtype == torch.float64 else torch.float32
    v = topk_values.to(acc)
    if tail == "renormalize":
        return tempered(v, temperature).log_softmax(-1), None
    assert teacher_logsumexp is not None
    log_q1 = v - teacher_logsumexp.to(acc)[:, None]  # exact log-probabilities at T = 1
    covered = log_q1.logsumexp(-1)
    # log r = log(1 - exp(covered)); an exhausted tail (covered >= 0, rounding) is probability 0
    log_r = torch.where(covered < 0, torch.log(-torch.expm1(torch.clamp(covered, max=-1e-30))), float("-inf"))
    log_m = math.log(max(vocab - topk_values.shape[-1], 1))
    scaled = torch.cat([log_q1 / temperature, (log_m + (log_r - log_m) / temperature)[:, None]], dim=-1)
    log_all = scaled.log_softmax(-1)
    return log_all[:, :-1], log_all[:, -1]


def sparse_row_losses(student_logits: Tensor, topk_ids: Tensor, topk_values: Tensor, teacher_logsumexp: Tensor | None,
                      labels: Tensor | None, *, ignore_index: int, temperature: float, tail: str, scale_t2: bool,
                      alpha: float) -> Tensor:
    """``[N]`` per-row losses against sparse targets (autograd backward); see ``sparse_distill_loss``.

    ``soft = sum_j q_j (log q_j - log p_j) [+ q_tail (log q_tail - log p_tail)]`` with ``p = softmax(z_s / T)``
    over the whole vocabulary, ``p_j`` at the cached ids and ``p_tail`` the student's mass on all other
    tokens (a log-sum-exp over them, not ``1 - sum p_j``, which cancels when the top-k hold most mass).
    """
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    student = student_logits.to(acc)
    ids = topk_ids.long()
    keep = None if labels is None else labels != ignore_index
    if keep is not None:  # ignored rows may hold anything: compute on zeros / id 0, then zero them
        student = torch.where(keep[:, None], student, 0.0)
        ids = torch.where(keep[:, None], ids, 0)
        topk_values = torch.where(keep[:, None], topk_values, 0.0)
        if teacher_logsumexp is not None:
            teacher_logsumexp = torch.where(keep, teacher_logsumexp, 1.0)
    log_q, log_q_tail = sparse_teacher_log_probs(topk_values.detach(), None if teacher_logsumexp is None
                                                 else teacher_logsumexp.detach(), vocab=student.shape[-1],
                                                 temperature=temperature, tail=tail)
    log_p = tempered(student, temperature).log_softmax(-1)
    q = log_q.exp()
    soft = (q * torch.where(q > 0, log_q - log_p.gather(-1, ids), 0.0)).sum(-1)
    if log_q_tail is not None:
        log_p_tail = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1)
        q_tail = log_q_tail.exp()
        soft = soft + q_tail * torch.where(q_tail > 0, log_q_tail - log_p_tail, 0.0)
    loss = soft * ((1 - alpha) * (temperature**2 if scale_t2 else 1.0))
    if alpha > 0:
        assert labels is not None and keep is not None
        safe = torch.where(keep, labels, torch.zeros_like(labels))
        loss = loss - alpha * student.log_softmax(-1).gather(-1, safe[:, None]).squeeze(-1)
    return loss if keep is None else torch.where(keep, loss, torch.zeros_like(loss))


def logits_stage_sparse_loss(student_logits: Tensor, topk_values: Tensor, topk_ids: Tensor, labels: Tensor,
                             temperature: float, alpha: float, scale_t2: bool) -> Tensor:
    """The logits stage's summed top-k loss as written before this op existed (a copy of the
    formula, kept to pin ``sparse_distill_loss(tail="renormalize", reduction="sum")`` to it):
    teacher renormalised within its top-k, student log-probs over the full vocabulary."""
    keep = labels != -100
    student_logits = student_logits[keep].float()
    teacher_logp = (topk_values[keep].float() / temperature).log_softmax(-1)
    student_logp = (student_logits / temperature).log_softmax(-1).gather(-1, topk_ids[keep])
    soft = (teacher_logp.exp() * (teacher_logp - student_logp)).sum()
    if scale_t2:
        soft = soft * temperature**2
    if alpha == 0:
        return soft
    hard = torch.nn.functional.cross_entropy(student_logits, labels[keep], reduction="sum")
    return (1 - alpha) * soft + alpha * hard
