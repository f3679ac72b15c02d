r"""Triton distillation loss over logits: one program per row, online log-sum-exp over V.

For row :math:`i` with student logits :math:`z_s`, teacher logits :math:`z_t` and temperature
:math:`T` (all arithmetic in fp32, whatever the input dtype):

1. **LSE pass.** Stream the vocabulary in ``BLOCK_V`` chunks keeping a running max :math:`m`
   and rescaled sum :math:`d` (:math:`d \leftarrow d\,e^{m - m'} + \sum e^{x - m'}`), for
   :math:`z_s/T`, :math:`z_t/T` and, when ``alpha > 0``, :math:`z_s` at :math:`T = 1`. So
   :math:`\log P = x - (m + \log d)` for any chunk without storing the row.
2. **Loss pass.** Accumulate the divergence (:mod:`hkd.kernels.reference` has the formulas);
   reverse KL and JSD also need their row total :math:`D` (resp. :math:`\mathrm{KL}(P_s\|M)`)
   before any gradient element is known.
3. **Gradient pass.** Write :math:`\partial \ell / \partial z_s` into a buffer of the student's
   dtype (closed forms in :mod:`hkd.kernels.chunked`), so ``backward`` is one in-place scale
   by ``grad_output``.

The inputs are read three times (twice for forward-only calls) but nothing ``[N, V]`` is
allocated besides the gradient. ``-inf`` logits are zero-probability tokens; the running max
starts at a large finite negative so a chunk of all ``-inf`` does not produce ``inf - inf``.

Interpreter notes (``TRITON_INTERPRET=1``, used by the CPU tests): values are upcast to fp32
right after loading (the interpreter's bf16 arithmetic is wrong), configs are fixed (no
autotune) and only core ``tl`` math is used (no libdevice).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .chunked import Options, StoredGradLoss

KINDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
NEG_BIG = -3.0e38  # running-max start: finite, so exp(-inf - NEG_BIG) = 0 instead of NaN


@triton.jit
def _lse_update(x, m, d):
    """One online log-sum-exp step: returns the new running max and rescaled sum."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    return m_new, d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)


@triton.jit
def _log_m(log_q, log_p, log_beta, log_1mbeta):
    """log(beta q + (1 - beta) p) computed in log space (logaddexp)."""
    a = log_q + log_beta
    b = log_p + log_1mbeta
    hi = tl.maximum(a, b)
    return hi + tl.log(1.0 + tl.exp(-tl.abs(a - b)))


