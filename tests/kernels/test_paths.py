"""The code paths the plain fp64 comparisons do not reach: several vocabulary blocks per row under the
interpreter, logits with a large shared offset, gradients rounded once in bf16, the GEMM and TF32 paths
of the fused LM head, forward-only calls, repeated backwards. Tensors live on ``DEVICE`` (CUDA when
present), so the same tests check the compiled kernels on a GPU."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hkd.kernels import chunked, distill_loss, fused_linear_distill_loss, fused_linear_kl, softmax_kl

from .helpers import BACKENDS, DEVICE, reduce64, rows64
from .test_fused_linear import check as fused_check
from .test_fused_linear import make as fused_make

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]


def grads(backend: str, s: torch.Tensor, t: torch.Tensor, labels=None, **opts):
    """(loss rows, student gradient) of ``backend`` and of the fp64 reference on the same inputs."""
    s64 = s.double().cpu().requires_grad_()
    want = rows64(s64, t.double().cpu(), None if labels is None else labels.cpu(), **opts)
    want.sum().backward()
    x = s.clone().requires_grad_()
    got = distill_loss(x, t, labels=labels, reduction="none", backend=backend, **opts)
    got.sum().backward()
    return got.double().cpu(), want.detach(), x.grad.double().cpu(), s64.grad


# catches: log p computed as z/T - lse (two numbers near 1e4/T subtracted in fp32: 1e-3 relative
# gradient error in the old Triton kernel, 1e-4 in torch/chunked at T=2.5), not (z - max)/T - log d
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_large_shared_offset(backend, divergence, monkeypatch):
    monkeypatch.setattr(softmax_kl, "BLOCK_V", 64)  # triton: 5 blocks per row
    gen = torch.Generator().manual_seed(0)
    s = (torch.randn(8, 300, generator=gen) * 2 + 1e4).to(DEVICE)
    t = (torch.randn(8, 300, generator=gen) * 2 + 1e4).to(DEVICE)
    got, want, g, ref = grads(backend, s, t, divergence=divergence, temperature=2.5)
    tol = 2e-6 if DEVICE == "cpu" else 1e-5  # compiled kernels use the approximate exp2 / log2 instructions
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(g, ref, rtol=0, atol=tol * float(ref.abs().max()))


# catches: the online rescaling between vocabulary blocks (running max / sum, the closed-form
# row term A shifted by the max changes), a first block that ends up with no mass, the CE label in a later block
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_triton_multi_block_rows(divergence, monkeypatch):
    monkeypatch.setattr(softmax_kl, "BLOCK_V", 256)  # V=1271: 5 blocks, the last one ragged
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(4, 1271, generator=gen) * 3
    t = torch.randn(4, 1271, generator=gen) * 3
    s[:, :256] = t[:, :256] = -200.0  # the first block's mass underflows once later blocks raise the max
    s[:, 700] += 8.0  # the max moves in a later block
    t[:, 1000] += 8.0
    labels = torch.randint(256, 1271, (4,), generator=gen)
    got, want, g, ref = grads("triton", s.to(DEVICE), t.to(DEVICE), labels.to(DEVICE), divergence=divergence,
                              temperature=1.7, alpha=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))


# catches: the upstream 1/count rounded to bf16, or the bf16 gradient rounded twice (written, then
# scaled in a separate pass): every element must be the fp64 gradient rounded once (within 1 ulp)
def test_triton_bf16_gradient_is_rounded_once():
    gen = torch.Generator().manual_seed(2)
    s = (torch.randn(9, 500, generator=gen) * 2).to(torch.bfloat16).to(DEVICE)
    t = (torch.randn(9, 500, generator=gen) * 2).to(torch.bfloat16).to(DEVICE)
    labels = torch.tensor([1, -100, 2, -100, 3, -100, 4, -100, 5], device=DEVICE)  # mean over 5 rows
    s64 = s.double().cpu().requires_grad_()
    reduce64(rows64(s64, t.double().cpu(), labels.cpu(), temperature=3.0), labels.cpu(), "mean").backward()
    x = s.clone().requires_grad_()
    distill_loss(x, t, labels=labels, temperature=3.0, backend="triton").backward()
    ref = s64.grad
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)  # bf16 spacing at |ref|
    assert ((x.grad.double().cpu() - ref).abs() <= ulp).all()


# catches: a fused backward that only the tiled interpreter path reaches: the GEMM path (row chunks,
# gradient written over the chunk logits, grad_W accumulated per chunk) and the TF32 tiles (UPCAST=False)
@pytest.mark.parametrize("path", ["gemm", "tf32_tiles"])
def test_fused_triton_paths(path, monkeypatch):
    if path == "gemm":
        monkeypatch.setattr(fused_linear_kl, "GEMM_PATH", True)
        monkeypatch.setattr(fused_linear_kl, "CHUNK_ROWS", 8)  # 20 rows: chunks of 8, 8, 4
        tol = 1e-5
    else:
        monkeypatch.setattr(fused_linear_kl, "GEMM_PATH", False)
        monkeypatch.setattr(fused_linear_kl, "UPCAST", False)
        tol = 1e-5 if DEVICE == "cpu" else 5e-3  # TF32 on a GPU; the interpreter's dots are fp32
    fused_check("triton", fused_make(), divergence="jsd", temperature=2.5, alpha=0.3, tol=tol)
    fused_check("triton", fused_make(), reduction="none", upstream=torch.rand(20), divergence="reverse_kl", tol=tol)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 tensor-core tiles: the interpreter's bf16 tl.dot is wrong")
def test_fused_triton_bf16_tiles(monkeypatch):
    monkeypatch.setattr(fused_linear_kl, "GEMM_PATH", False)  # catches: the UPCAST=False bf16 dots
    fused_check("triton", fused_make(dtype=torch.bfloat16), divergence="forward_kl", temperature=2.5, alpha=0.3,
                tol=3e-2)


class LargeTensors(TorchDispatchMode):
    """Records every op output with at least ``limit`` elements in new memory (views of inputs do not count)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.seen = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in [*args, *(kwargs or {}).values()] if isinstance(a, torch.Tensor)}
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor) and o.numel() >= self.limit and o.untyped_storage().data_ptr() not in inputs:
                self.seen.append((str(func), tuple(o.shape)))
        return out


