"""Skew KL / skew reverse KL (DistiLLM) in every backend, against an fp64 reference written here with
plain probabilities (softmax, a mixture, log) -- not the kernels' log-space formulas or closed-form
gradients. Shapes are ragged: N is not a multiple of the chunked row block, V is not a power of two
and spans several Triton vocabulary blocks (BLOCK_V forced small), so the block loops really run."""

from __future__ import annotations

import math

import pytest
import torch

from hkd.kernels import chunked, distill_loss, fused_linear_distill_loss, softmax_kl

from .helpers import BACKENDS, DEVICE

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")
SKEWS = ["skew_forward_kl", "skew_reverse_kl"]
N, V = 7, 301  # chunked: 3-row blocks (3, 3, 1); triton: 128-wide blocks (3 per row, the last ragged)
# dtype -> (loss rtol/atol, gradient atol as a fraction of the largest reference gradient)
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2)}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 3 * V)
    monkeypatch.setattr(softmax_kl, "BLOCK_V", 128)


def skew_rows64(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, *, divergence: str, skew: float,
                temperature: float = 1.0, scale_t2: bool = True, alpha: float = 0.0) -> torch.Tensor:
    """Per-row loss in fp64: KL(q || a q + (1-a) p) or KL(p || a p + (1-a) q), p the student."""
    p = torch.softmax(s.double() / temperature, -1)
    q = torch.softmax(t.double() / temperature, -1)
    if divergence == "skew_forward_kl":
        first, m = q, skew * q + (1 - skew) * p
    else:
        first, m = p, skew * p + (1 - skew) * q
    soft = (first * (first.log() - m.log())).sum(-1)
    loss = (1 - alpha) * soft * (temperature**2 if scale_t2 else 1.0)
    if alpha > 0:
        assert labels is not None
        loss = loss + alpha * torch.nn.functional.cross_entropy(s.double(), labels.clamp_min(0), reduction="none")
    return loss if labels is None else loss * (labels != -100)


def logits(dtype=torch.float32, seed: int = 0, offset: float = 0.0, n: int = N):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(n, V, generator=gen) * 2 + offset
    t = torch.randn(n, V, generator=gen) * 2 + offset
    labels = torch.randint(0, V, (n,), generator=gen)
    labels[1::3] = -100
    return s.to(dtype), t.to(dtype), labels


def compare(backend: str, s, t, labels, **opts) -> None:
    """Row losses (``reduction="none"`` with random upstream weights) and the student gradient."""
    rtol, gtol = TOL[s.dtype]
    keep = (labels != -100)[:, None]
    s64 = torch.where(keep, s.double(), 0.0).requires_grad_()  # the reference sees no NaN padding
    want = skew_rows64(s64, torch.where(keep, t.double(), 0.0), labels, **opts)
    upstream = torch.rand(len(s), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    (want * upstream).sum().backward()
    s_in, t_in = s.clone(), t.clone()
    s_in[~keep[:, 0]] = float("nan")  # ignored rows may hold anything
    x = s_in.to(DEVICE).requires_grad_()
    got = distill_loss(x, t_in.to(DEVICE), labels=labels.to(DEVICE), reduction="none", backend=backend, **opts)
    (got * upstream.to(got)).sum().backward()
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=rtol, atol=rtol)
    assert x.grad is not None and x.grad.dtype == s.dtype
    ref = torch.where(keep, s64.grad, 0.0)
    torch.testing.assert_close(x.grad.double().cpu(), ref, rtol=0, atol=gtol * float(ref.abs().max()))


# catches: a wrong closed-form gradient (a dropped or mis-signed row constant F = sum p f, the ratio q/m
# vs p/m swapped, (1 - skew) vs skew), the mixture weight on the wrong distribution, the temperature or
# T^2 factor missing from the skew branch, the second Triton sweep or the chunked row blocks mis-indexed,
# and NaN padding in ignored rows leaking into loss or gradient
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,dtype,skew,temperature,alpha", [
    ("skew_forward_kl", torch.float32, 0.1, 1.0, 0.0), ("skew_reverse_kl", torch.float32, 0.35, 2.5, 0.3),
    ("skew_forward_kl", torch.bfloat16, 0.35, 2.5, 0.3), ("skew_reverse_kl", torch.bfloat16, 0.1, 1.0, 0.0)])
