"""distill_loss: every backend against the independent fp64 reference (value and student gradient)."""

from __future__ import annotations

import pytest
import torch

from hkd.kernels import chunked, distill_loss

from .helpers import BACKENDS, DEVICE, reduce64, rows64

# the interpreter evaluates masked-out lanes too (inf - inf there); the results never use them
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# dtype -> (loss rtol, loss atol, grad atol as a fraction of the largest reference grad)
TOL = {torch.float32: (1e-5, 1e-6, 1e-5), torch.bfloat16: (2e-2, 1e-3, 2e-2)}
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0)]


def make(n: int = 24, vocab: int = 1271, dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, vocab, generator=gen) * scale).to(dtype)
    t = (torch.randn(n, vocab, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[n // 3: n // 2] = -100
    return s.to(DEVICE), t.to(DEVICE), labels.to(DEVICE)


def check(backend: str, s, t, labels, *, reduction: str = "mean", upstream=None, **opts) -> None:
    """Loss and student gradient of ``backend`` match the fp64 reference."""
    rtol, atol, gtol = TOL[s.dtype]
    s64 = s.double().cpu().requires_grad_()
    lab = None if labels is None else labels.cpu()
    expected = reduce64(rows64(s64, t.double().cpu(), lab, **opts), lab, reduction, opts.get("ignore_index", -100))
    x = s.clone().requires_grad_()
    got = distill_loss(x, t, labels=labels, reduction=reduction, backend=backend, **opts)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got.double().cpu(), expected.detach(), rtol=rtol, atol=atol)
    w = torch.ones_like(expected) if upstream is None else upstream.double()
    (expected * w).sum().backward()
    (got * w.to(got)).sum().backward()
    assert x.grad is not None and x.grad.dtype == s.dtype
    ref = s64.grad
    torch.testing.assert_close(x.grad.double().cpu(), ref, rtol=0, atol=gtol * float(ref.abs().max()) + 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.0), (2.5, 0.3), (2.5, 0.0), (1.0, 0.3)])
def test_matches_fp64_reference(backend, divergence, beta, temperature, alpha):
    s, t, labels = make()
    check(backend, s, t, labels, divergence=divergence, beta=beta, temperature=temperature, alpha=alpha)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_upstream_weights(backend, reduction):
    s, t, labels = make(n=12)
    upstream = torch.rand(12) if reduction == "none" else None
    check(backend, s, t, labels, reduction=reduction, upstream=upstream, divergence="jsd", temperature=2.5, alpha=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_labels_and_leading_dims(backend):
    s, t, _ = make(n=12, vocab=300)
    x = s.reshape(3, 4, 300).requires_grad_()
    none = distill_loss(x, t.reshape(3, 4, 300), reduction="none", backend=backend)
    assert none.shape == (3, 4)
    torch.testing.assert_close(none.double().cpu().reshape(-1), rows64(s.double().cpu(), t.double().cpu()),
                               rtol=1e-5, atol=1e-6)
    check(backend, s, t, None, divergence="reverse_kl", temperature=2.5, scale_t2=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_bf16_inputs(backend, divergence):
    s, t, labels = make(n=12, dtype=torch.bfloat16)
    check(backend, s, t, labels, divergence=divergence, temperature=2.5, alpha=0.3)


@pytest.mark.parametrize("backend", ["torch", "chunked"])
def test_large_odd_vocab(backend):
    s, t, labels = make(n=6, vocab=32003)
    check(backend, s, t, labels, divergence="reverse_kl", temperature=2.5, alpha=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_ignored_row_blocks_and_batches(backend, monkeypatch):
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 4 * 1271)  # chunked: 4-row blocks, some fully ignored
    s, t, labels = make(n=24)
    labels[4:16] = -100
    check(backend, s, t, labels, divergence="jsd", alpha=0.3)
    x = s.clone().requires_grad_()
    loss = distill_loss(x, t, labels=torch.full_like(labels, -100), alpha=0.3, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend):
    s, t, labels = make(n=8)
    labels[labels == -100] = 0  # -100 is an ordinary (out-of-range) label when ignore_index is 7
    labels[:3] = 7
    check(backend, s, t, labels, alpha=0.3, ignore_index=7)