@triton.jit
def softmax_kl_kernel(s_ptr, t_ptr, labels_ptr, loss_ptr, grad_ptr, s_stride, t_stride, g_stride, V,
                      inv_t, beta, log_beta, log_1mbeta, soft_w, grad_w, alpha, ignore_index,
                      KIND: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
                      NEED_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row, t_row = s_ptr + row * s_stride, t_ptr + row * t_stride
    cols = tl.arange(0, BLOCK_V)
    keep = True
    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        keep = label != ignore_index
        label = tl.where(keep, label, 0)  # an ignored row must not read z_s[-100]

    # pass 1: log-sum-exp of z_s/T, z_t/T and (for the CE term) z_s
    m_s = NEG_BIG; d_s = 0.0; m_t = NEG_BIG; d_t = 0.0; m_1 = NEG_BIG; d_1 = 0.0  # noqa: E702
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        z = tl.load(s_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        zt = tl.load(t_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_s, d_s = _lse_update(z * inv_t, m_s, d_s)
        m_t, d_t = _lse_update(zt * inv_t, m_t, d_t)
        if HAS_CE:
            m_1, d_1 = _lse_update(z, m_1, d_1)
    lse_s = m_s + tl.log(d_s)
    lse_t = m_t + tl.log(d_t)
    lse_1 = 0.0
    if HAS_CE:
        lse_1 = m_1 + tl.log(d_1)

    # pass 2: the divergence; `inner` is the row total the reverse-KL / JSD gradient needs
    soft = 0.0
    inner = 0.0
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        log_p = tl.load(s_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t - lse_s
        log_q = tl.load(t_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t - lse_t
        p = tl.exp(log_p)
        q = tl.exp(log_q)
        if KIND == 0:
            soft += tl.sum(tl.where(q > 0, q * (log_q - log_p), 0.0), axis=0)
        elif KIND == 1:
            inner += tl.sum(tl.where(p > 0, p * (log_p - log_q), 0.0), axis=0)
        else:
            log_m = _log_m(log_q, log_p, log_beta, log_1mbeta)
            soft += beta * tl.sum(tl.where(q > 0, q * (log_q - log_m), 0.0), axis=0)
            inner += tl.sum(tl.where(p > 0, p * (log_p - log_m), 0.0), axis=0)
    if KIND == 1:
        soft = inner
    elif KIND == 2:
        soft += (1.0 - beta) * inner
    loss = soft_w * soft
    if HAS_CE:
        loss += alpha * (lse_1 - tl.load(s_row + label).to(tl.float32))
    tl.store(loss_ptr + row, tl.where(keep, loss, 0.0))

    # pass 3: d loss / d z_s
    if NEED_GRAD:
        g_row = grad_ptr + row * g_stride
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            z = tl.load(s_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            log_p = z * inv_t - lse_s
            log_q = tl.load(t_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t - lse_t
            p = tl.exp(log_p)
            if KIND == 0:
                g = p - tl.exp(log_q)
            elif KIND == 1:
                g = p * (tl.where(p > 0, log_p - log_q, 0.0) - inner)
            else:
                log_m = _log_m(log_q, log_p, log_beta, log_1mbeta)
                g = (1.0 - beta) * p * (tl.where(p > 0, log_p - log_m, 0.0) - inner)
            g = g * grad_w
            if HAS_CE:
                g += alpha * (tl.exp(z - lse_1) - tl.where(start + cols == label, 1.0, 0.0))
            g = tl.where(keep, g, 0.0)
            tl.store(g_row + start + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


def check_device(backend: str, *tensors: Tensor) -> None:
    """CPU tensors run only under the interpreter; say so instead of failing inside triton."""
    if any(not t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"backend {backend!r} needs CUDA tensors (got {sorted({str(t.device) for t in tensors})}); "
                           "on CPU set TRITON_INTERPRET=1 before importing triton, or use backend='chunked'")


def block_v(vocab: int, limit: int) -> int:
    return min(triton.next_power_of_2(vocab), limit)


def launch(student: Tensor, teacher: Tensor, labels: Tensor | None, o: Options,
           need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Row losses ``[N]`` (fp32) and, if ``need_grad``, the gradient w.r.t. ``student`` (its dtype)."""
    n, vocab = student.shape
    student = student if student.stride(-1) == 1 else student.contiguous()
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    rows = torch.empty(n, dtype=torch.float32, device=student.device)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if need_grad else rows
    labels_arg = labels.contiguous() if labels is not None else rows
    beta = o.beta if o.kind == "jsd" else 0.5  # log(0) is never needed outside jsd
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if n:
        softmax_kl_kernel[(n,)](
            student, teacher, labels_arg, rows, grad, student.stride(0), teacher.stride(0),
            grad.stride(0) if need_grad else 0, vocab, 1.0 / o.temperature, beta, math.log(beta),
            math.log(1.0 - beta), o.soft_weight, o.soft_weight / o.temperature, o.alpha, o.ignore_index,
            KIND=KINDS[o.kind], HAS_LABELS=labels is not None, HAS_CE=o.alpha > 0, NEED_GRAD=need_grad,
            BLOCK_V=block_v(vocab, 16384 if interpreting else 4096), num_warps=1 if interpreting else 8,
        )
    return rows, grad if need_grad else None


def triton_row_losses(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, **options: Any) -> Tensor:
    """``distill_loss`` backend: per-row losses ``[N]`` (fp32)."""
    check_device("triton", student_logits, teacher_logits)
    return StoredGradLoss.apply(launch, student_logits, teacher_logits.detach(), labels, Options(**options))