def test_matches_fp64_reference(backend, divergence, dtype, skew, temperature, alpha):
    s, t, labels = logits(dtype)
    compare(backend, s, t, labels, divergence=divergence, skew=skew, temperature=temperature, alpha=alpha)


# catches: log-probabilities computed as z/T - lse in the skew branches (two numbers near 1e4/T
# subtracted in fp32 lose ~1e-3 relative), instead of (z - max)/T - log d
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", SKEWS)
def test_large_shared_logit_offset(backend, divergence):
    s, t, labels = logits(offset=1e4, seed=1)
    compare(backend, s, t, labels, divergence=divergence, skew=0.2, temperature=2.5)


# catches: skew=0 dividing by m = p (or q) in the closed forms (inf * 0 = NaN where the student's
# probability underflows) instead of running plain KL; and a skew branch whose limit is not plain KL
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", SKEWS)
def test_skew_zero_is_plain_kl(backend, divergence):
    s, t, labels = logits(seed=2)
    s[0, :40] = -1e4  # tokens the student gives probability 0 in fp32, the teacher does not
    plain = divergence[len("skew_"):]
    x = s.to(DEVICE).requires_grad_()
    got = distill_loss(x, t.to(DEVICE), labels=labels.to(DEVICE), divergence=divergence, skew=0.0,
                       reduction="none", backend=backend)
    got.sum().backward()
    y = s.to(DEVICE).requires_grad_()
    kl = distill_loss(y, t.to(DEVICE), labels=labels.to(DEVICE), divergence=plain, reduction="none", backend=backend)
    kl.sum().backward()
    assert torch.isfinite(got).all() and torch.isfinite(x.grad).all()
    assert torch.equal(got, kl) and torch.equal(x.grad, y.grad)
    # a tiny positive skew runs the skew code path: it must land next to plain KL (O(skew * chi2(q, p)) away) on
    # the rows without zero-probability student tokens (row 0 is where skew bounds the log-ratio)
    z = s.to(DEVICE).requires_grad_()
    near = distill_loss(z, t.to(DEVICE), labels=labels.to(DEVICE), divergence=divergence, skew=1e-9,
                        reduction="none", backend=backend)
    near.sum().backward()
    rows = labels != -100
    rows[0] = False
    torch.testing.assert_close(near.detach().cpu()[rows], kl.detach().cpu()[rows], rtol=1e-4, atol=1e-4)
    ref = y.grad.cpu()[rows]
    torch.testing.assert_close(z.grad.cpu()[rows], ref, rtol=0, atol=1e-4 * float(ref.abs().max()))


# catches: the value as DistiLLM's code writes it (a cross-entropy, without the teacher-entropy
# constant: nonzero when the distributions agree), and NaN from log m = log 0 on tokens that
# neither model can emit (-inf logits; masked-vocabulary padding)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", SKEWS)
def test_equal_distributions_give_zero_loss_and_gradient(backend, divergence):
    s, _, labels = logits(seed=3)
    s[:, -37:] = float("-inf")  # the last, ragged block: padding of the vocabulary
    x = s.to(DEVICE).requires_grad_()
    loss = distill_loss(x, (s + 5.0).to(DEVICE), labels=labels.to(DEVICE), divergence=divergence, skew=0.3,
                        temperature=1.5, backend=backend)  # a shared shift leaves softmax unchanged
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().max()) < 1e-6


