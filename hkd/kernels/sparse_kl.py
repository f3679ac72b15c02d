r"""Triton ``sparse_distill_loss``: student logits against cached top-k teacher targets.

The math (and the torch backend) is in :mod:`hkd.kernels.sparse`. The teacher side is ``[N, k]``
and is tempered in torch (:func:`hkd.kernels.reference.sparse_teacher_log_probs`); the kernels
only stream the student's ``[N, V]`` logits:

* ``_sparse_forward_kernel`` (one program per row, one pass over V): the online log-sum-exp of
  :math:`z_s/T` (raw maximum subtracted first, as in :mod:`hkd.kernels.softmax_kl`), of
  :math:`z_s` for the CE term and, for ``tail="bucket"``, the same sum restricted to tokens
  outside the cached ids (a ``[BLOCK_V, BLOCK_K]`` membership test, so :math:`p_\text{tail}` is
  summed directly, never ``1 - \sum_j p_j``, which cancels when the top-k hold most of the
  mass). Then the ``k`` gathered logits give the row loss; 4 statistics per row are saved.
* ``_sparse_backward_kernel`` (a (row, block) grid): every token gets
  :math:`p_v (1 - q_\text{tail}/p_\text{tail})` (or :math:`p_v` for ``renormalize``) times the
  row's fp32 upstream gradient and weights, plus the CE term; the logits are read once and the
  gradient written once (no teacher tensor to read: 4 bytes per entry in bf16).
* ``_sparse_fix_kernel`` (one program per row, ``k`` elements, launched after): overwrites the
  cached ids with :math:`p_v - \sum_{j: id_j = v} q_j` (repeated ids add up, as in the formula).

Block sizes are fixed (``softmax_kl.BLOCK_V`` overrides them, as for the dense kernels).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import softmax_kl
from .reference import sparse_teacher_log_probs
from .softmax_kl import LN2, LOG2E, NEG_BIG, check_device, interpreting
from .sparse import SparseOptions


@triton.jit
def _sparse_forward_kernel(s_ptr, ids_ptr, logq_ptr, logqt_ptr, labels_ptr, loss_ptr, stats_ptr,
                           s_stride, ids_stride, q_stride, V, K, inv_t, soft_w, alpha, ignore_index,
                           TAIL: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
                           BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    keep = True
    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        keep = label != ignore_index
        label = tl.where(keep, label, 0)
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < tl.where(keep, K, 0)  # an ignored row's ids are never dereferenced
    ids = tl.load(ids_ptr + row * ids_stride + ks, mask=kmask, other=-1).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    c = inv_t * LOG2E
    m = NEG_BIG; d_s = 0.0; d_1 = 0.0; d_tail = 0.0  # noqa: E702
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        z = tl.load(s_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        ew = tl.exp2((z - m_new) * c)
        rescale = tl.exp2((m - m_new) * c)
        d_s = d_s * rescale + tl.sum(ew, axis=0)
        if TAIL:
            cached = tl.sum((offs[:, None] == ids[None, :]).to(tl.int32), axis=1) > 0
            d_tail = d_tail * rescale + tl.sum(tl.where(cached, 0.0, ew), axis=0)
        if HAS_CE:
            d_1 = d_1 * tl.exp2((m - m_new) * LOG2E) + tl.sum(tl.exp2((z - m_new) * LOG2E), axis=0)
        m = m_new
    log_ds = tl.log2(d_s) * LN2
    zk = tl.load(s_row + ids, mask=kmask, other=0.0).to(tl.float32)
    log_pk = (zk - m) * inv_t - log_ds
    log_q = tl.load(logq_ptr + row * q_stride + ks, mask=kmask, other=float("-inf"))
    q = tl.exp2(log_q * LOG2E)
    soft = tl.sum(tl.where(q > 0, q * (log_q - log_pk), 0.0), axis=0)
    log_ptail = 0.0
    if TAIL:
        log_ptail = tl.log2(d_tail) * LN2 - log_ds
        log_qt = tl.load(logqt_ptr + row)
        qt = tl.exp2(log_qt * LOG2E)
        soft += tl.where(qt > 0, qt * (log_qt - log_ptail), 0.0)
    loss = soft_w * soft
    log_d1 = 0.0
    if HAS_CE:
        log_d1 = tl.log2(d_1) * LN2
        loss += alpha * (log_d1 - (tl.load(s_row + label).to(tl.float32) - m))
    tl.store(loss_ptr + row, tl.where(keep, loss, 0.0))
    st = stats_ptr + row * 4
    tl.store(st + 0, m)
    tl.store(st + 1, log_ds)
    tl.store(st + 2, log_d1)
    tl.store(st + 3, log_ptail)


@triton.jit
def _sparse_backward_kernel(s_ptr, logqt_ptr, labels_ptr, stats_ptr, up_ptr, g_ptr, s_stride, g_stride, up_stride, V,
                            inv_t, grad_w, alpha, ignore_index,
                            TAIL: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    keep = True
    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        keep = label != ignore_index
    up = tl.load(up_ptr + row * up_stride).to(tl.float32)
    st = stats_ptr + row * 4
    m = tl.load(st + 0)
    z = tl.load(s_ptr + row * s_stride + offs, mask=mask, other=float("-inf")).to(tl.float32)
    p = tl.exp2(((z - m) * inv_t - tl.load(st + 1)) * LOG2E)
    g = p
    if TAIL:
        log_qt = tl.load(logqt_ptr + row)
        ratio = tl.where(log_qt > float("-inf"), tl.exp2((log_qt - tl.load(st + 3)) * LOG2E), 0.0)  # q_tail / p_tail
        g = p * (1.0 - ratio)
    g = g * (grad_w * up)
    if HAS_CE:
        p1 = tl.exp2(((z - m) - tl.load(st + 2)) * LOG2E)
        g += (alpha * up) * (p1 - tl.where(offs == label, 1.0, 0.0))
    g = tl.where(keep, g, 0.0)
    tl.store(g_ptr + row * g_stride + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sparse_fix_kernel(s_ptr, ids_ptr, logq_ptr, labels_ptr, stats_ptr, up_ptr, g_ptr, s_stride, ids_stride, q_stride,
                       g_stride, up_stride, K, inv_t, grad_w, alpha, ignore_index,
                       HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    keep = True
    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        keep = label != ignore_index
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < tl.where(keep, K, 0)
    ids = tl.load(ids_ptr + row * ids_stride + ks, mask=kmask, other=-1).to(tl.int64)
    q = tl.exp2(tl.load(logq_ptr + row * q_stride + ks, mask=kmask, other=float("-inf")) * LOG2E)
    q_at = tl.sum(tl.where(ids[:, None] == ids[None, :], q[None, :], 0.0), axis=1)  # repeated ids add up
    up = tl.load(up_ptr + row * up_stride).to(tl.float32)
    st = stats_ptr + row * 4
    m = tl.load(st + 0)
    z = tl.load(s_ptr + row * s_stride + ids, mask=kmask, other=0.0).to(tl.float32)
    p = tl.exp2(((z - m) * inv_t - tl.load(st + 1)) * LOG2E)
    g = (p - q_at) * (grad_w * up)
    if HAS_CE:
        p1 = tl.exp2(((z - m) - tl.load(st + 2)) * LOG2E)
        g += (alpha * up) * (p1 - tl.where(ids == label, 1.0, 0.0))
    tl.store(g_ptr + row * g_stride + ids, g.to(g_ptr.dtype.element_ty), mask=kmask)


def _blocks(vocab: int, block_k: int, tail: bool) -> tuple[int, int, int]:
    """(forward BLOCK_V, backward BLOCK_V, num_warps). The bucket tail's membership test holds a
    ``[BLOCK_V, BLOCK_K]`` tile, so the forward block shrinks as k grows (at most 64K entries)."""
    if softmax_kl.BLOCK_V is not None:
        return softmax_kl.BLOCK_V, softmax_kl.BLOCK_V, 1 if interpreting() else 8
    if interpreting():
        b = min(triton.next_power_of_2(max(vocab, 1)), softmax_kl.INTERPRET_BLOCK_V)
        return b, b, 1
    return (max(256, min(4096, 65536 // block_k)) if tail else 4096), 2048, 8


class SparseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, student: Tensor, ids: Tensor, log_q: Tensor, log_qt: Tensor, labels: Tensor | None,
                o: SparseOptions) -> Tensor:
        n, vocab = student.shape
        k = ids.shape[1]
        rows = torch.empty(n, dtype=torch.float32, device=student.device)
        stats = torch.empty(n, 4, dtype=torch.float32, device=student.device)
        block_k = max(triton.next_power_of_2(k), 2)
        fwd_block, _, warps = _blocks(vocab, block_k, o.tail == "bucket")
        if n:
            _sparse_forward_kernel[(n,)](
                student, ids, log_q, log_qt, rows if labels is None else labels, rows, stats, student.stride(0),
                ids.stride(0), log_q.stride(0), vocab, k, 1.0 / o.temperature, o.soft_weight, o.alpha, o.ignore_index,
                TAIL=o.tail == "bucket", HAS_LABELS=labels is not None, HAS_CE=o.alpha > 0, BLOCK_V=fwd_block,
                BLOCK_K=block_k, num_warps=warps)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(student, ids, log_q, log_qt, labels, stats)
        ctx.o = o
        return rows

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor | None, ...]:
        student, ids, log_q, log_qt, labels, stats = ctx.saved_tensors
        o: SparseOptions = ctx.o
        n, vocab = student.shape
        k = ids.shape[1]
        up = grad_rows.float()
        grad = torch.empty_like(student, memory_format=torch.contiguous_format)
        block_k = max(triton.next_power_of_2(k), 2)
        _, block, warps = _blocks(vocab, block_k, o.tail == "bucket")
        lab = stats if labels is None else labels
        if n and vocab:
            _sparse_backward_kernel[(n, triton.cdiv(vocab, block))](
                student, log_qt, lab, stats, up, grad, student.stride(0), grad.stride(0), up.stride(0), vocab,
                1.0 / o.temperature, o.soft_weight / o.temperature, o.alpha, o.ignore_index,
                TAIL=o.tail == "bucket", HAS_LABELS=labels is not None, HAS_CE=o.alpha > 0, BLOCK_V=block,
                num_warps=warps)
            _sparse_fix_kernel[(n,)](
                student, ids, log_q, lab, stats, up, grad, student.stride(0), ids.stride(0), log_q.stride(0),
                grad.stride(0), up.stride(0), k, 1.0 / o.temperature, o.soft_weight / o.temperature, o.alpha,
                o.ignore_index, HAS_LABELS=labels is not None, HAS_CE=o.alpha > 0,
                BLOCK_K=block_k, num_warps=1 if interpreting() else 4)
        return grad, None, None, None, None, None


def triton_sparse_row_losses(student_logits: Tensor, topk_ids: Tensor, topk_values: Tensor,
                             teacher_logsumexp: Tensor | None, labels: Tensor | None, **options: Any) -> Tensor:
    """``sparse_distill_loss`` backend: per-row losses ``[N]`` (fp32)."""
    check_device("triton", student_logits, topk_values)
    o = SparseOptions(**options)
    values = topk_values.detach()
    lse = None if teacher_logsumexp is None else teacher_logsumexp.detach()
    if labels is not None:  # ignored rows may hold garbage targets: keep NaN out of the [N, k] maths
        keep = labels != o.ignore_index
        values = torch.where(keep[:, None], values, 0.0)
        lse = None if lse is None else torch.where(keep, lse, 1.0)
    log_q, log_qt = sparse_teacher_log_probs(values, lse, vocab=student_logits.shape[-1], temperature=o.temperature,
                                             tail=o.tail)
    log_q = log_q.float().contiguous()
    log_qt = log_q.new_zeros(log_q.shape[0]) if log_qt is None else log_qt.float().contiguous()
    student = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    return SparseKL.apply(student, topk_ids.contiguous(), log_q, log_qt, labels, o)
