"""The public loss ops: validation, backend dispatch and reduction (re-exported by hkd.kernels).

Public API (stable)::

    distill_loss(student_logits, teacher_logits, *, labels=None, ignore_index=-100,
                 divergence="forward_kl", beta=0.5, skew=0.1, temperature=1.0, scale_t2=True,
                 alpha=0.0, reduction="mean", backend="auto")
    fused_linear_distill_loss(student_hidden, student_lm_head_weight, teacher_hidden,
                              teacher_lm_head_weight, *, student_bias=None, teacher_bias=None,
                              <same options>, weight_grad_fp32=False)
    backends(op)
    check_request(op, backend, *, chosen_by, where, elsewhere=None, **options)  # build time

The math is documented in :mod:`hkd.kernels.reference`. Backends compute per-row losses
``[N]``; this module validates inputs, flattens leading dims and applies the reduction, so
every backend shares one definition of ``mean`` (divide by non-ignored rows; 0 rows -> 0).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from hkd.kernels import registry
from hkd.kernels.reference import distill_loss_torch, fused_linear_distill_loss_torch, sparse_row_losses
from hkd.kernels.registry import KernelBackend, Option, check_request, differs, get_backend, maybe, register_backend

OPS = ("distill_loss", "fused_linear_distill_loss", "sparse_distill_loss")
TAILS = ("renormalize", "bucket")
SKEW_DIVERGENCES = ("skew_forward_kl", "skew_reverse_kl")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", *SKEW_DIVERGENCES)
REDUCTIONS = ("mean", "sum", "none")

# What each op passes its backends by keyword, with the op's defaults, and when a backend whose
# function does not take an option would compute something else (then it cannot serve that
# request: registry.refusal). Options added to an op later belong here, with the value at which
# they change nothing, so backends written before them keep working where they give the same math.
_T_AND_ALPHA = {
    "temperature": Option(1.0, lambda r: ("temperature",) if differs(r["temperature"], 1.0) else ()),
    "scale_t2": Option(True, lambda r: ("scale_t2", "temperature") if differs(r["temperature"], 1.0) else ()),
    "alpha": Option(0.0, lambda r: ("alpha",) if differs(r["alpha"], 0.0) else ()),
}
_SOFT_OPTIONS = {
    "ignore_index": Option(-100, lambda r: ("ignore_index",)),  # labels may hold it: the backend must know
    "divergence": Option("forward_kl", lambda r: ("divergence",)),
    "beta": Option(0.5, lambda r: ("divergence", "beta") if maybe(r["divergence"], "jsd") else ()),
    "skew": Option(0.1, lambda r: ("divergence", "skew") if maybe(r["divergence"], *SKEW_DIVERGENCES) else ()),
    **_T_AND_ALPHA,
}
registry.define_op("distill_loss", positional=3, divergences=DIVERGENCES, options=_SOFT_OPTIONS)
registry.define_op("fused_linear_distill_loss", positional=5, divergences=DIVERGENCES, options={
    "student_bias": Option(None, lambda r: ("student_bias",) if r["student_bias"] is not None else ()),
    "teacher_bias": Option(None, lambda r: ("teacher_bias",) if r["teacher_bias"] is not None else ()),
    **_SOFT_OPTIONS,
    # asks for more precision than a backend without it promises, so only False may be dropped
    "weight_grad_fp32": Option(False, lambda r: ("weight_grad_fp32",) if differs(r["weight_grad_fp32"], False) else ()),
})
registry.define_op("sparse_distill_loss", positional=5, divergences=("forward_kl",), options={
    "ignore_index": _SOFT_OPTIONS["ignore_index"],
    "tail": Option("renormalize", lambda r: ("tail",) if differs(r["tail"], "renormalize") else ()),
    **_T_AND_ALPHA,
})



def _lazy(module: str, attr: str) -> Callable[..., Tensor]:
    """Import ``hkd.kernels.<module>`` on first call: keeps ``import hkd.kernels`` light and lets
    tests set ``TRITON_INTERPRET`` before triton is imported."""
    def call(*args: Any, **kwargs: Any) -> Tensor:
        return getattr(importlib.import_module(f"hkd.kernels.{module}"), attr)(*args, **kwargs)

    call.__qualname__ = call.__name__ = f"{module}.{attr}"
    return call


def triton_available() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "no CUDA device (on CPU set TRITON_INTERPRET=1 before importing triton; slow, for tests)"
    return True, ""


def _all_cuda(*tensors: Tensor) -> bool:
    return all(t.is_cuda for t in tensors)


for _op, _reference, _chunked, _triton in (
    ("distill_loss", distill_loss_torch, ("chunked", "chunked_row_losses"), ("softmax_kl", "triton_row_losses")),
    ("fused_linear_distill_loss", fused_linear_distill_loss_torch, ("chunked", "chunked_fused_row_losses"),
     ("fused_linear_kl", "triton_fused_row_losses")),
):
    register_backend(KernelBackend(_op, "torch", _reference, priority=0), replace=True)
    register_backend(KernelBackend(_op, "chunked", _lazy(*_chunked), priority=10), replace=True)
    register_backend(KernelBackend(_op, "triton", _lazy(*_triton), priority=20, is_available=triton_available,
                                   supports=_all_cuda), replace=True)


register_backend(KernelBackend("sparse_distill_loss", "torch", sparse_row_losses, priority=0), replace=True)
register_backend(KernelBackend("sparse_distill_loss", "chunked", _lazy("sparse", "chunked_sparse_row_losses"),
                               priority=10), replace=True)
register_backend(KernelBackend("sparse_distill_loss", "triton", _lazy("sparse_kl", "triton_sparse_row_losses"),
                               priority=20, is_available=triton_available, supports=_all_cuda), replace=True)


def backends(op: str) -> list[dict[str, Any]]:
    """Backends of ``op``: name, available (and why not), priority, and which one ``auto`` picks here."""
    return registry.backends(op)


def _check_options(divergence: str, beta: float, temperature: float, alpha: float, reduction: str, labels: Tensor | None,
                   skew: float = 0.1) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; use one of {list(DIVERGENCES)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; use one of {list(REDUCTIONS)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= skew < 1.0:  # also catches NaN
        raise ValueError(f"skew must be in [0, 1), got {skew} (skew=0 is plain KL; at skew=1 the skew divergences "
                         "are identically 0 and would train nothing)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha > 0 and labels is None:
        raise ValueError("alpha > 0 mixes in cross-entropy on labels, so labels are required")


def _reduce(rows: Tensor, labels: Tensor | None, ignore_index: int, reduction: str, lead_shape: torch.Size) -> Tensor:
    if reduction == "none":
        return rows.reshape(lead_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    if labels is None:
        return total / max(rows.numel(), 1)
    # the count stays on the device (no host sync); no real token: 0 with zero gradient, never NaN
    return total / (labels != ignore_index).sum().clamp_min(1)


def _flat_labels(labels: Tensor | None, lead_shape: torch.Size, vocab: int, ignore_index: int,
                 alpha: float) -> tuple[Tensor | None, Tensor | None]:
    """Labels as ``[N]`` int64, and (CUDA, ``alpha > 0``) a mask of rows whose label is out of range.

    The cross-entropy term indexes the vocabulary with the labels, so an out-of-range one would
    make a kernel read out of bounds. On CPU such labels raise here (a check costs nothing there);
    on CUDA a check would stall the host until the device catches up, so instead those rows are
    handed to the backend as ignored and their loss comes back NaN (with zero gradient)."""
    if labels is None:
        return None, None
    if labels.shape != lead_shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the logits' leading shape is {tuple(lead_shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer token ids, got {labels.dtype}")
    flat = labels.reshape(-1).long()
    if alpha == 0:
        return flat, None
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= vocab))
    if not flat.is_cuda:
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels must be token ids in [0, {vocab}) or ignore_index={ignore_index}; "
                             f"row {first} has {int(flat[first])} ({int(bad.sum())} such rows)")
        return flat, None
    return torch.where(bad, ignore_index, flat), bad


def _mark_bad(rows: Tensor, bad: Tensor | None) -> Tensor:
    return rows if bad is None else torch.where(bad, float("nan"), rows)


def _check_floating(**tensors: Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and not tensor.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, *, labels: Tensor | None = None,
                 ignore_index: int = -100, divergence: str = "forward_kl", beta: float = 0.5,
                 skew: float = 0.1, temperature: float = 1.0, scale_t2: bool = True, alpha: float = 0.0,
                 reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Distillation loss between student and teacher logits ``[..., V]`` (leading dims are rows).

    Per row: ``(1 - alpha) * c * D(P_t, P_s) + alpha * CE(z_s, label)`` with ``P = softmax(z / T)``,
    ``c = T**2`` if ``scale_t2`` else 1, and ``CE`` the student's cross-entropy at T = 1.
    ``divergence``: ``forward_kl`` = KL(P_t||P_s), ``reverse_kl`` = KL(P_s||P_t), ``jsd`` =
    beta KL(P_t||M) + (1-beta) KL(P_s||M) with M = beta P_t + (1-beta) P_s; at ``beta=0`` / ``1``
    that formula is identically 0, so (TRL's ``generalized_jsd_loss`` convention) ``jsd`` means
    forward / reverse KL there. ``skew_forward_kl`` = KL(P_t || skew P_t + (1-skew) P_s) and
    ``skew_reverse_kl`` = KL(P_s || skew P_s + (1-skew) P_t) (DistiLLM's skew KL / skew reverse
    KL, Ko et al. 2024; ``0 <= skew < 1``, default 0.1 as in the paper; ``skew=0`` is plain
    forward / reverse KL; other divergences ignore it). Rows whose label is ``ignore_index``
    count for nothing.
    ``reduction``: ``mean`` over non-ignored rows (none left -> 0.0 with a zero gradient),
    ``sum``, or ``none`` (shape ``[...]``, ignored rows 0). The result is fp32; only
    ``student_logits`` gets a gradient (same dtype as it). ``-inf`` logits are zero-probability
    tokens; NaN / +inf logits make their row NaN; ignored rows stay 0 whatever they hold.
    ``backend``: ``auto`` (best available for these tensors), ``torch``, ``chunked``, ``triton``
    or a plugin's; see :func:`backends`.
    """
    _check_floating(student_logits=student_logits, teacher_logits=teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
            + (f" (vocab sizes {student_logits.shape[-1]} vs {teacher_logits.shape[-1]})"
               if student_logits.shape[-1] != teacher_logits.shape[-1] else "")
        )
    _check_options(divergence, beta, temperature, alpha, reduction, labels, skew)
    lead = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    flat_labels, bad = _flat_labels(labels, lead, vocab, ignore_index, alpha)
    student, teacher = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    options = dict(ignore_index=ignore_index, divergence=divergence, beta=beta, skew=skew, temperature=temperature,
                   scale_t2=scale_t2, alpha=alpha)
    chosen = registry.resolve("distill_loss", backend, student, teacher, request=options)
    rows = chosen.call(student, teacher, flat_labels, **options)
    return _reduce(_mark_bad(rows, bad), flat_labels, ignore_index, reduction, lead)