# catches: the mixture on the wrong side (m = p for skew KL, m = q for skew reverse KL: log 0 where
# the other model has mass), which plain KL cannot survive: the skew divergences are bounded by
# log(1/skew) however little mass one model puts where the other has it
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", SKEWS)
def test_bounded_where_plain_kl_is_infinite(backend, divergence):
    s, t, _ = logits(n=3, seed=5)
    zero = s if divergence == "skew_forward_kl" else t  # the distribution in the second argument of plain KL
    zero[:, : V // 2] = float("-inf")  # half the vocabulary has probability 0 there, mass in the other one
    x = s.to(DEVICE).requires_grad_()
    loss = distill_loss(x, t.to(DEVICE), divergence=divergence, skew=0.2, scale_t2=False, reduction="none",
                        backend=backend)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and (loss > 0.1).all() and (loss <= math.log(1 / 0.2) + 1e-5).all()
    assert torch.isfinite(x.grad).all()
    plain = distill_loss(s.to(DEVICE), t.to(DEVICE), divergence=divergence[len("skew_"):], scale_t2=False,
                         reduction="none", backend="torch")
    assert (plain > 10 * loss.detach()).all()  # plain KL: infinite or huge, so the bound is not trivial


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, math.nan])
def test_skew_outside_its_range_is_rejected(bad):
    s, t, _ = logits(n=2)
    with pytest.raises(ValueError, match=r"skew must be in \[0, 1\), got"):
        distill_loss(s, t, divergence="skew_forward_kl", skew=bad)
    h = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"skew must be in \[0, 1\), got"):
        fused_linear_distill_loss(h, torch.randn(V, 8), h, torch.randn(V, 8), divergence="skew_reverse_kl", skew=bad)


# --------------------------------------------------------------------------- fused LM head

def fused_compare(backend: str, dtype=torch.float32, tol: float = 2e-5, **opts) -> None:
    """Loss and the gradients of student hidden, weight and bias against fp64 logits built from them."""
    gen = torch.Generator().manual_seed(4)
    n, hs_dim, ht_dim, vocab = 13, 40, 24, 131  # interpreter tiles: one ragged 16-row block, 3 64-wide vocab tiles

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    hs, ws, bs, ht, wt, bt = rand(n, hs_dim), rand(vocab, hs_dim, scale=0.3), rand(vocab), rand(n, ht_dim), \
        rand(vocab, ht_dim, scale=0.3), rand(vocab)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[[0, 7]] = -100
    ref = [x.double().requires_grad_() for x in (hs, ws, bs)]
    want = skew_rows64(ref[0] @ ref[1].T + ref[2], ht.double() @ wt.double().T + bt.double(), labels, **opts)
    upstream = torch.rand(n, generator=gen, dtype=torch.float64)
    (want * upstream).sum().backward()
    leaves = [x.to(DEVICE).requires_grad_() for x in (hs, ws, bs)]
    got = fused_linear_distill_loss(leaves[0], leaves[1], ht.to(DEVICE), wt.to(DEVICE), student_bias=leaves[2],
                                    teacher_bias=bt.to(DEVICE), labels=labels.to(DEVICE), reduction="none",
                                    backend=backend, **opts)
    (got * upstream.to(got)).sum().backward()
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=tol, atol=tol)
    for name, leaf, r in zip(("hidden", "weight", "bias"), leaves, ref):
        assert leaf.grad is not None and leaf.grad.dtype == dtype, name
        torch.testing.assert_close(leaf.grad.double().cpu(), r.grad, rtol=0, atol=tol * float(r.grad.abs().max()),
                                   msg=lambda m, name=name: f"grad of the student {name}: {m}")


# catches: the skew branches of the tiled fused kernel (pass 2's row constant, pass 3's gradient tile)
# and of the fused chunked path, a per-row upstream weight dropped from grad_W (reduction="none")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", SKEWS)
def test_fused_matches_fp64_reference(backend, divergence):
    fused_compare(backend, divergence=divergence, skew=0.25, temperature=2.5, alpha=0.3)


# bf16 hidden states and heads: the logits are rounded to bf16 by the torch/chunked paths (cuBLAS-like
# F.linear), so the tolerance is bf16's; catches a gradient returned in fp32 or off by more than rounding
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_bf16(backend):
    fused_compare(backend, torch.bfloat16, tol=3e-2, divergence="skew_reverse_kl", skew=0.1, temperature=2.0)
