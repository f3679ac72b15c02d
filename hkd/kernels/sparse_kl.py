r"""Triton ``sparse_distill_loss``: student logits against cached top-k teacher targets.

The math (and the torch backend) is in :mod:`hkd.kernels.sparse`. The teacher side is ``[N, k]``
and is tempered in torch (:func:`hkd.kernels.reference.sparse_teacher_log_probs`); the kernels
only stream the student's ``[N, V]`` logits:

* ``_sparse_forward_kernel`` (one program per row, one pass over V): the online log-sum-exp of
  :math:`z_s/T` (raw maximum subtracted first, as in :mod:`hkd.kernels.softmax_kl`), of
  :math:`z_s` for the CE term and, for ``tail="bucket"``, the same sum restricted to tokens
  outside the cached ids, so :math:`p_\text{tail}` is summed directly, never ``1 - \sum_j p_j``
  (which cancels when the top-k hold most of the mass). Membership walks the row's ids sorted
  (by the launcher): the vocabulary blocks come in increasing order, so a cursor into the sorted
  ids visits each id once, and each id costs one ``[BLOCK_V]`` comparison. No ``[BLOCK_V, k]``
  tile is held (at k >= 64 that tile spilled registers), and the work is ``O(k * BLOCK_V)`` per
  row rather than ``O(k * V)``. Then the ``k`` gathered logits give the row loss, in blocks of
  ``BLOCK_K`` ids; 4 statistics per row are saved.
* ``_sparse_backward_kernel`` (a (row, block) grid): every token gets
  :math:`p_v (1 - q_\text{tail}/p_\text{tail})` (or :math:`p_v` for ``renormalize``) times the
  row's fp32 upstream gradient and weights, plus the CE term; the logits are read once and the
  gradient written once (no teacher tensor to read: 4 bytes per entry in bf16).
* ``_sparse_fix_kernel`` (a (row, block of ``BLOCK_K`` ids) grid, launched after): overwrites the
  cached ids with :math:`p_v - \sum_{j: id_j = v} q_j` (repeated ids add up, as in the formula),
  comparing the block's ids with the row's in ``[BLOCK_K, BLOCK_K]`` tiles.

Rows are read as an aligned body plus an edge, as in :mod:`hkd.kernels.softmax_kl` (vector loads
at any V and row stride). Block sizes follow ``softmax_kl.launch_options`` (and its ``BLOCK_V``
override); no block size depends on k, so one compiled kernel serves every k.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import sparse_teacher_log_probs
from .softmax_kl import (
    LN2, LOG2E, NEG_BIG, _edge, _row_split, check_device, empty_rows_like, interpreting, launch_options, peeling,
)
from .sparse import SparseOptions


BLOCK_K = 16  # ids per block in the loss gather and the fix-up's tiles


@triton.jit
def _cached(cols, sorted_row, cursor, end, k_row, V):
    """Which of ``cols`` are cached ids: the row's sorted ids from ``cursor`` on that are below ``end``
    are compared one at a time; returns the hits and the cursor past them."""
    hit = cols < 0
    nxt = tl.load(sorted_row + cursor, mask=cursor < k_row, other=V)  # V: past every column
    while nxt < end:
        hit = hit | (cols == nxt)
        cursor += 1
        nxt = tl.load(sorted_row + cursor, mask=cursor < k_row, other=V)
    return hit, cursor


@triton.jit
def _sparse_step(z, hit, m, d_s, d_1, d_tail, inv_t, TAIL: tl.constexpr, HAS_CE: tl.constexpr):
    """One block of the online pass: the running max and the sums of all tokens, of the tail tokens
    (``hit``: cached, left out) and at ``T = 1``."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    ew = tl.exp2((z - m_new) * (inv_t * LOG2E))
    rescale = tl.exp2((m - m_new) * (inv_t * LOG2E))
    d_s = d_s * rescale + tl.sum(ew, axis=0)
    if TAIL:
        d_tail = d_tail * rescale + tl.sum(tl.where(hit, 0.0, ew), axis=0)
    if HAS_CE:
        d_1 = d_1 * tl.exp2((m - m_new) * LOG2E) + tl.sum(tl.exp2((z - m_new) * LOG2E), axis=0)
    return m_new, d_s, d_1, d_tail