def fused_linear_distill_loss(student_hidden: Tensor, student_lm_head_weight: Tensor, teacher_hidden: Tensor,
                              teacher_lm_head_weight: Tensor, *, student_bias: Tensor | None = None,
                              teacher_bias: Tensor | None = None, labels: Tensor | None = None,
                              ignore_index: int = -100, divergence: str = "forward_kl", beta: float = 0.5,
                              skew: float = 0.1, temperature: float = 1.0, scale_t2: bool = True, alpha: float = 0.0,
                              reduction: str = "mean", backend: str = "auto", weight_grad_fp32: bool = False) -> Tensor:
    """:func:`distill_loss` of the LM-head logits ``hidden @ W.T (+ b)`` without building ``[N, V]`` logits.

    ``student_hidden [..., Hs]`` with ``student_lm_head_weight [V, Hs]``, ``teacher_hidden [..., Ht]``
    with ``teacher_lm_head_weight [V, Ht]`` (hidden sizes may differ; biases are ``[V]``).
    Gradients reach ``student_hidden``, ``student_lm_head_weight`` and ``student_bias`` only, each
    in its tensor's dtype (an fp32 master weight with bf16 hidden states gets an fp32 gradient).

    Precision, the same in every built-in backend: the GEMM operands are rounded to autocast's
    dtype when autocast is on for their device (``train.precision: bf16-mixed``), else to the wider
    of hidden and weight dtype (:func:`hkd.kernels.reference.operand_dtype`); products are summed
    in fp32 and the logits and their softmax are fp32 whatever the inputs. ``weight_grad_fp32``:
    sum the weight gradient over row chunks in fp32 even for a bf16 / fp16 weight (rounded once at
    the end; costs an fp32 ``[V, H]`` buffer), instead of in the weight's own dtype.
    """
    _check_floating(student_hidden=student_hidden, student_lm_head_weight=student_lm_head_weight,
                    teacher_hidden=teacher_hidden, teacher_lm_head_weight=teacher_lm_head_weight,
                    student_bias=student_bias, teacher_bias=teacher_bias)
    if student_lm_head_weight.dim() != 2 or teacher_lm_head_weight.dim() != 2:
        raise ValueError(f"LM-head weights must be [V, H]; got {tuple(student_lm_head_weight.shape)} (student) "
                         f"and {tuple(teacher_lm_head_weight.shape)} (teacher)")
    if student_lm_head_weight.shape[0] != teacher_lm_head_weight.shape[0]:
        raise ValueError(
            f"vocab sizes differ: student LM head has {student_lm_head_weight.shape[0]} rows, "
            f"teacher {teacher_lm_head_weight.shape[0]}"
        )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
                         f"{tuple(teacher_hidden.shape)} have different leading shapes")
    for name, hidden, weight in (("student", student_hidden, student_lm_head_weight),
                                 ("teacher", teacher_hidden, teacher_lm_head_weight)):
        if hidden.shape[-1] != weight.shape[1]:
            raise ValueError(f"{name} hidden size {hidden.shape[-1]} does not match its LM head {tuple(weight.shape)}")
    for name, bias in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if bias is not None and bias.shape != student_lm_head_weight.shape[:1]:
            raise ValueError(f"{name} must have shape ({student_lm_head_weight.shape[0]},), got {tuple(bias.shape)}")
    _check_options(divergence, beta, temperature, alpha, reduction, labels, skew)
    lead = student_hidden.shape[:-1]
    flat_labels, bad = _flat_labels(labels, lead, student_lm_head_weight.shape[0], ignore_index, alpha)
    s_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    t_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    options = dict(student_bias=student_bias, teacher_bias=teacher_bias, ignore_index=ignore_index,
                   divergence=divergence, beta=beta, skew=skew, temperature=temperature, scale_t2=scale_t2, alpha=alpha,
                   weight_grad_fp32=weight_grad_fp32)
    chosen = registry.resolve("fused_linear_distill_loss", backend, s_hidden, student_lm_head_weight, t_hidden,
                              teacher_lm_head_weight, request=options)
    rows = chosen.call(s_hidden, student_lm_head_weight, t_hidden, teacher_lm_head_weight, flat_labels, **options)
    return _reduce(_mark_bad(rows, bad), flat_labels, ignore_index, reduction, lead)


