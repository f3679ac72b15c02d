"""fused_linear_distill_loss: every backend against fp64 logits built from the hidden states."""

from __future__ import annotations

import pytest
import torch

from hkd.kernels import chunked, fused_linear_distill_loss

from .helpers import BACKENDS, DEVICE, reduce64, rows64

# the interpreter evaluates masked-out lanes too (inf - inf there); the results never use them
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

N, V, HS, HT = 20, 301, 40, 24  # student and teacher hidden sizes differ; V is odd


def make(dtype: torch.dtype = torch.float32, bias: bool = True, seed: int = 0) -> dict[str, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)

    labels = torch.randint(0, V, (N,), generator=gen)
    labels[4:9] = -100
    return {"hs": rand(N, HS), "ws": rand(V, HS, scale=0.3), "bs": rand(V) if bias else None,
            "ht": rand(N, HT), "wt": rand(V, HT, scale=0.3), "bt": rand(V) if bias else None, "labels": labels.to(DEVICE)}


def check(backend: str, x: dict, *, reduction: str = "mean", upstream=None, tol: float = 1e-5, **opts) -> None:
    params = [k for k in ("hs", "ws", "bs") if x[k] is not None]
    ref = {k: v.double().cpu().requires_grad_(k in params) if v is not None else None for k, v in x.items()
           if k != "labels"}
    labels = x["labels"]

    def logits(h, w, b):
        return h @ w.T + (0 if b is None else b)

    expected = reduce64(rows64(logits(ref["hs"], ref["ws"], ref["bs"]), logits(ref["ht"], ref["wt"], ref["bt"]),
                               labels.cpu(), **opts), labels.cpu(), reduction)
    leaves = {k: x[k].clone().requires_grad_() for k in params}
    got = fused_linear_distill_loss(leaves["hs"], leaves["ws"], x["ht"], x["wt"], student_bias=leaves.get("bs"),
                                    teacher_bias=x["bt"], labels=labels, reduction=reduction, backend=backend, **opts)
    torch.testing.assert_close(got.double().cpu(), expected.detach(), rtol=tol, atol=tol)
    w = torch.ones_like(expected) if upstream is None else upstream.double()
    (expected * w).sum().backward()
    (got * w.to(got)).sum().backward()
    for k in params:
        want = ref[k].grad
        assert leaves[k].grad.dtype == x[k].dtype, k
        torch.testing.assert_close(leaves[k].grad.double().cpu(), want, rtol=0, atol=tol * float(want.abs().max()) * 10,
                                   msg=lambda m, k=k: f"grad of {k}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.0), (2.5, 0.3)])
def test_matches_fp64_reference(backend, divergence, beta, temperature, alpha):
    check(backend, make(bias=alpha > 0), divergence=divergence, beta=beta, temperature=temperature, alpha=alpha)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_none_with_per_row_weights(backend, monkeypatch):
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 2 * V)  # chunked: several row blocks
    monkeypatch.setattr(chunked, "FUSED_ROWS", 2)
    check(backend, make(), reduction="none", upstream=torch.rand(N), divergence="jsd", beta=0.0, alpha=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16(backend):
    check(backend, make(dtype=torch.bfloat16), divergence="forward_kl", temperature=2.5, alpha=0.3, tol=3e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    x = make()
    hs = x["hs"].clone().requires_grad_()
    ws = x["ws"].clone().requires_grad_()
    loss = fused_linear_distill_loss(hs, ws, x["ht"], x["wt"], labels=torch.full((N,), -100, device=DEVICE),
                                     alpha=0.3, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and not hs.grad.any() and not ws.grad.any()
