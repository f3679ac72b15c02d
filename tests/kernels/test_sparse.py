"""sparse_distill_loss (top-k teacher targets): every backend against an fp64 reference written with
probabilities, the logits stage's formula, and the dense op when the top-k cover the vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

from hkd.kernels import chunked, distill_loss, softmax_kl, sparse_distill_loss
from hkd.kernels.reference import logits_stage_sparse_loss

from .helpers import DEVICE, reduce64, sparse_rows64

BACKENDS = ["torch", "chunked", "triton"]
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def make(n: int = 12, vocab: int = 301, k: int = 7, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Student logits, a teacher's top-k (ids, values) and its full log-normaliser, labels with ignored rows;
    row 1 has only 5 real targets (two empty -inf slots)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(n, vocab, generator=gen) * 2
    teacher = torch.randn(n, vocab, generator=gen) * 3
    values, ids = teacher.topk(k, -1)
    values[1, 5:] = float("-inf")
    lse = teacher.logsumexp(-1)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[3:5] = -100
    s[4] = float("nan")  # padding on an ignored row
    return [x.to(DEVICE) for x in (s.to(dtype), ids, values, lse, labels)]


def check(backend: str, s, ids, values, lse, labels, *, reduction: str = "mean", upstream=None, tol=(1e-5, 1e-5),
          **opts) -> None:
    """Value and student gradient of ``backend`` against :func:`sparse_rows64` (gradient by fp64 autograd)."""
    s64 = s.double().cpu().requires_grad_()
    lab = labels.cpu()
    expected = reduce64(sparse_rows64(torch.where(lab[:, None] != -100, s64, 0.0), ids.cpu(), values.cpu(), lse.cpu(),
                                      lab, **opts), lab, reduction)
    x = s.clone().requires_grad_()
    got = sparse_distill_loss(x, ids, values, labels, teacher_logsumexp=lse, reduction=reduction, backend=backend,
                              **opts)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got.double().cpu(), expected.detach(), rtol=tol[0], atol=tol[0])
    w = torch.ones_like(expected) if upstream is None else upstream.double()
    (expected * w).sum().backward()
    (got * w.to(got)).sum().backward()
    ref = s64.grad
    assert x.grad.dtype == s.dtype
    torch.testing.assert_close(x.grad.double().cpu(), ref, rtol=0, atol=tol[1] * float(ref.abs().max()))


# catches: a wrong closed-form gradient (tail tokens get -q_tail p_v / p_tail), temperature applied to one
# side only, the T^2 / alpha weights, ignored rows leaking NaN, empty (-inf) slots, several row blocks
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.0), (2.5, 0.3)])
def test_matches_fp64_reference(backend, tail, temperature, alpha, monkeypatch):
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 5 * 301)  # chunked: 5-row blocks
    monkeypatch.setattr(softmax_kl, "BLOCK_V", 128)  # triton: 3 vocabulary blocks per row
    check(backend, *make(), tail=tail, temperature=temperature, alpha=alpha)


# catches: per-row upstream weights (reduction="none") or the sum scale dropped by the stored gradient
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(backend, reduction):
    upstream = torch.rand(12) if reduction == "none" else None
    check(backend, *make(), tail="bucket", temperature=2.0, reduction=reduction, upstream=upstream)


# catches: bf16 inputs computed in bf16 (the result must be fp32 math on bf16 inputs)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_student(backend):
    check(backend, *make(dtype=torch.bfloat16), tail="bucket", temperature=2.0, alpha=0.3, tol=(1e-3, 2e-2))


# catches: the renormalize mode drifting from the logits stage's top-k loss it is meant to replace
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha,scale_t2", [(0.0, True), (0.4, False)])
def test_renormalize_is_the_logits_stage_formula(backend, alpha, scale_t2):
    s, ids, values, _, labels = make(n=12, vocab=97, k=5)
    values[1, 5:] = 0.0  # the stage has no empty slots
    s[4] = 0.0
    shape = (3, 4)
    x = s.reshape(*shape, 97).clone().requires_grad_()
    y = s.reshape(*shape, 97).clone().requires_grad_()
    args = (values.reshape(*shape, 5), ids.reshape(*shape, 5), labels.reshape(shape))
    want = logits_stage_sparse_loss(y, *args, temperature=2.5, alpha=alpha, scale_t2=scale_t2)
    got = sparse_distill_loss(x, args[1], args[0], args[2], temperature=2.5, alpha=alpha, scale_t2=scale_t2,
                              reduction="sum", backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward()
    want.backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=1e-6)


# catches: a bucket tail that is not the KL over k + 1 outcomes (with k = V it is the dense forward KL)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bucket_with_the_whole_vocabulary_is_the_dense_loss(backend):
    gen = torch.Generator().manual_seed(1)
    s, t = (torch.randn(6, 40, generator=gen).to(DEVICE) for _ in range(2))
    ids = torch.arange(40, device=DEVICE).flip(0).expand(6, 40)
    x, y = s.clone().requires_grad_(), s.clone().requires_grad_()
    got = sparse_distill_loss(x, ids, t.gather(-1, ids), tail="bucket", teacher_logsumexp=t.logsumexp(-1),
                              temperature=2.5, backend=backend)
    want = distill_loss(y, t, temperature=2.5, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    want.backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=1e-6)


# catches: NaN or a division by zero when no row counts (mean over 0 rows is 0 with zero gradient)
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    s, ids, values, lse, labels = make()
    x = s.clone().requires_grad_()
    loss = sparse_distill_loss(x, ids, values, torch.full_like(labels, -100), tail="bucket", teacher_logsumexp=lse,
                               alpha=0.3, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_errors_name_the_problem():
    s, ids, values, lse, labels = make()
    with pytest.raises(ValueError, match="'forward_kl' only"):
        sparse_distill_loss(s, ids, values, labels, divergence="jsd")
    with pytest.raises(ValueError, match="needs teacher_logsumexp"):
        sparse_distill_loss(s, ids, values, labels, tail="bucket")
    with pytest.raises(ValueError, match="unknown tail"):
        sparse_distill_loss(s, ids, values, labels, tail="drop")
    with pytest.raises(ValueError, match=r"\[\.\.\., k\]"):
        sparse_distill_loss(s, ids[:, :3], values, labels)
    bad = ids.clone()
    bad[2, 0] = 301
    if s.is_cuda:  # no host sync on CUDA: the row's loss is NaN instead
        rows = sparse_distill_loss(s, bad, values, labels, reduction="none")
        assert math.isnan(rows[2].item()) and torch.isfinite(rows[[0, 1, 5]]).all()
    else:
        with pytest.raises(ValueError, match=r"\[0, 301\); row 2"):
            sparse_distill_loss(s, bad, values, labels)
    bad[2, 0] = 0
    bad[3, 0] = -1  # an ignored row's ids are not looked at
    assert torch.isfinite(sparse_distill_loss(s, bad, values, labels))