def sparse_distill_loss(student_logits: Tensor, topk_ids: Tensor, topk_values: Tensor, labels: Tensor | None = None,
                        *, temperature: float = 1.0, tail: str = "renormalize", teacher_logsumexp: Tensor | None = None,
                        divergence: str = "forward_kl", alpha: float = 0.0, scale_t2: bool = True,
                        ignore_index: int = -100, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Distillation loss of student logits ``[..., V]`` against sparse teacher targets: the teacher's
    logits ``topk_values [..., k]`` at token ids ``topk_ids [..., k]`` (an offline cache, a teacher
    served elsewhere). Only ``divergence="forward_kl"``: the other divergences need the teacher's
    whole distribution.

    Per row: ``(1 - alpha) * c * soft + alpha * CE(z_s, label)`` with ``c = T**2`` if ``scale_t2``,
    ``P_s = softmax(z_s / T)`` over the full vocabulary and the teacher tempered from its cached values:

    * ``tail="renormalize"``: ``q = softmax(topk_values / T)`` over the ``k`` slots (the tail is
      dropped); ``soft = sum_j q_j (log q_j - log P_s[id_j])``. This is the logits stage's top-k loss.
      Values may be logits or log-probs (a per-row shift cancels).
    * ``tail="bucket"``: the tokens outside the top-k form one more bucket, so ``soft`` is the KL
      over ``k + 1`` outcomes and the student is also taught how much mass to leave outside.
      Needs ``teacher_logsumexp [...]``: the teacher's full log-normaliser at ``T = 1`` of the same
      logits as ``topk_values`` (0 if the values are already log-probs). At ``T = 1`` this is exact;
      at another ``T`` the cached tokens are re-tempered exactly (``q_j^(1/T)``, renormalised) and the
      tail as if its mass were spread evenly over its ``V - k`` tokens (see
      :func:`hkd.kernels.reference.sparse_teacher_log_probs`). Ids in a row must be distinct.

    Slots whose value is ``-inf`` are empty (fewer than ``k`` targets). ``labels``, ``ignore_index``,
    ``reduction``, ``backend`` and the fp32 result are as in :func:`distill_loss`; only
    ``student_logits`` gets a gradient. Ids of non-ignored rows must lie in ``[0, V)`` (on CPU
    they are checked; on CUDA a bad row's loss comes back NaN, without a host sync).
    """
    _check_floating(student_logits=student_logits, topk_values=topk_values, teacher_logsumexp=teacher_logsumexp)
    if divergence != "forward_kl":
        raise ValueError(f"sparse_distill_loss supports divergence='forward_kl' only, got {divergence!r}: "
                         "reverse KL and JSD need the teacher's probability of every token, not its top-k")
    if tail not in TAILS:
        raise ValueError(f"unknown tail {tail!r}; use one of {list(TAILS)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise TypeError(f"topk_ids must be integer token ids, got {topk_ids.dtype}")
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if topk_ids.shape != topk_values.shape or topk_ids.shape[:-1] != lead:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_values {tuple(topk_values.shape)} must both be "
                         f"[..., k] with the student logits' leading shape {tuple(lead)}")
    k = topk_ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"need 1 <= k <= V top-k targets per row, got k={k} for V={vocab}")
    if tail == "bucket":
        if teacher_logsumexp is None:
            raise ValueError("tail='bucket' needs teacher_logsumexp (the teacher's log-normaliser at T=1 per row) "
                             "to know the mass outside the top-k")
        if teacher_logsumexp.shape != lead:
            raise ValueError(f"teacher_logsumexp must have the leading shape {tuple(lead)}, "
                             f"got {tuple(teacher_logsumexp.shape)}")
    _check_options("forward_kl", 0.5, temperature, alpha, reduction, labels)
    flat_labels, bad = _flat_labels(labels, lead, vocab, ignore_index, alpha)
    student = student_logits.reshape(-1, vocab)
    ids = topk_ids.reshape(-1, k).long()
    keep = None if flat_labels is None else (flat_labels != ignore_index)[:, None]
    out_of_range = (ids < 0) | (ids >= vocab)
    if keep is not None:
        out_of_range &= keep
    bad_ids = out_of_range.any(-1)
    if not ids.is_cuda:
        if bool(bad_ids.any()):
            first = int(bad_ids.nonzero()[0, 0])
            raise ValueError(f"topk_ids must be token ids in [0, {vocab}); row {first} has "
                             f"{ids[first].tolist()} ({int(bad_ids.sum())} such rows)")
    else:  # no host sync: such rows are clamped to id 0 here and their loss is NaN below
        ids = torch.where(out_of_range, 0, ids)
        bad = bad_ids if bad is None else bad | bad_ids
    values = topk_values.reshape(-1, k)
    lse = None if tail == "renormalize" or teacher_logsumexp is None else teacher_logsumexp.reshape(-1)
    options = dict(ignore_index=ignore_index, temperature=temperature, tail=tail, scale_t2=scale_t2, alpha=alpha)
    chosen = registry.resolve("sparse_distill_loss", backend, student, values, request=options)
    rows = chosen.call(student, ids, values, lse, flat_labels, **options)
    return _reduce(_mark_bad(rows, bad), flat_labels, ignore_index, reduction, lead)


__all__ = ["OPS", "KernelBackend", "backends", "check_request", "distill_loss", "fused_linear_distill_loss",
           "get_backend", "register_backend", "sparse_distill_loss"]
