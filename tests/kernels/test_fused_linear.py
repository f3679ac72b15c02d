"""fused_linear_distill_loss: every backend against fp64 logits built from the hidden states."""

from __future__ import annotations

import math

import pytest
import torch

from hkd.kernels import chunked, fused_linear_distill_loss, fused_linear_kl, softmax_kl

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


class KernelSpy:
    """Stands in for a Triton kernel object: records each launch grid and BLOCK_M, then launches."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((tuple(grid), kwargs["BLOCK_M"]))
            return self.kernel[grid](*args, **kwargs)

        return launch


# catches: a row-block loop that slices the per-row weights, losses or gradient rows of block i with
# block 0's offsets (or drops the ragged last block), which one block (N below the block size) hides;
# the spies assert that the rows really are split: 3-row blocks (ignored rows 4..8 straddle two), or
# 3-row GEMM chunks, or several tiled programs under the interpreter
@pytest.mark.parametrize("backend", ["torch", "chunked", "triton:tiled", "triton:gemm"])
def test_reduction_none_with_per_row_weights(backend, monkeypatch):
    blocks: list[int] = []  # rows per block, in call order
    if backend == "chunked":
        monkeypatch.setattr(chunked, "_fused_rows_per_block", lambda vocab: 3)
        block_loss_and_grad = chunked.block_loss_and_grad

        def spy(student, *args, **kwargs):
            blocks.append(student.shape[0])
            return block_loss_and_grad(student, *args, **kwargs)

        monkeypatch.setattr(chunked, "block_loss_and_grad", spy)
    elif backend == "triton:gemm":
        monkeypatch.setattr(fused_linear_kl, "GEMM_PATH", True)
        monkeypatch.setattr(fused_linear_kl, "CHUNK_ROWS", 3)
        forward = softmax_kl.forward

        def spy(zs, *args, **kwargs):
            blocks.append(zs.shape[0])
            return forward(zs, *args, **kwargs)

        monkeypatch.setattr(softmax_kl, "forward", spy)
    elif backend == "triton:tiled":
        monkeypatch.setattr(fused_linear_kl, "GEMM_PATH", False)
        kernel = KernelSpy(fused_linear_kl.fused_linear_kl_kernel)
        monkeypatch.setattr(fused_linear_kl, "fused_linear_kl_kernel", kernel)
    check(backend.split(":")[0], make(), reduction="none", upstream=torch.rand(N, generator=torch.Generator().manual_seed(1)),
          divergence="jsd", beta=0.0, alpha=0.3)
    if backend in ("chunked", "triton:gemm"):  # forward, then the backward's recompute with the row weights
        assert blocks == ([3] * 6 + [2]) * 2, blocks
    if backend == "triton:tiled":
        assert kernel.launches and all(grid == (math.ceil(N / block_m),) for grid, block_m in kernel.launches)
        if DEVICE == "cpu":  # the interpreter's 16-row programs: two, the second ragged
            assert kernel.launches[0][0] == (2,), kernel.launches


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
