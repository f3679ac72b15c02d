r"""Triton distillation loss over logits: a one-pass forward and a one-pass backward.

For row :math:`i` with student logits :math:`z_s`, teacher logits :math:`z_t` and temperature
:math:`T` (all arithmetic in fp32, whatever the input dtype), write :math:`M_s = \max_v z_s`,
:math:`w = (z_s - M_s)/T`, :math:`d_s = \sum_v e^{w}` (and :math:`M_t, u, d_t` for the teacher),
so :math:`\log P_s = w - \log d_s`. Subtracting the *raw* maximum before dividing by ``T`` keeps
every digit when the logits share a large offset (an un-normalised LM head at 1e4): the old
``z/T - lse`` subtracted two numbers of size 1e4 in fp32 and lost about 1e-3 relative in the
gradient.

**Forward** (``_forward_kernel``, one program per row, the vocabulary streamed in ``BLOCK_V``
chunks, each element read once): the online log-sum-exp of both distributions (running maxima
and rescaled sums, in ``exp2``) and, for forward / reverse KL, the closed-form row term

.. math:: \mathrm{KL}(P_t\|P_s) = \frac{A}{d_t} + \log d_s - \log d_t,
          \qquad A = \sum_v e^{u} (u - w),

kept online too: when the maxima grow by :math:`\delta_t, \delta_s` (in units of ``T``), every
:math:`u - w` shifts by :math:`\delta_s - \delta_t`, so :math:`A \leftarrow e^{-\delta_t}(A +
(\delta_s - \delta_t) d_t)` (reverse KL swaps the roles). JSD needs :math:`\log M` with both
final normalisers, so it takes a second sweep, as do the skew divergences (``skew_forward_kl`` =
KL(q || a q + (1-a) p), ``skew_reverse_kl`` = KL(p || a p + (1-a) q)), whose row constant
:math:`F = \sum_v p_v f_v` (see the backward) the same sweep sums. With ``alpha > 0`` the student's log-sum-exp at
``T = 1`` shares the same maximum. Per-row statistics (:math:`M_s, M_t, \log d_s, \log d_t,
\log d_1` and the row total :math:`D` the reverse-KL / JSD gradients need) go to a small
``[N, 6]`` fp32 tensor.

**Backward** (``_backward_kernel``, a 2-D grid of (row, vocabulary block) programs): reads the
logits, the saved statistics and the upstream gradient of the row, and writes

* forward KL: :math:`p - q`; reverse KL: :math:`p(\log p - \log q - D)`;
  JSD: :math:`(1-\beta)p(\log p - \log m - D)`; skew KL / skew reverse KL: :math:`p(f - F)`
  with :math:`f = -(1-a)q/m` / :math:`\log p - \log m - a p/m` (closed forms in
  :mod:`hkd.kernels.chunked`)

times :math:`g_i (1-\alpha) c / T`, plus :math:`g_i\alpha(\mathrm{softmax}(z_s) -
\mathrm{onehot})`, where :math:`g_i` is the upstream gradient of row ``i`` read in fp32 (for
``mean`` it is ``1/count``; it is never rounded to bf16 and never applied in a separate pass).

Traffic per vocabulary entry in bf16: forward reads 4 bytes, backward reads 4 and writes 2 (10
in all; nothing ``[N, V]`` is allocated besides the gradient, and a forward-only call reads each
logit once). The 6-byte bound (read both, write the gradient, once) needs the whole row on chip
(512 KiB at V=131072), so streaming kernels pay the second read. Offsets are int64 (``row *
stride`` overflows int32 at N*V >= 2**31); the logits are read through their row strides.

**Vector loads** (``_row_split``). A row starts on a 16-byte boundary only when its offset
``row * stride`` is a multiple of 8 bf16 elements, and a masked load is split where its mask
may change (``offs < V``: anywhere, unless V is a multiple of 16); at V = 50257 (GPT-2) both
fail and every load is issued as 2-byte scalar loads. So each row is read as a *body* that
starts at its first 16-byte boundary and holds whole 16-byte vectors (its length a multiple of
the vector width, its start told to the compiler with ``tl.multiple_of``, true by construction)
plus an *edge* of fewer than two vectors at both ends, read apart. The launcher peels only when
every tensor the kernel reads or writes reaches that boundary at the same column (16-byte
aligned data, row strides equal modulo the vector width); otherwise the whole row is the body.

Launch configs are picked by rule (``launch_options``), not autotuned: tuning the backward would
clone and restore the ``[N, V]`` gradient per trial, and each process would tune on its own.
Under ``TRITON_INTERPRET=1`` (the CPU tests) a fixed block is used, values are upcast right after
loading (the interpreter's bf16 arithmetic is wrong) and only core ``tl`` math is used.
``BLOCK_V`` (module attribute, ``None`` = automatic) fixes the block size everywhere, so tests
reach the multi-block path with small V.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .chunked import Options

KINDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "skew_forward_kl": 3, "skew_reverse_kl": 4}
# globals a compiled kernel reads must be tl.constexpr (the interpreter would accept plain floats)
NEG_BIG = tl.constexpr(-3.0e38)  # running-max start: finite, so (-inf) - NEG_BIG = -inf and exp gives 0, not NaN
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
N_STATS = 6  # M_s, M_t, log d_s, log d_t, log d_1, D (reverse KL / JSD) or F (skew kinds)
BLOCK_V: int | None = None  # override (tests: force several blocks per row); None = launch_options' rule
INTERPRET_BLOCK_V = 16384  # fixed block under the interpreter (numpy vectorises a block)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _log_m(log_q, log_p, log_beta, log_1mbeta):
    """log(beta q + (1 - beta) p) computed in log space (logaddexp); beta is the teacher's weight
    (jsd: beta; skew_forward_kl: skew; skew_reverse_kl: 1 - skew)."""
    a = log_q + log_beta
    b = log_p + log_1mbeta
    hi = tl.maximum(a, b)
    return hi + tl.log(1.0 + tl.exp(-tl.abs(a - b)))


@triton.jit
def _row_split(row_start, V, VEC: tl.constexpr, PEEL: tl.constexpr):
    """``(head, body)`` of a row whose first element is element ``row_start`` of its tensor. With
    ``PEEL`` the row is read as a body ``[head, head + body)`` that starts on a 16-byte boundary
    and holds whole ``VEC``-element vectors, plus an edge of fewer than ``2 * VEC`` columns
    (:func:`_edge`); without, the whole row is the body (and its loads may be scalar). The caller
    tells the compiler that ``row_start + head`` is a multiple of ``VEC`` with ``tl.multiple_of``
    in the kernel itself: a hint given inside a helper is lost when the helper is inlined."""
    if PEEL:
        head = tl.minimum((VEC - row_start % VEC) % VEC, V)
        body = (V - head) // VEC * VEC
    else:
        head = row_start * 0
        body = V + row_start * 0
    return head, body


@triton.jit
def _edge(head, body, V, VEC: tl.constexpr):
    """The columns outside a peeled row's body, ``[0, head)`` and ``[head + body, V)``, as
    ``2 * VEC`` lanes and their mask."""
    e = tl.arange(0, 2 * VEC)
    cols = tl.where(e < head, e, body + e)
    return cols, cols < V


@triton.jit
def _forward_step(z, zt, m_s, d_s, m_t, d_t, d_1, acc, inv_t, KIND: tl.constexpr, HAS_CE: tl.constexpr):
    """One block of the online pass (fp32 ``z``, ``zt``; ``-inf`` past the row): the running maxima,
    the rescaled sums and, for forward / reverse KL, the row term ``A`` / ``B`` (module docstring)."""
    c = inv_t * LOG2E  # exp(x / T) = exp2(x * c)
    ms_new = tl.maximum(m_s, tl.max(z, axis=0))
    mt_new = tl.maximum(m_t, tl.max(zt, axis=0))
    w = (z - ms_new) * inv_t  # <= 0; exact subtraction first, then the scale
    u = (zt - mt_new) * inv_t
    ew = tl.exp2(w * LOG2E)
    eu = tl.exp2(u * LOG2E)
    if KIND == 0:  # A = sum e^u (u - w), rescaled to the new maxima
        shift = ((ms_new - m_s) - (mt_new - m_t)) * inv_t
        acc = tl.where(d_t > 0, (acc + shift * d_t) * tl.exp2((m_t - mt_new) * c), 0.0)
        acc += tl.sum(tl.where(eu > 0, eu * (u - w), 0.0), axis=0)
    elif KIND == 1:  # B = sum e^w (w - u)
        shift = ((mt_new - m_t) - (ms_new - m_s)) * inv_t
        acc = tl.where(d_s > 0, (acc + shift * d_s) * tl.exp2((m_s - ms_new) * c), 0.0)
        acc += tl.sum(tl.where(ew > 0, ew * (w - u), 0.0), axis=0)
    if HAS_CE:
        d_1 = d_1 * tl.exp2((m_s - ms_new) * LOG2E) + tl.sum(tl.exp2((z - ms_new) * LOG2E), axis=0)
    d_s = d_s * tl.exp2((m_s - ms_new) * c) + tl.sum(ew, axis=0)
    d_t = d_t * tl.exp2((m_t - mt_new) * c) + tl.sum(eu, axis=0)
    return ms_new, d_s, mt_new, d_t, d_1, acc


@triton.jit
def _mixture_step(z, zt, m_s, m_t, log_ds, log_dt, inv_t, log_beta, log_1mbeta, KIND: tl.constexpr):
    """One block of the second sweep (JSD, skew kinds): this block's terms of ``soft`` and ``inner``."""
    log_p = (z - m_s) * inv_t - log_ds
    log_q = (zt - m_t) * inv_t - log_dt
    p = tl.exp2(log_p * LOG2E)
    q = tl.exp2(log_q * LOG2E)
    log_m = _log_m(log_q, log_p, log_beta, log_1mbeta)
    if KIND == 2:
        soft = tl.sum(tl.where(q > 0, q * (log_q - log_m), 0.0), axis=0)
        inner = tl.sum(tl.where(p > 0, p * (log_p - log_m), 0.0), axis=0)
    elif KIND == 3:  # KL(q || m) and sum p q / m
        soft = tl.sum(tl.where(q > 0, q * (log_q - log_m), 0.0), axis=0)
        inner = tl.sum(tl.where(q > 0, p * tl.exp2((log_q - log_m) * LOG2E), 0.0), axis=0)
    else:  # KL(p || m) and sum p p / m
        soft = tl.sum(tl.where(p > 0, p * (log_p - log_m), 0.0), axis=0)
        inner = tl.sum(tl.where(p > 0, p * tl.exp2((log_p - log_m) * LOG2E), 0.0), axis=0)
    return soft, inner


