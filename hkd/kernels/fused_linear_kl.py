r"""Triton fused LM-head + distillation loss without ``[N, V]`` logits in memory. Two paths:

**GEMM path** (CUDA; :func:`_gemm`). Rows are taken in chunks sized from a memory budget
(``CHUNK_BYTES`` for the chunk's logits and gradient, a multiple of 128 rows). Per chunk: the
student and teacher logits from cuBLAS, operands in :func:`hkd.kernels.reference.operand_dtype`
(bf16 tensor cores under autocast) summed into **fp32** logits (``torch.mm(..., out_dtype=fp32)``;
bf16 logits would be 0.5 apart at 100), the one-pass softmax-KL forward of
:mod:`hkd.kernels.softmax_kl` (losses and per-row statistics), its backward writing the logits
gradient ``G`` in the operand dtype (over the fp32 student logits when that is fp32), then
``grad_h[chunk] = G @ W_s`` and ``grad_W += G.T @ h[chunk]`` (cuBLAS, fp32 accumulation; ``grad_W``
summed over chunks in the weight's dtype, or fp32 with ``weight_grad_fp32``; ``grad_b`` in fp32).
Four GEMMs per chunk and no recomputation: at N=8192, H=4096, V=128256 that is 34 TFLOP of
tensor-core work. Softmax traffic per logit: the softmax-KL kernels read both fp32 logits twice
and write a bf16 ``G`` (18 bytes; bf16 logits would halve the reads, at the error above).

**Tiled kernel** (``fused_linear_kl_kernel``, the interpreter / CPU tests, or ``GEMM_PATH =
False``). Each program owns ``BLOCK_M`` rows of hidden states and walks the vocabulary in
``BLOCK_V`` tiles. A logits tile is ``h[BLOCK_M, H] @ W[BLOCK_V, H].T (+ b)``, accumulated over
``H`` in ``BLOCK_K`` steps with ``tl.dot`` (fp32 accumulator), for the student and the teacher
(their hidden sizes may differ). The tile is recomputed in each pass instead of being stored:

1. **Normaliser pass**: per row, the running raw maximum :math:`M` of the logits (before
   dividing by ``T``) and :math:`d = \sum_v e^{(z_v - M)/T}`, rescaled when :math:`M` grows, for
   the student and the teacher, and :math:`d_1 = \sum_v e^{z_v - M_s}` for the cross-entropy term
   (the online softmax of :mod:`hkd.kernels.softmax_kl`, with a vector of rows instead of a scalar).
2. **Loss pass**: with :math:`\log p = (z - M)/T - \log d` the divergence per row, the row total
   the reverse-KL / JSD / skew gradients need, and the label's shifted logit for the CE term.
   Subtracting the raw maximum first keeps every digit at a logit offset of 1e4; the scaled
   row log-sum-exp (``z/T - lse``) subtracts two numbers of size 1e4/T and lost ~3e-4 relative.
3. **Gradient pass** (only when a gradient is needed): the logits-gradient tile ``G[BLOCK_M,
   BLOCK_V]`` (closed forms in :mod:`hkd.kernels.chunked`, optionally scaled by per-row weights),
   then

   * ``grad_h[rows] += G @ W_s[tile]`` -- these rows belong to this program alone, so a plain
     read-add-write into an fp32 buffer is race-free;
   * ``grad_W[tile] += G.T @ h[rows]`` and ``grad_b[tile] += G.sum(0)`` -- every row block
     touches every vocab tile, so these use fp32 ``tl.atomic_add`` (non-deterministic summation
     order on GPU, ~1e-7 relative; ``grad_W`` is always summed in fp32 here).

Row and column indices are int64 in both paths (``rows * H`` passes 2**31 at N*H >= 2**31).
Interpreter notes: under ``TRITON_INTERPRET=1`` bf16 ``tl.dot`` is wrong, so tiles are upcast to
fp32 after loading (``UPCAST``); with ``UPCAST = False`` bf16/fp16 tiles go to the tensor cores
as they are (the logits-gradient tile is rounded to their dtype for the two backward dots) and
fp32 tiles use TF32 dots (the tests force this path with fp32 inputs).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import softmax_kl
from .chunked import (
    HALF, Options, Precision, StoredGradFusedLoss, addmm32_, fused_precision, gemm_operand, mm32,
)
from .softmax_kl import KINDS, NEG_BIG, _log_m, check_device

UPCAST: bool | None = None  # tiled kernel: None = fp32 tiles under the interpreter or for fp32 inputs
GEMM_PATH: bool | None = None  # None = library GEMMs + softmax-KL kernels on CUDA, the tiled kernel otherwise
CHUNK_BYTES = 512 << 20  # GEMM path: a row chunk's two fp32 logits tensors and its gradient together
CHUNK_ROWS: int | None = None  # GEMM path override (tests: several chunks)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, rmask, cols, cmask, H, h_stride, w_stride,
                 HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """``h[rows] @ W[cols].T (+ b[cols])`` as fp32 ``[BLOCK_M, BLOCK_V]``; -inf past the vocab."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k in range(0, H, BLOCK_K):
        kmask = k + ks < H
        h = tl.load(h_ptr + rows[:, None] * h_stride + (k + ks)[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * w_stride + (k + ks)[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return tl.where(cmask[None, :], acc, float("-inf"))


@triton.jit
def _rescaled_sum(z, d, m, m_new, scale):
    """Per row of a tile: ``d`` (a sum of ``exp((z - m) * scale)`` so far) moved to the new raw maximum
    ``m_new``, plus this tile's terms."""
    return d * tl.exp((m - m_new) * scale) + tl.sum(tl.exp((z - m_new[:, None]) * scale), axis=1)


@triton.jit
def fused_linear_kl_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, labels_ptr, weight_ptr, loss_ptr, gh_ptr, gw_ptr, gb_ptr,
    N, V, HS, HT, hs_stride, ws_stride, ht_stride, wt_stride,
    inv_t, beta, log_beta, log_1mbeta, soft_w, grad_w, alpha, ignore_index,
    KIND: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, NEED_GRAD: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # int64 row / column indices: rows * stride and cols * H pass 2**31 at N*H or V*H >= 2**31
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < N
    vs = tl.arange(0, BLOCK_V).to(tl.int64)
    keep = rmask
    label = tl.zeros((BLOCK_M,), dtype=tl.int64)
    if HAS_LABELS:
        label = tl.load(labels_ptr + rows, mask=rmask, other=ignore_index)
        keep = rmask & (label != ignore_index)

    # pass 1: per-row raw maxima M and normalisers d of z_s/T, z_t/T, and of z_s (T = 1, sharing M_s)
    m_s = tl.full((BLOCK_M,), NEG_BIG, tl.float32); d_s = tl.zeros((BLOCK_M,), tl.float32)  # noqa: E702
    m_t = tl.full((BLOCK_M,), NEG_BIG, tl.float32); d_t = tl.zeros((BLOCK_M,), tl.float32)  # noqa: E702
    d_1 = tl.zeros((BLOCK_M,), tl.float32)
    for v in range(0, V, BLOCK_V):
        cols = v + vs
        cmask = cols < V
        zs = _logits_tile(hs_ptr, ws_ptr, bs_ptr, rows, rmask, cols, cmask, HS, hs_stride, ws_stride,
                          HAS_BS, UPCAST, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
        zt = _logits_tile(ht_ptr, wt_ptr, bt_ptr, rows, rmask, cols, cmask, HT, ht_stride, wt_stride,
                          HAS_BT, UPCAST, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
        ms_new = tl.maximum(m_s, tl.max(zs, axis=1))
        mt_new = tl.maximum(m_t, tl.max(zt, axis=1))
        d_s = _rescaled_sum(zs, d_s, m_s, ms_new, inv_t)
        d_t = _rescaled_sum(zt, d_t, m_t, mt_new, inv_t)
        if HAS_CE:
            d_1 = _rescaled_sum(zs, d_1, m_s, ms_new, 1.0)
        m_s = ms_new
        m_t = mt_new
    log_ds = tl.log(d_s)
    log_dt = tl.log(d_t)
    log_d1 = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_CE:
        log_d1 = tl.log(d_1)

    # pass 2: divergence, the row total for the gradient, the label's logit
    soft = tl.zeros((BLOCK_M,), tl.float32)
    inner = tl.zeros((BLOCK_M,), tl.float32)
    z_label = tl.zeros((BLOCK_M,), tl.float32)  # the label's logit minus M_s
    for v in range(0, V, BLOCK_V):
        cols = v + vs
        cmask = cols < V
        zs = _logits_tile(hs_ptr, ws_ptr, bs_ptr, rows, rmask, cols, cmask, HS, hs_stride, ws_stride,
                          HAS_BS, UPCAST, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
        zt = _logits_tile(ht_ptr, wt_ptr, bt_ptr, rows, rmask, cols, cmask, HT, ht_stride, wt_stride,
                          HAS_BT, UPCAST, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
        log_p = (zs - m_s[:, None]) * inv_t - log_ds[:, None]  # exact subtraction first, then the scale
        log_q = (zt - m_t[:, None]) * inv_t - log_dt[:, None]
        p = tl.exp(log_p)
        q = tl.exp(log_q)
        if KIND == 0:
            soft += tl.sum(tl.where(q > 0, q * (log_q - log_p), 0.0), axis=1)
        elif KIND == 1:
            inner += tl.sum(tl.where(p > 0, p * (log_p - log_q), 0.0), axis=1)
        elif KIND == 2:
            log_m = _log_m(log_q, log_p, log_beta, log_1mbeta)
            soft += beta * tl.sum(tl.where(q > 0, q * (log_q - log_m), 0.0), axis=1)
            inner += tl.sum(tl.where(p > 0, p * (log_p - log_m), 0.0), axis=1)
        elif KIND == 3:  # skew KL: KL(q || m) and sum p q / m (beta = skew = q's weight in m)
            log_m = _log_m(log_q, log_p, log_beta, log_1mbeta)
            soft += tl.sum(tl.where(q > 0, q * (log_q - log_m), 0.0), axis=1)
            inner += tl.sum(tl.where(q > 0, p * tl.exp(log_q - log_m), 0.0), axis=1)
        else:  # skew reverse KL: KL(p || m) and sum p p / m (beta = 1 - skew)
            log_m = _log_m(log_q, log_p, log_beta, log_1mbeta)
            soft += tl.sum(tl.where(p > 0, p * (log_p - log_m), 0.0), axis=1)
            inner += tl.sum(tl.where(p > 0, p * tl.exp(log_p - log_m), 0.0), axis=1)
        if HAS_CE:
            z_label += tl.sum(tl.where(cols[None, :] == label[:, None], zs - m_s[:, None], 0.0), axis=1)
    if KIND == 1:
        soft = inner
    elif KIND == 2:
        soft += (1.0 - beta) * inner
    elif KIND == 3:  # the gradient's row constant F = sum p f (see hkd.kernels.chunked)
        inner = -(1.0 - beta) * inner
    elif KIND == 4:
        inner = soft - (1.0 - beta) * inner
    loss = soft_w * soft
    if HAS_CE:
        loss += alpha * (log_d1 - z_label)
    tl.store(loss_ptr + rows, tl.where(keep, loss, 0.0), mask=rmask)

    # pass 3: logits-gradient tile G, then grad_h (owned rows) and grad_W / grad_b (atomics)
    if NEED_GRAD:
        row_w = tl.where(keep, 1.0, 0.0)
        if HAS_WEIGHT:
            row_w = tl.where(keep, tl.load(weight_ptr + rows, mask=rmask, other=0.0), 0.0)
        ks = tl.arange(0, BLOCK_K)
        for v in range(0, V, BLOCK_V):
            cols = v + vs
            cmask = cols < V
            zs = _logits_tile(hs_ptr, ws_ptr, bs_ptr, rows, rmask, cols, cmask, HS, hs_stride, ws_stride,
                              HAS_BS, UPCAST, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
            zt = _logits_tile(ht_ptr, wt_ptr, bt_ptr, rows, rmask, cols, cmask, HT, ht_stride, wt_stride,
                              HAS_BT, UPCAST, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
            log_p = (zs - m_s[:, None]) * inv_t - log_ds[:, None]
            log_q = (zt - m_t[:, None]) * inv_t - log_dt[:, None]
            p = tl.exp(log_p)
            if KIND == 0:
                g = p - tl.exp(log_q)
            elif KIND == 1:
                g = p * (tl.where(p > 0, log_p - log_q, 0.0) - inner[:, None])
            elif KIND == 2:
                log_m = _log_m(log_q, log_p, log_beta, log_1mbeta)
                g = (1.0 - beta) * p * (tl.where(p > 0, log_p - log_m, 0.0) - inner[:, None])
            elif KIND == 3:  # p (f - F), f = -(1 - skew) q / m
                log_m = _log_m(log_q, log_p, log_beta, log_1mbeta)
                ratio = tl.where(log_q > float("-inf"), tl.exp(log_q - log_m), 0.0)
                g = p * (-(1.0 - beta) * ratio - inner[:, None])
            else:  # p (f - F), f = log p - log m - skew p / m
                log_m = _log_m(log_q, log_p, log_beta, log_1mbeta)
                f = tl.where(p > 0, (log_p - log_m) - (1.0 - beta) * tl.exp(log_p - log_m), 0.0)
                g = p * (f - inner[:, None])
            g = g * grad_w
            if HAS_CE:
                g += alpha * (tl.exp((zs - m_s[:, None]) - log_d1[:, None])
                              - tl.where(cols[None, :] == label[:, None], 1.0, 0.0))
            # rows that are ignored or past N, and columns past V, contribute nothing (and no NaN)
            g = tl.where(keep[:, None] & cmask[None, :], g * row_w[:, None], 0.0)
            if HAS_BS:
                tl.atomic_add(gb_ptr + cols, tl.sum(g, axis=0), mask=cmask)
            for k in range(0, HS, BLOCK_K):
                kk = k + ks
                kmask = kk < HS
                w = tl.load(ws_ptr + cols[:, None] * ws_stride + kk[None, :], mask=cmask[:, None] & kmask[None, :],
                            other=0.0)
                h = tl.load(hs_ptr + rows[:, None] * hs_stride + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                            other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                    h = h.to(tl.float32)
                    gd = g
                else:  # bf16 / fp16 tiles: tensor-core dots with an fp32 accumulator
                    gd = g.to(w.dtype)
                gh_tile = gh_ptr + rows[:, None] * HS + kk[None, :]
                hmask = rmask[:, None] & kmask[None, :]
                tl.store(gh_tile, tl.load(gh_tile, mask=hmask, other=0.0) + tl.dot(gd, w, input_precision=PRECISION),
                         mask=hmask)
                tl.atomic_add(gw_ptr + cols[:, None] * HS + kk[None, :],
                              tl.dot(tl.trans(gd), h, input_precision=PRECISION), mask=cmask[:, None] & kmask[None, :])


def _tiled(hs: Tensor, ws: Tensor, bs: Tensor | None, ht: Tensor, wt: Tensor, bt: Tensor | None,
           labels: Tensor | None, o: Options, p: Precision, row_weight: Tensor | None,
           need_grad: bool) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The one-kernel path: row losses ``[N]`` and (if ``need_grad``) fp32 grads w.r.t. ``hs``, ``ws``, ``bs``.
    The operands are rounded to ``p``'s dtypes first (a copy only where they differ, as autocast makes)."""
    hs, ws = (x.to(p.student).contiguous() for x in (hs, ws))
    ht, wt = (x.to(p.teacher).contiguous() for x in (ht, wt))
    n, vocab = hs.shape[0], ws.shape[0]
    dev = hs.device
    rows = torch.empty(n, dtype=torch.float32, device=dev)
    grad_h = torch.zeros(hs.shape, dtype=torch.float32, device=dev) if need_grad else None
    grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=dev) if need_grad else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_grad and bs is not None else None
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    low_precision = p.student in HALF and p.teacher in HALF
    upcast = UPCAST if UPCAST is not None else interpreting or not low_precision
    precision = "ieee" if upcast else "tf32"  # tf32 only matters for fp32 tiles; bf16 tiles ignore it
    block_m, block_v, block_k = (16, 64, 32) if interpreting else (32, 128, 64)
    beta = o.mix  # the teacher's weight in m (jsd, skew kinds); in (0, 1) whenever read
    dummy = rows  # stands in for absent optional pointers; never read
    if n:
        fused_linear_kl_kernel[(triton.cdiv(n, block_m),)](
            hs, ws, dummy if bs is None else bs.contiguous(), ht, wt, dummy if bt is None else bt.contiguous(),
            dummy if labels is None else labels.contiguous(), dummy if row_weight is None else row_weight.float().contiguous(),
            rows, dummy if grad_h is None else grad_h, dummy if grad_w is None else grad_w,
            dummy if grad_b is None else grad_b,
            n, vocab, hs.shape[1], ht.shape[1], hs.stride(0), ws.stride(0), ht.stride(0), wt.stride(0),
            1.0 / o.temperature, beta, math.log(beta), math.log(1.0 - beta), o.soft_weight,
            o.soft_weight / o.temperature, o.alpha, o.ignore_index,
            KIND=KINDS[o.kind], HAS_LABELS=labels is not None, HAS_CE=o.alpha > 0, HAS_WEIGHT=row_weight is not None,
            HAS_BS=bs is not None, HAS_BT=bt is not None, NEED_GRAD=need_grad, UPCAST=upcast,
            PRECISION=precision, BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k,
            num_warps=1 if interpreting else 8,
        )
    return rows, grad_h, grad_w, grad_b


def chunk_rows(vocab: int, bytes_per_logit: int) -> int:
    """Rows per chunk of the GEMM path: the chunk's logits and gradient within ``CHUNK_BYTES``, a multiple
    of 128 rows (whole tensor-core tiles), at least 128; ``CHUNK_ROWS`` overrides (tests)."""
    if CHUNK_ROWS is not None:
        return CHUNK_ROWS
    return max(128, CHUNK_BYTES // max(vocab * bytes_per_logit, 1) // 128 * 128)


def _gemm(hs: Tensor, ws: Tensor, bs: Tensor | None, ht: Tensor, wt: Tensor, bt: Tensor | None,
          labels: Tensor | None, o: Options, p: Precision, row_weight: Tensor | None,
          need_grad: bool) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The library-GEMM path (GPU): per row chunk, fp32 logits from cuBLAS (operands in ``p``'s dtypes),
    the softmax-KL gradient ``G`` written by the Triton kernels of :mod:`hkd.kernels.softmax_kl` in the
    operand dtype (over the student logits when that is fp32), then ``grad_h = G @ W_s`` and
    ``grad_W += G.T @ h_s``.

    Every GEMM sums in fp32 inside the library. ``grad_W`` is summed over chunks in ``p.weight_grad``:
    the weight's dtype by default (a bf16 head keeps a bf16 buffer, rounded once per chunk: 384 rows
    at V=128256; an fp32 one would be 2 GiB at V=128256, H=4096), fp32 with ``weight_grad_fp32``
    (one rounding at the end). ``grad_h`` rows are written once each. Extra memory: the chunk's two
    fp32 logits tensors and its gradient (``CHUNK_BYTES``), ``grad_h``, ``grad_W`` (and ``grad_b`` in
    fp32), and the weight in the operand dtype when it is stored in another (an fp32 master under
    autocast: a bf16 copy, as autocast's own ``F.linear`` would make)."""
    n, vocab = hs.shape[0], ws.shape[0]
    dev = hs.device
    rows = torch.empty(n, dtype=torch.float32, device=dev)
    grad_h = torch.empty(hs.shape, dtype=hs.dtype, device=dev) if need_grad else None
    grad_w = torch.zeros(ws.shape, dtype=p.weight_grad, device=dev) if need_grad else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_grad and bs is not None else None
    ones = torch.ones(1, dtype=torch.float32, device=dev)
    w_s, w_t = gemm_operand(ws, p.student), gemm_operand(wt, p.teacher)
    separate_grad = p.student in HALF  # G in bf16 / fp16 for the tensor-core GEMMs; else over the logits
    step = chunk_rows(vocab, 8 + (p.student.itemsize if separate_grad else 0))
    for i in range(0, n, step):
        j = min(i + step, n)
        h = gemm_operand(hs[i:j], p.student)
        zs = mm32(h, w_s.T)
        zt = mm32(gemm_operand(ht[i:j], p.teacher), w_t.T)
        if bs is not None:
            zs += bs
        if bt is not None:
            zt += bt
        lab = None if labels is None else labels[i:j]
        rows[i:j], stats = softmax_kl.forward(zs, zt, lab, o)
        if not need_grad:
            continue
        assert grad_h is not None and grad_w is not None
        up = ones.expand(j - i) if row_weight is None else row_weight[i:j].float()
        out = torch.empty(zs.shape, dtype=p.student, device=dev) if separate_grad else zs
        g = gemm_operand(softmax_kl.backward(zs, zt, lab, stats, up, o, out=out), p.student)
        grad_h[i:j] = mm32(g, w_s)
        addmm32_(grad_w, g.T, h)
        if grad_b is not None:
            grad_b.add_(g.sum(0, dtype=torch.float32))
    return rows, grad_h, grad_w, grad_b


def launch(hs: Tensor, ws: Tensor, bs: Tensor | None, ht: Tensor, wt: Tensor, bt: Tensor | None,
           labels: Tensor | None, o: Options, p: Precision, row_weight: Tensor | None,
           need_grad: bool) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Row losses ``[N]`` and (if ``need_grad``) grads w.r.t. ``hs``, ``ws`` and ``bs``: the GEMM path
    on CUDA, the tiled kernel under the interpreter (``GEMM_PATH`` forces either)."""
    use_gemm = GEMM_PATH if GEMM_PATH is not None else hs.is_cuda
    with torch.no_grad():
        return (_gemm if use_gemm else _tiled)(hs, ws, bs, ht, wt, bt, labels, o, p, row_weight, need_grad)


def triton_fused_row_losses(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                            teacher_weight: Tensor, labels: Tensor | None, *, student_bias: Tensor | None,
                            teacher_bias: Tensor | None, weight_grad_fp32: bool = False, **options: Any) -> Tensor:
    """``fused_linear_distill_loss`` backend: per-row losses ``[N]`` (fp32)."""
    check_device("triton", student_hidden, student_weight, teacher_hidden, teacher_weight)
    tb = None if teacher_bias is None else teacher_bias.detach()
    p = fused_precision(student_hidden, student_weight, teacher_hidden, teacher_weight, weight_grad_fp32)
    return StoredGradFusedLoss.apply(launch, student_hidden, student_weight, student_bias, teacher_hidden.detach(),
                                     teacher_weight.detach(), tb, labels, Options(**options), p)
