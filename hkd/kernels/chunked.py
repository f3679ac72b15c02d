r"""Chunked torch backend: stream over row blocks, write the gradient during the forward.

Eager ``log_softmax`` + ``kl_div`` keeps several fp32 ``[N, V]`` tensors alive for autograd
(tempered log-probs of student and teacher, probabilities, the loss terms, the gradient). Here
one row block of ``R`` rows (``R * V`` about 4M elements) is in flight at a time, its
closed-form gradient is written into one ``[N, V]`` buffer (student dtype), and ``backward``
only scales that buffer by ``grad_output``: extra memory is that buffer plus ``O(R * V)``.

Closed-form gradients w.r.t. the tempered student logits :math:`s = z_s / T` (rows of the
block; :math:`p = P_s`, :math:`q = P_t`):

* forward KL, :math:`\sum q (\log q - \log p)`: :math:`p - q`
* reverse KL, :math:`D = \sum p (\log p - \log q)`: :math:`p\,(\log p - \log q - D)`
* JSD, :math:`\beta\,\mathrm{KL}(q\|m) + (1-\beta)\,\mathrm{KL}(p\|m)` with
  :math:`m = \beta q + (1-\beta) p`: :math:`(1-\beta)\,p\,(\log p - \log m - \mathrm{KL}(p\|m))`
  (the terms through :math:`m` cancel)
* skew KL, :math:`\mathrm{KL}(q\|m)` with :math:`m = a q + (1-a) p` (``skew`` = :math:`a`), and
  skew reverse KL, :math:`\mathrm{KL}(p\|m)` with :math:`m = a p + (1-a) q`: both are
  :math:`p\,(f - \sum_v p_v f_v)` for a per-token :math:`f = \partial D / \partial p`
  (up to a constant, which the softmax Jacobian removes):
  :math:`f = -(1-a)\,q/m` for skew KL and :math:`f = \log p - \log m - a\,p/m` for skew
  reverse KL. The ratios are bounded (:math:`q/m \le 1/a`, :math:`p/m \le 1/a`); at
  :math:`a = 0` they are not, so ``skew=0`` runs as plain forward / reverse KL.

and the chain rule adds :math:`(1-\alpha)\,c / T` (:math:`c = T^2` or 1); the cross-entropy
term adds :math:`\alpha(\mathrm{softmax}(z_s) - \mathrm{onehot}(y))`.

The fused-linear variant does the same per row block of hidden states: it builds that
block's logits ``h @ W.T + b`` only, and accumulates ``grad_h = G @ W_s`` and
``grad_W += G.T @ h_s`` from the block's logit gradient ``G``. The GEMM operands are rounded to
:func:`hkd.kernels.reference.operand_dtype` (autocast's bf16 under ``bf16-mixed``), their
products summed in fp32 and the logits kept in fp32, so a block's softmax sees the same logits
as the Triton and torch backends (bf16 logits of size 100 are 0.5 apart: 3% off in the loss).
``G`` is rounded to the operand dtype for the two backward GEMMs; ``grad_W`` is summed over
blocks in the weight's dtype, or in fp32 with ``weight_grad_fp32`` (:class:`Precision`).

``backward`` consumes the stored gradient (scaled in place, no second ``[N, V]`` copy), so it
can run once per forward; a second backward (``retain_graph=True``) raises.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import operand_dtype

BLOCK_ELEMENTS = 1 << 22  # elements of one row block's [R, V] fp32 temporaries (16 MiB each)
# fused-linear blocks: every block also reads and writes the whole [V, H] fp32 weight gradient,
# a cost that only more rows per block amortise (its share of a block's work is ~1/rows whatever
# V is). So at least FUSED_ROWS rows, while the block's temporaries stay under FUSED_BLOCK_ELEMENTS
# (at H=1024, V=128256 on CPU: 32 -> 128 rows cut the time by a third, for 0.25 GiB more memory).
FUSED_ROWS = 128
FUSED_BLOCK_ELEMENTS = 1 << 24


class Options(NamedTuple):
    ignore_index: int
    divergence: str
    beta: float
    temperature: float
    scale_t2: bool
    alpha: float
    skew: float = 0.1  # skew_forward_kl / skew_reverse_kl mixing weight (last: it has a default)

    @property
    def kind(self) -> str:
        """jsd at beta 0 / 1 is forward / reverse KL (TRL's convention; see reference); the skew
        divergences at skew 0 are plain forward / reverse KL (their closed forms divide by m = p or q)."""
        if self.divergence == "jsd" and self.beta in (0.0, 1.0):
            return "forward_kl" if self.beta == 0.0 else "reverse_kl"
        if self.divergence in ("skew_forward_kl", "skew_reverse_kl") and self.skew == 0.0:
            return self.divergence[len("skew_"):]
        return self.divergence

    @property
    def mix(self) -> float:
        """The teacher's weight in the mixture ``m = mix q + (1 - mix) p`` (jsd and skew kinds; 0.5 unused)."""
        kind = self.kind
        if kind == "jsd":
            return self.beta
        if kind == "skew_forward_kl":
            return self.skew
        if kind == "skew_reverse_kl":
            return 1.0 - self.skew
        return 0.5

    @property
    def soft_weight(self) -> float:
        return (1.0 - self.alpha) * (self.temperature**2 if self.scale_t2 else 1.0)


def accumulation_dtype(x: Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 stays fp64 (tests compare against fp64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


HALF = (torch.bfloat16, torch.float16)
# torch >= 2.8 multiplies bf16 / fp16 matrices into an fp32 result on CUDA (cuBLAS, fp32 accumulation)
MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")
TEMP_ELEMENTS = 1 << 26  # bound on the fp32 temporary of one grad_W update (256 MiB)


class Precision(NamedTuple):
    """The fused LM head's dtypes: the GEMM operands of each side (:func:`operand_dtype`) and the
    buffer ``grad_W`` is summed in over row blocks."""

    student: torch.dtype
    teacher: torch.dtype
    weight_grad: torch.dtype


def fused_precision(hs: Tensor, ws: Tensor, ht: Tensor, wt: Tensor, weight_grad_fp32: bool) -> Precision:
    """Read where the op is called (autocast on or off), before the backend turns autocast off."""
    return Precision(operand_dtype(hs, ws), operand_dtype(ht, wt),
                     accumulation_dtype(ws) if weight_grad_fp32 else ws.dtype)


def gemm_operand(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` rounded to ``dtype``, stored as :func:`mm32` multiplies it: in ``dtype`` where the device
    multiplies bf16 / fp16 into an fp32 result (CUDA), else as fp32 holding the same rounded values."""
    x = x.to(dtype)
    return x.float() if dtype in HALF and not (x.is_cuda and MM_OUT_DTYPE) else x


def mm32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of :func:`gemm_operand` operands, summed in fp32 into an fp32 result (fp64 stays fp64)."""
    return torch.mm(a, b, out_dtype=torch.float32) if a.dtype in HALF else torch.mm(a, b)


def addmm32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b``: the products summed in fp32 (fp64), then added to ``acc`` in its own dtype
    (rounded once per call when ``acc`` is bf16)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    step = max(1, TEMP_ELEMENTS // max(b.shape[1], 1))  # bf16 operands into an fp32 buffer: bounded temporaries
    for i in range(0, a.shape[0], step):
        acc[i:i + step].add_(mm32(a[i:i + step], b))


def tempered(x: Tensor, temperature: float) -> Tensor:
    """``x / T`` up to a per-row shift (which softmax ignores): the row max is subtracted before
    dividing, so logits that share a large offset (1e4) keep their digits when T is not a power
    of two (``x / T`` rounds at the offset's scale: 1e-4 relative error in the gradient). For a
    power of two ``x / T`` is exact and the extra pass (7% of a block's CPU time) is skipped."""
    if math.frexp(temperature)[0] == 0.5:  # a power of two: x / T is exact, skip the max pass (CPU time)
        return x if temperature == 1 else x / temperature
    return (x - x.amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).min)).div_(temperature)


def _plogq(p: Tensor, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """(log p - log q with 0 where p == 0, and sum p * that): 0 log 0 = 0."""
    diff = torch.where(p > 0, log_p - log_q, 0.0)
    return diff, (p * diff).sum(-1)


def block_loss_and_grad(student: Tensor, teacher: Tensor, labels: Tensor | None, o: Options,
                        need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Row losses ``[R]`` and their gradient w.r.t. the student logits ``[R, V]`` (fp32)."""
    acc = accumulation_dtype(student)
    s, t = student.to(acc), teacher.to(acc)
    keep = None if labels is None else labels != o.ignore_index
    if keep is not None:  # ignored rows may hold NaN padding: compute on zeros, then zero them
        s = torch.where(keep[:, None], s, 0.0)
        t = torch.where(keep[:, None], t, 0.0)
    log_p = F.log_softmax(tempered(s, o.temperature), dim=-1)
    log_q = F.log_softmax(tempered(t, o.temperature), dim=-1)
    p, q = log_p.exp(), log_q.exp()
    kind, grad = o.kind, None
    if kind == "forward_kl":  # the common case: in place, fewer [R, V] passes
        diff = log_q.sub_(log_p).masked_fill_(q == 0, 0.0)
        loss = diff.mul_(q).sum(-1)
        if need_grad:
            grad = p.sub_(q)
    elif kind == "reverse_kl":
        diff, loss = _plogq(p, log_p, log_q)
        if need_grad:
            grad = p.mul_(diff.sub_(loss[:, None]))
    elif kind in ("skew_forward_kl", "skew_reverse_kl"):
        w = o.mix  # teacher weight in m
        log_m = torch.logaddexp(log_q + math.log(w), log_p + math.log(1.0 - w))
        if kind == "skew_forward_kl":  # KL(q || m), f = -(1 - skew) q / m
            loss = _plogq(q, log_q, log_m)[1]
            f = torch.where(q > 0, (log_q - log_m).exp_(), 0.0).mul_(-(1.0 - w)) if need_grad else None
        else:  # KL(p || m), f = log p - log m - skew p / m
            diff, loss = _plogq(p, log_p, log_m)
            f = diff.sub_(torch.where(p > 0, (log_p - log_m).exp_(), 0.0).mul_(1.0 - w)) if need_grad else None
        if f is not None:
            grad = f.sub_((p * f).sum(-1, keepdim=True)).mul_(p)
    else:
        b = o.beta
        log_m = torch.logaddexp(log_q + math.log(b), log_p + math.log(1.0 - b))
        kl_t = _plogq(q, log_q, log_m)[1]
        diff, kl_s = _plogq(p, log_p, log_m)
        loss = b * kl_t + (1.0 - b) * kl_s
        if need_grad:
            grad = p.mul_(diff.sub_(kl_s[:, None])).mul_(1.0 - b)
    loss = loss * o.soft_weight
    if grad is not None:
        grad.mul_(o.soft_weight / o.temperature)
    return hard_labels_and_mask(loss, grad, s, labels, keep, o.alpha)


def _rows_per_block(vocab: int, minimum: int = 1) -> int:
    return max(minimum, BLOCK_ELEMENTS // max(vocab, 1))


def _fused_rows_per_block(vocab: int) -> int:
    return max(_rows_per_block(vocab, minimum=16), min(FUSED_ROWS, FUSED_BLOCK_ELEMENTS // max(vocab, 1)))


def take_stored_grads(ctx: Any) -> tuple[Tensor | None, ...]:
    if ctx.grads is None:
        raise RuntimeError(f"{ctx.backend} distill loss: backward ran twice; the stored gradient is consumed by the "
                           "first backward (use backend='torch' with retain_graph=True)")
    grads, ctx.grads = ctx.grads, None
    return grads


def row_block_pass(student: Tensor, teacher: Tensor, labels: Tensor | None, o: Options,
                   need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Row losses ``[N]`` and the ``[N, V]`` gradient (student dtype), one row block at a time."""
    n, vocab = student.shape
    rows = torch.empty(n, dtype=accumulation_dtype(student), device=student.device)
    grad = torch.empty_like(student) if need_grad else None
    step = _rows_per_block(vocab)
    for i in range(0, n, step):
        j = min(i + step, n)
        loss, g = block_loss_and_grad(student[i:j], teacher[i:j], None if labels is None else labels[i:j],
                                      o, need_grad)
        rows[i:j] = loss
        if grad is not None and g is not None:
            grad[i:j] = g
    return rows, grad


class StoredGradLoss(torch.autograd.Function):
    """Autograd for a ``compute(student, teacher, labels, opts, need_grad) -> (rows, grad)`` that
    writes the gradient during the forward (shared by the chunked and Triton backends)."""

    @staticmethod
    def forward(ctx: Any, compute: Callable[..., tuple[Tensor, Tensor | None]], student: Tensor, teacher: Tensor,
                labels: Tensor | None, o: Options) -> Tensor:
        rows, grad = compute(student, teacher, labels, o, ctx.needs_input_grad[1])
        ctx.grads = (grad,)
        ctx.backend = "chunked"
        return rows

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = take_stored_grads(ctx)
        assert grad is not None
        # an fp32 [N, 1] operand (stride 0 for mean / sum): the product is taken in fp32 and rounded
        # once, the 1/count is not rounded to bf16 first (a 0-dim scale would be). On CPU this pass
        # is a few percent of the block pass (exp / log dominate), cheaper than recomputing the
        # softmax in the backward as the Triton backend does.
        return None, grad.mul_(grad_rows.float()[:, None]), None, None, None


def chunked_row_losses(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, **options: Any) -> Tensor:
    """``distill_loss`` backend: per-row losses ``[N]`` (fp32)."""
    return StoredGradLoss.apply(row_block_pass, student_logits, teacher_logits.detach(), labels, Options(**options))


def fused_pass(hs: Tensor, ws: Tensor, bs: Tensor | None, ht: Tensor, wt: Tensor, bt: Tensor | None,
               labels: Tensor | None, o: Options, p: Precision, row_weight: Tensor | None,
               need_grad: bool) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Row losses and (optionally ``row_weight``-weighted) grads w.r.t. ``hs``, ``ws``, ``bs``
    (``grad_h`` in the hidden states' dtype, ``grad_W`` in ``p.weight_grad``, ``grad_b`` in fp32)."""
    n, vocab = hs.shape[0], ws.shape[0]
    logits_dtype = accumulation_dtype(hs)
    rows = torch.empty(n, dtype=logits_dtype, device=hs.device)
    grad_h = torch.empty_like(hs) if need_grad else None
    grad_w = torch.zeros(ws.shape, dtype=p.weight_grad, device=ws.device) if need_grad else None
    grad_b = torch.zeros(vocab, dtype=logits_dtype, device=ws.device) if need_grad and bs is not None else None
    w_s, w_t = gemm_operand(ws, p.student), gemm_operand(wt, p.teacher)  # converted once, not per block
    step = _fused_rows_per_block(vocab)
    for i in range(0, n, step):
        j = min(i + step, n)
        h = gemm_operand(hs[i:j], p.student)
        logits_s = mm32(h, w_s.T)
        logits_t = mm32(gemm_operand(ht[i:j], p.teacher), w_t.T)
        if bs is not None:
            logits_s += bs
        if bt is not None:
            logits_t += bt
        loss, g = block_loss_and_grad(logits_s, logits_t, None if labels is None else labels[i:j], o, need_grad)
        rows[i:j] = loss
        if g is None:
            continue
        assert grad_h is not None and grad_w is not None
        if row_weight is not None:
            g.mul_(row_weight[i:j, None])
        if grad_b is not None:
            grad_b.add_(g.sum(0))
        g_op = gemm_operand(g, p.student)
        grad_h[i:j] = mm32(g_op, w_s)
        addmm32_(grad_w, g_op.T, h)
    return rows, grad_h, grad_w, grad_b


class StoredGradFusedLoss(torch.autograd.Function):
    """Autograd for a fused-linear ``compute(hs, ws, bs, ht, wt, bt, labels, opts, precision, row_weight,
    need_grad) -> (rows, grad_h, grad_w, grad_b)`` that accumulates the gradients in the forward.

    Autocast is off inside (like ``torch.amp.custom_fwd``, for any device): the caller read its
    dtype into ``precision`` already, and an autocast ``mm`` would round the fp32 logits to bf16."""

    @staticmethod
    def forward(ctx: Any, compute: Callable[..., tuple[Tensor, ...]], hs: Tensor, ws: Tensor, bs: Tensor | None,
                ht: Tensor, wt: Tensor, bt: Tensor | None, labels: Tensor | None, o: Options,
                p: Precision) -> Tensor:
        need_grad = any(ctx.needs_input_grad[1:4])
        with torch.autocast(hs.device.type, enabled=False):
            rows, *grads = compute(hs, ws, bs, ht, wt, bt, labels, o, p, None, need_grad)
        ctx.grads = tuple(grads)
        ctx.backend = "triton" if getattr(compute, "__module__", "").endswith("fused_linear_kl") else "chunked"
        ctx.compute = compute
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, labels)
        ctx.o, ctx.p = o, p
        return rows

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w, grad_b = take_stored_grads(ctx)
        # mean / sum broadcast one scalar to every row (stride 0): scale the stored gradients on the
        # device. Any other upstream gradient (reduction="none") may weight rows differently, and
        # grad_W mixes rows, so recompute with the weights. Decided from the stride: no host sync.
        if grad_rows.numel() <= 1 or grad_rows.stride(0) == 0:
            scale = grad_rows[0].float() if grad_rows.numel() else grad_rows.new_ones((), dtype=torch.float32)
        else:  # "none" with per-row weights: grad_W mixes rows, so recompute with the weights
            hs, ws, bs, ht, wt, bt, labels = ctx.saved_tensors
            with torch.autocast(hs.device.type, enabled=False):
                _, grad_h, grad_w, grad_b = ctx.compute(hs, ws, bs, ht, wt, bt, labels, ctx.o, ctx.p,
                                                        grad_rows.to(accumulation_dtype(hs)), True)
            scale = torch.ones((), device=grad_rows.device)
        assert grad_h is not None and grad_w is not None
        hs_dtype, ws_dtype = ctx.saved_tensors[0].dtype, ctx.saved_tensors[1].dtype
        scale = scale.reshape(1)  # 1-dim fp32: takes part in type promotion, so bf16 buffers scale in fp32
        return (None, grad_h.mul_(scale).to(hs_dtype), grad_w.mul_(scale).to(ws_dtype),
                None if grad_b is None else grad_b.mul_(scale).to(ws_dtype), None, None, None, None, None, None)


def chunked_fused_row_losses(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                             teacher_weight: Tensor, labels: Tensor | None, *, student_bias: Tensor | None,
                             teacher_bias: Tensor | None, weight_grad_fp32: bool = False, **options: Any) -> Tensor:
    """``fused_linear_distill_loss`` backend: per-row losses ``[N]`` (fp32), logits one row block at a time."""
    tb = None if teacher_bias is None else teacher_bias.detach()
    p = fused_precision(student_hidden, student_weight, teacher_hidden, teacher_weight, weight_grad_fp32)
    return StoredGradFusedLoss.apply(fused_pass, student_hidden, student_weight, student_bias, teacher_hidden.detach(),
                                     teacher_weight.detach(), tb, labels, Options(**options), p)


def hard_labels_and_mask(loss: Tensor, grad: Tensor | None, s: Tensor, labels: Tensor | None, keep: Tensor | None,
                         alpha: float) -> tuple[Tensor, Tensor | None]:
    """Add ``alpha`` x the hard-label cross-entropy on student logits ``s`` (and its gradient, in place) and
    zero the rows ``keep`` leaves out: the last part of every chunk's row loss, dense or sparse targets."""
    if alpha > 0:
        assert labels is not None and keep is not None
        target = torch.where(keep, labels, 0)[:, None]
        log_p1 = F.log_softmax(s, dim=-1)
        loss = loss - alpha * log_p1.gather(-1, target).squeeze(-1)
        if grad is not None:
            grad.add_(log_p1.exp_().scatter_add_(-1, target, torch.full_like(log_p1[:, :1], -1.0)), alpha=alpha)
    if keep is not None:
        loss = torch.where(keep, loss, 0.0)
        if grad is not None:
            grad.masked_fill_(~keep[:, None], 0.0)
    return loss, grad