@triton.jit
def _forward_kernel(s_ptr, t_ptr, labels_ptr, loss_ptr, stats_ptr, s_stride, t_stride, V,
                    inv_t, beta, log_beta, log_1mbeta, soft_w, alpha, ignore_index,
                    KIND: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, BLOCK_V: tl.constexpr,
                    VEC: tl.constexpr, PEEL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride  # int64: row * stride passes 2**31 on large N x V
    t_row = t_ptr + row * t_stride
    head, body = _row_split(row * s_stride, V, VEC, PEEL)
    s_body = s_row
    t_body = t_row
    if PEEL:  # true by _row_split and the launcher's check; the hint makes the body's loads vectors
        s_body = s_ptr + tl.multiple_of(row * s_stride + head, VEC)
        t_body = t_ptr + tl.multiple_of(row * t_stride + head, VEC)
    cols = tl.arange(0, BLOCK_V)
    keep = True
    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        keep = label != ignore_index
        label = tl.where(keep, label, 0)  # an ignored row must not read z_s[-100]

    m_s = NEG_BIG; d_s = 0.0; m_t = NEG_BIG; d_t = 0.0; d_1 = 0.0; acc = 0.0  # noqa: E702
    for start in range(0, body, BLOCK_V):
        offs = start + cols
        mask = offs < body
        z = tl.load(s_body + offs, mask=mask, other=float("-inf")).to(tl.float32)
        zt = tl.load(t_body + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m_s, d_s, m_t, d_t, d_1, acc = _forward_step(z, zt, m_s, d_s, m_t, d_t, d_1, acc, inv_t, KIND, HAS_CE)
    if PEEL:
        e_cols, e_mask = _edge(head, body, V, VEC)
        z_edge = tl.load(s_row + e_cols, mask=e_mask, other=float("-inf")).to(tl.float32)
        zt_edge = tl.load(t_row + e_cols, mask=e_mask, other=float("-inf")).to(tl.float32)
        m_s, d_s, m_t, d_t, d_1, acc = _forward_step(z_edge, zt_edge, m_s, d_s, m_t, d_t, d_1, acc, inv_t, KIND,
                                                     HAS_CE)
    log_ds = tl.log2(d_s) * LN2
    log_dt = tl.log2(d_t) * LN2
    inner = 0.0
    if KIND == 0:
        soft = acc / d_t + log_ds - log_dt
    elif KIND == 1:
        soft = acc / d_s + log_dt - log_ds
        inner = soft
    else:  # JSD / skew: log M needs both final normalisers, so a second sweep
        soft = 0.0
        for start in range(0, body, BLOCK_V):
            offs = start + cols
            mask = offs < body
            z = tl.load(s_body + offs, mask=mask, other=float("-inf")).to(tl.float32)
            zt = tl.load(t_body + offs, mask=mask, other=float("-inf")).to(tl.float32)
            a, b = _mixture_step(z, zt, m_s, m_t, log_ds, log_dt, inv_t, log_beta, log_1mbeta, KIND)
            soft += a
            inner += b
        if PEEL:
            e_cols, e_mask = _edge(head, body, V, VEC)
            z_edge = tl.load(s_row + e_cols, mask=e_mask, other=float("-inf")).to(tl.float32)
            zt_edge = tl.load(t_row + e_cols, mask=e_mask, other=float("-inf")).to(tl.float32)
            a, b = _mixture_step(z_edge, zt_edge, m_s, m_t, log_ds, log_dt, inv_t, log_beta, log_1mbeta, KIND)
            soft += a
            inner += b
        if KIND == 2:
            soft = beta * soft + (1.0 - beta) * inner
        elif KIND == 3:  # F = sum p f, f = -(1 - skew) q / m; 1 - skew = 1 - beta here
            inner = -(1.0 - beta) * inner
        else:  # F = KL(p || m) - skew sum p^2 / m; skew = 1 - beta here
            inner = soft - (1.0 - beta) * inner
    loss = soft_w * soft
    log_d1 = 0.0
    if HAS_CE:
        log_d1 = tl.log2(d_1) * LN2
        loss += alpha * (log_d1 - (tl.load(s_row + label).to(tl.float32) - m_s))
    tl.store(loss_ptr + row, tl.where(keep, loss, 0.0))
    st = stats_ptr + row * 6
    tl.store(st + 0, m_s)
    tl.store(st + 1, m_t)
    tl.store(st + 2, log_ds)
    tl.store(st + 3, log_dt)
    tl.store(st + 4, log_d1)
    tl.store(st + 5, inner)


@triton.jit
def _gradient(z, zt, cols, label, up, m_s, m_t, log_ds, log_dt, log_d1, row_term, inv_t, beta, log_beta, log_1mbeta,
              grad_w, alpha, KIND: tl.constexpr, HAS_CE: tl.constexpr):
    """``up * d loss / d z_s`` on a block of columns ``cols`` (fp32)."""
    log_p = (z - m_s) * inv_t - log_ds
    log_q = (zt - m_t) * inv_t - log_dt
    p = tl.exp2(log_p * LOG2E)
    if KIND == 0:
        g = p - tl.exp2(log_q * LOG2E)
    elif KIND == 1:
        g = p * (tl.where(p > 0, log_p - log_q, 0.0) - row_term)
    elif KIND == 2:
        log_m = _log_m(log_q, log_p, log_beta, log_1mbeta)
        g = (1.0 - beta) * p * (tl.where(p > 0, log_p - log_m, 0.0) - row_term)
    elif KIND == 3:  # p (f - F), f = -(1 - skew) q / m
        log_m = _log_m(log_q, log_p, log_beta, log_1mbeta)
        ratio = tl.where(log_q > float("-inf"), tl.exp2((log_q - log_m) * LOG2E), 0.0)
        g = p * (-(1.0 - beta) * ratio - row_term)
    else:  # p (f - F), f = log p - log m - skew p / m
        log_m = _log_m(log_q, log_p, log_beta, log_1mbeta)
        f = tl.where(p > 0, (log_p - log_m) - (1.0 - beta) * tl.exp2((log_p - log_m) * LOG2E), 0.0)
        g = p * (f - row_term)
    g = g * (grad_w * up)
    if HAS_CE:
        p1 = tl.exp2(((z - m_s) - log_d1) * LOG2E)
        g += (alpha * up) * (p1 - tl.where(cols == label, 1.0, 0.0))
    return g


@triton.jit
def _backward_kernel(s_ptr, t_ptr, labels_ptr, stats_ptr, up_ptr, g_ptr, s_stride, t_stride, g_stride, up_stride, V,
                     inv_t, beta, log_beta, log_1mbeta, grad_w, alpha, ignore_index,
                     KIND: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, BLOCK_V: tl.constexpr,
                     VEC: tl.constexpr, PEEL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head, body = _row_split(row * s_stride, V, VEC, PEEL)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < body
    keep = True
    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        keep = label != ignore_index
    up = tl.load(up_ptr + row * up_stride).to(tl.float32)  # upstream gradient of this row (1/count for mean)
    st = stats_ptr + row * 6
    m_s = tl.load(st + 0)
    m_t = tl.load(st + 1)
    log_ds = tl.load(st + 2)
    log_dt = tl.load(st + 3)
    log_d1 = tl.load(st + 4)
    row_term = tl.load(st + 5)
    s_body = s_ptr + row * s_stride
    t_body = t_ptr + row * t_stride
    g_body = g_ptr + row * g_stride
    if PEEL:  # true by _row_split and the launcher's check; the hint makes the loads and stores vectors
        s_body = s_ptr + tl.multiple_of(row * s_stride + head, VEC)
        t_body = t_ptr + tl.multiple_of(row * t_stride + head, VEC)
        g_body = g_ptr + tl.multiple_of(row * g_stride + head, VEC)
    z = tl.load(s_body + offs, mask=mask, other=float("-inf")).to(tl.float32)
    zt = tl.load(t_body + offs, mask=mask, other=float("-inf")).to(tl.float32)
    g = _gradient(z, zt, head + offs, label, up, m_s, m_t, log_ds, log_dt, log_d1, row_term, inv_t, beta, log_beta,
                  log_1mbeta, grad_w, alpha, KIND, HAS_CE)
    g = tl.where(keep, g, 0.0)  # ignored rows may hold NaN padding
    tl.store(g_body + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
    if PEEL:
        if tl.program_id(1) == 0:  # the first program of the row also writes its edge
            e_cols, e_mask = _edge(head, body, V, VEC)
            z_edge = tl.load(s_ptr + row * s_stride + e_cols, mask=e_mask, other=float("-inf")).to(tl.float32)
            zt_edge = tl.load(t_ptr + row * t_stride + e_cols, mask=e_mask, other=float("-inf")).to(tl.float32)
            g_edge = _gradient(z_edge, zt_edge, e_cols, label, up, m_s, m_t, log_ds, log_dt, log_d1, row_term, inv_t,
                               beta, log_beta, log_1mbeta, grad_w, alpha, KIND, HAS_CE)
            g_edge = tl.where(keep, g_edge, 0.0)
            tl.store(g_ptr + row * g_stride + e_cols, g_edge.to(g_ptr.dtype.element_ty), mask=e_mask)


# Launch configs by rule, not autotuned: a tuning run of the backward would have to clone and restore
# the [N, V] gradient per trial (the fused head writes it over its logits), and each process would
# tune (and might choose) on its own. These are the smallest configs of the grid autotune used to try
# (forward 4096 / 8192 x 8 / 16 warps, backward 2048 / 4096 x 4 / 8 warps); not re-measured here.
FORWARD_CONFIG = (4096, 8)  # (BLOCK_V, num_warps): one program loops over its row
BACKWARD_CONFIG = (2048, 4)  # one block per program: more programs in flight


def launch_options(vocab: int, kernel: str) -> dict[str, Any]:
    """``BLOCK_V`` and ``num_warps`` of ``kernel`` ("forward" or "backward"): the ``BLOCK_V`` override,
    the interpreter's block, or the rule above (a block no wider than the row needs)."""
    if BLOCK_V is not None:
        return {"BLOCK_V": BLOCK_V, "num_warps": 1 if interpreting() else 8}
    if interpreting():
        return {"BLOCK_V": min(triton.next_power_of_2(max(vocab, 1)), INTERPRET_BLOCK_V), "num_warps": 1}
    block, warps = FORWARD_CONFIG if kernel == "forward" else BACKWARD_CONFIG
    return {"BLOCK_V": min(block, max(triton.next_power_of_2(vocab), 16)), "num_warps": warps}


def peeling(*rows: Tensor) -> dict[str, Any]:
    """``VEC`` (elements of the narrowest dtype in 16 bytes) and ``PEEL``: whether every row of every
    tensor reaches a 16-byte boundary at the same column (16-byte-aligned data, row strides equal
    modulo ``VEC``), so the kernels can read each row's body as aligned vectors (:func:`_row_split`)."""
    vec = 16 // min(x.element_size() for x in rows)
    stride = rows[0].stride(0)
    return {"VEC": vec, "PEEL": all(x.data_ptr() % 16 == 0 and (x.stride(0) - stride) % vec == 0 for x in rows)}


def check_device(backend: str, *tensors: Tensor) -> None:
    """CPU tensors run only under the interpreter; say so instead of failing inside triton."""
    if any(not t.is_cuda for t in tensors) and not interpreting():
        raise RuntimeError(f"backend {backend!r} needs CUDA tensors (got {sorted({str(t.device) for t in tensors})}); "
                           "on CPU set TRITON_INTERPRET=1 before importing triton, or use backend='chunked'")


def _row_major(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def empty_rows_like(x: Tensor) -> Tensor:
    """An empty ``[N, V]`` tensor with ``x``'s row stride (its rows then start where ``x``'s do relative
    to 16-byte boundaries, so a kernel can read one and write the other as aligned vectors), or
    contiguous where ``x``'s rows overlap (a broadcast row)."""
    stride = max(x.stride(0), x.shape[1])
    return torch.empty_strided(x.shape, (stride, 1), dtype=x.dtype, device=x.device)


def _scalars(o: Options) -> tuple[float, float, float, float]:
    beta = o.mix  # the teacher's weight in m; in (0, 1) whenever a kind reads it (log(0) is never needed)
    return 1.0 / o.temperature, beta, math.log(beta), math.log(1.0 - beta)


def forward(student: Tensor, teacher: Tensor, labels: Tensor | None, o: Options) -> tuple[Tensor, Tensor]:
    """Row losses ``[N]`` (fp32) and the per-row statistics ``[N, 6]`` the backward reads."""
    n, vocab = student.shape
    rows = torch.empty(n, dtype=torch.float32, device=student.device)
    stats = torch.empty(n, N_STATS, dtype=torch.float32, device=student.device)
    if n:
        inv_t, beta, log_beta, log_1mbeta = _scalars(o)
        _forward_kernel[(n,)](
            student, teacher, rows if labels is None else labels, rows, stats, student.stride(0), teacher.stride(0),
            vocab, inv_t, beta, log_beta, log_1mbeta, o.soft_weight, o.alpha, o.ignore_index,
            KIND=KINDS[o.kind], HAS_LABELS=labels is not None, HAS_CE=o.alpha > 0,
            **launch_options(vocab, "forward"), **peeling(student, teacher))
    return rows, stats


def backward(student: Tensor, teacher: Tensor, labels: Tensor | None, stats: Tensor, upstream: Tensor, o: Options,
             out: Tensor | None = None) -> Tensor:
    """``upstream[i] * d loss_i / d z_s`` into ``out`` (default: a new tensor of the student's dtype;
    ``out=student`` overwrites the logits with their gradient, as the fused LM head does).
    ``upstream`` is ``[N]`` fp32 with any stride (0 for a scalar broadcast to every row)."""
    n, vocab = student.shape
    grad = empty_rows_like(student) if out is None else out
    if n and vocab:
        inv_t, beta, log_beta, log_1mbeta = _scalars(o)
        opts = launch_options(vocab, "backward")
        _backward_kernel[(n, triton.cdiv(vocab, opts["BLOCK_V"]))](
            student, teacher, stats if labels is None else labels, stats, upstream, grad, student.stride(0),
            teacher.stride(0), grad.stride(0), upstream.stride(0), vocab, inv_t, beta, log_beta, log_1mbeta,
            o.soft_weight / o.temperature, o.alpha, o.ignore_index,
            KIND=KINDS[o.kind], HAS_LABELS=labels is not None, HAS_CE=o.alpha > 0, **opts,
            **peeling(student, teacher, grad))
    return grad


class SoftmaxKL(torch.autograd.Function):
    """Forward saves the per-row statistics; backward is one pass that writes the scaled gradient.
    Nothing is consumed, so ``retain_graph=True`` and a second backward work."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, teacher: Tensor, labels: Tensor | None, o: Options) -> Tensor:
        rows, stats = forward(student, teacher, labels, o)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(student, teacher, labels, stats)
        ctx.o = o
        return rows

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor | None, ...]:
        student, teacher, labels, stats = ctx.saved_tensors
        upstream = grad_rows if grad_rows.dtype == torch.float32 else grad_rows.float()
        return backward(student, teacher, labels, stats, upstream, ctx.o), None, None, None


def triton_row_losses(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, **options: Any) -> Tensor:
    """``distill_loss`` backend: per-row losses ``[N]`` (fp32)."""
    check_device("triton", student_logits, teacher_logits)
    return SoftmaxKL.apply(_row_major(student_logits), _row_major(teacher_logits.detach()), labels, Options(**options))