# catches: a forward-only call (evaluation, a frozen student) that still builds the [N, V] gradient
@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_forward_only_allocates_nothing_of_size_n_by_v(backend, monkeypatch):
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 4 * 301)  # chunked: 4-row blocks
    gen = torch.Generator().manual_seed(3)
    s, t = (torch.randn(16, 301, generator=gen).to(DEVICE) for _ in range(2))
    want = reduce64(rows64(s.double().cpu(), t.double().cpu(), divergence="jsd"), None, "mean")
    with torch.no_grad(), LargeTensors(16 * 301) as spy:
        got = distill_loss(s, t, divergence="jsd", backend=backend)
    assert spy.seen == []
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-6)
    x = s.clone().requires_grad_()  # the same spy does see the gradient when one is needed
    with LargeTensors(16 * 301) as spy:
        distill_loss(x, t, divergence="jsd", backend=backend).backward()
    assert spy.seen


# catches: the Triton backward consuming state (it recomputes from saved statistics, so a retained
# graph gives the same gradient twice), and the stored-gradient error naming the wrong backend
def test_second_backward(monkeypatch):
    s, t = (torch.randn(6, 50).to(DEVICE) for _ in range(2))
    x = s.clone().requires_grad_()
    loss = distill_loss(x, t, divergence="reverse_kl", backend="triton")
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * once)
    h, w = torch.randn(6, 16, device=DEVICE, requires_grad=True), torch.randn(50, 16, device=DEVICE, requires_grad=True)
    for backend in ("chunked", "triton"):
        loss = fused_linear_distill_loss(h, w, h.detach(), w.detach(), backend=backend)
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match=f"^{backend} distill loss: backward ran twice"):
            loss.backward()