@triton.jit
def _sparse_forward_kernel(s_ptr, ids_ptr, sorted_ptr, logq_ptr, logqt_ptr, labels_ptr, loss_ptr, stats_ptr,
                           s_stride, ids_stride, q_stride, V, K, inv_t, soft_w, alpha, ignore_index,
                           TAIL: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
                           BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr, PEEL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    keep = True
    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        keep = label != ignore_index
        label = tl.where(keep, label, 0)
    k_row = tl.where(keep, K, 0)  # an ignored row's ids are never dereferenced
    sorted_row = sorted_ptr + row * ids_stride
    head, body = _row_split(row * s_stride, V, VEC, PEEL)
    s_body = s_row
    if PEEL:  # true by _row_split and the launcher's check; the hint makes the body's loads vectors
        s_body = s_ptr + tl.multiple_of(row * s_stride + head, VEC)
    cols = tl.arange(0, BLOCK_V)
    cursor = tl.full([], 0, tl.int32)  # a tensor: it is carried through the loops
    m = NEG_BIG; d_s = 0.0; d_1 = 0.0; d_tail = 0.0  # noqa: E702
    for start in range(0, body, BLOCK_V):
        offs = start + cols
        z = tl.load(s_body + offs, mask=offs < body, other=float("-inf")).to(tl.float32)
        hit = offs < 0
        if TAIL:  # ids below this block's end (the head's too, which match nothing here) are consumed
            hit, cursor = _cached(head + offs, sorted_row, cursor, tl.minimum(head + start + BLOCK_V, head + body),
                                  k_row, V)
        m, d_s, d_1, d_tail = _sparse_step(z, hit, m, d_s, d_1, d_tail, inv_t, TAIL, HAS_CE)
    if PEEL:
        e_cols, e_mask = _edge(head, body, V, VEC)
        z_edge = tl.load(s_row + e_cols, mask=e_mask, other=float("-inf")).to(tl.float32)
        hit_edge = e_cols < 0
        if TAIL:  # the edge's columns lie at both ends of the row: compare with every id
            hit_edge, cursor = _cached(e_cols, sorted_row, tl.full([], 0, tl.int32), V, k_row, V)
        m, d_s, d_1, d_tail = _sparse_step(z_edge, hit_edge, m, d_s, d_1, d_tail, inv_t, TAIL, HAS_CE)
    log_ds = tl.log2(d_s) * LN2
    soft = 0.0
    for kb in range(0, k_row, BLOCK_K):
        ks = kb + tl.arange(0, BLOCK_K)
        kmask = ks < k_row
        ids = tl.load(ids_ptr + row * ids_stride + ks, mask=kmask, other=0).to(tl.int64)
        zk = tl.load(s_row + ids, mask=kmask, other=0.0).to(tl.float32)
        log_pk = (zk - m) * inv_t - log_ds
        log_q = tl.load(logq_ptr + row * q_stride + ks, mask=kmask, other=float("-inf"))
        q = tl.exp2(log_q * LOG2E)
        soft += tl.sum(tl.where(q > 0, q * (log_q - log_pk), 0.0), axis=0)
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
def _sparse_gradient(z, cols, label, up, m, log_ds, log_d1, log_qt, log_ptail, inv_t, grad_w, alpha,
                     TAIL: tl.constexpr, HAS_CE: tl.constexpr):
    """``up * d loss / d z_s`` on columns that are not cached ids (those are fixed up after)."""
    p = tl.exp2(((z - m) * inv_t - log_ds) * LOG2E)
    g = p
    if TAIL:
        ratio = tl.where(log_qt > float("-inf"), tl.exp2((log_qt - log_ptail) * LOG2E), 0.0)  # q_tail / p_tail
        g = p * (1.0 - ratio)
    g = g * (grad_w * up)
    if HAS_CE:
        p1 = tl.exp2(((z - m) - log_d1) * LOG2E)
        g += (alpha * up) * (p1 - tl.where(cols == label, 1.0, 0.0))
    return g


@triton.jit
def _sparse_backward_kernel(s_ptr, logqt_ptr, labels_ptr, stats_ptr, up_ptr, g_ptr, s_stride, g_stride, up_stride, V,
                            inv_t, grad_w, alpha, ignore_index,
                            TAIL: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, BLOCK_V: tl.constexpr,
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
    up = tl.load(up_ptr + row * up_stride).to(tl.float32)
    st = stats_ptr + row * 4
    m = tl.load(st + 0)
    log_ds = tl.load(st + 1)
    log_d1 = tl.load(st + 2)
    log_ptail = tl.load(st + 3)
    log_qt = 0.0
    if TAIL:
        log_qt = tl.load(logqt_ptr + row)
    s_body = s_ptr + row * s_stride
    g_body = g_ptr + row * g_stride
    if PEEL:  # true by _row_split and the launcher's check; the hint makes the loads and stores vectors
        s_body = s_ptr + tl.multiple_of(row * s_stride + head, VEC)
        g_body = g_ptr + tl.multiple_of(row * g_stride + head, VEC)
    z = tl.load(s_body + offs, mask=mask, other=float("-inf")).to(tl.float32)
    g = _sparse_gradient(z, head + offs, label, up, m, log_ds, log_d1, log_qt, log_ptail, inv_t, grad_w, alpha,
                         TAIL, HAS_CE)
    tl.store(g_body + offs, tl.where(keep, g, 0.0).to(g_ptr.dtype.element_ty), mask=mask)
    if PEEL:
        if tl.program_id(1) == 0:  # the first program of the row also writes its edge
            e_cols, e_mask = _edge(head, body, V, VEC)
            z_edge = tl.load(s_ptr + row * s_stride + e_cols, mask=e_mask, other=float("-inf")).to(tl.float32)
            g_edge = _sparse_gradient(z_edge, e_cols, label, up, m, log_ds, log_d1, log_qt, log_ptail, inv_t, grad_w,
                                      alpha, TAIL, HAS_CE)
            tl.store(g_ptr + row * g_stride + e_cols, tl.where(keep, g_edge, 0.0).to(g_ptr.dtype.element_ty),
                     mask=e_mask)


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
    k_row = tl.where(keep, K, 0)
    ks = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < k_row
    ids = tl.load(ids_ptr + row * ids_stride + ks, mask=kmask, other=-1).to(tl.int64)
    q_at = tl.zeros((BLOCK_K,), tl.float32)  # the teacher's mass on each of these ids (repeated ids add up)
    for jb in range(0, k_row, BLOCK_K):
        js = jb + tl.arange(0, BLOCK_K)
        jmask = js < k_row
        others = tl.load(ids_ptr + row * ids_stride + js, mask=jmask, other=-2).to(tl.int64)
        q = tl.exp2(tl.load(logq_ptr + row * q_stride + js, mask=jmask, other=float("-inf")) * LOG2E)
        q_at += tl.sum(tl.where(ids[:, None] == others[None, :], q[None, :], 0.0), axis=1)
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


class SparseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, student: Tensor, ids: Tensor, log_q: Tensor, log_qt: Tensor, labels: Tensor | None,
                o: SparseOptions) -> Tensor:
        n, vocab = student.shape
        k = ids.shape[1]
        rows = torch.empty(n, dtype=torch.float32, device=student.device)
        stats = torch.empty(n, 4, dtype=torch.float32, device=student.device)
        tail = o.tail == "bucket"
        if n:
            sorted_ids = ids.sort(-1).values if tail else ids  # the membership walk needs them in order
            _sparse_forward_kernel[(n,)](
                student, ids, sorted_ids, log_q, log_qt, rows if labels is None else labels, rows, stats,
                student.stride(0), ids.stride(0), log_q.stride(0), vocab, k, 1.0 / o.temperature, o.soft_weight,
                o.alpha, o.ignore_index, TAIL=tail, HAS_LABELS=labels is not None, HAS_CE=o.alpha > 0,
                BLOCK_K=BLOCK_K, **launch_options(vocab, "forward"), **peeling(student))
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
        grad = empty_rows_like(student)
        lab = stats if labels is None else labels
        if n and vocab:
            opts = launch_options(vocab, "backward")
            _sparse_backward_kernel[(n, triton.cdiv(vocab, opts["BLOCK_V"]))](
                student, log_qt, lab, stats, up, grad, student.stride(0), grad.stride(0), up.stride(0), vocab,
                1.0 / o.temperature, o.soft_weight / o.temperature, o.alpha, o.ignore_index,
                TAIL=o.tail == "bucket", HAS_LABELS=labels is not None, HAS_CE=o.alpha > 0, **opts,
                **peeling(student, grad))
            _sparse_fix_kernel[(n, triton.cdiv(k, BLOCK_K))](
                student, ids, log_q, lab, stats, up, grad, student.stride(0), ids.stride(0), log_q.stride(0),
                grad.stride(0), up.stride(0), k, 1.0 / o.temperature, o.soft_weight / o.temperature, o.alpha,
                o.ignore_index, HAS_LABELS=labels is not None, HAS_CE=o.alpha > 0,
                BLOCK_K=BLOCK_K, num_warps=1 if interpreting() else 4)
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
