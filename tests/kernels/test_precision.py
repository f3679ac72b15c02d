"""The GPU's dtype regime, on the CPU: every backend of every op under bf16 autocast (what
``train.precision: bf16-mixed`` runs; CPU autocast behaves as CUDA's for these ops) and with fp32
master weights beside bf16 activations, against fp64; bf16 inputs whose logits reach ~100; logits
that share an offset of 1e4; the fp32 accumulation of the fused head's weight gradient; top-k targets
with k >= 64; rows whose loads start off a 16-byte boundary.

``triton:gemm`` is the fused head's CUDA path (library GEMMs + the softmax-KL kernels) forced on
the CPU; ``triton:tiled`` the one-kernel path the interpreter runs by default.
"""

from __future__ import annotations

import pytest
import torch

from hkd.kernels import (
    chunked, distill_loss, fused_linear_distill_loss, fused_linear_kl, softmax_kl, sparse_distill_loss, sparse_kl,
)

from .helpers import DEVICE, reduce64, rows64, sparse_rows64

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning",
                                        "ignore:All-NaN slice encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

FUSED = ["torch", "chunked", "triton:tiled", "triton:gemm"]
# dtype the loss sees -> (loss rtol, grad atol as a fraction of the largest reference gradient): bf16
# operands or logits carry 2**-9 relative rounding into logits of size ~5
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def fused_backend(backend: str, monkeypatch: pytest.MonkeyPatch, chunk_rows: int = 8) -> str:
    """The registry name for ``backend``, with the Triton path it names forced (several GEMM chunks)."""
    if backend.startswith("triton:"):
        monkeypatch.setattr(fused_linear_kl, "GEMM_PATH", backend == "triton:gemm")
        monkeypatch.setattr(fused_linear_kl, "CHUNK_ROWS", chunk_rows)
    return backend.split(":")[0]


def autocast(enabled: bool = True) -> torch.autocast:
    return torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=enabled)


def head_inputs(n: int = 20, vocab: int = 301, hs: int = 40, ht: int = 24, *, hidden_dtype=torch.float32,
                weight_dtype=torch.float32, teacher_dtype=torch.bfloat16, scale: float = 0.3, seed: int = 0):
    """A student (hidden, master weight, bias) and a teacher head as a bf16-mixed run holds them: the
    student's weights in fp32, the teacher in bf16; labels with ignored rows."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, s: float = 1.0, dtype=torch.float32) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * s).to(dtype).to(DEVICE)

    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[4:9] = -100
    return {"hs": rand(n, hs, dtype=hidden_dtype), "ws": rand(vocab, hs, s=scale, dtype=weight_dtype),
            "bs": rand(vocab, s=0.5), "ht": rand(n, ht, dtype=teacher_dtype),
            "wt": rand(vocab, ht, s=scale, dtype=teacher_dtype), "bt": rand(vocab, s=0.5, dtype=teacher_dtype),
            "labels": labels.to(DEVICE)}


def fused_run(backend: str, x: dict, *, cast: bool = False, **opts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and the student's gradients (hs, ws, bs) of one fused call, under autocast when ``cast``;
    the backward runs outside autocast, as the loop runs it."""
    leaves = {k: x[k].clone().requires_grad_() for k in ("hs", "ws", "bs")}
    with autocast(cast):
        loss = fused_linear_distill_loss(leaves["hs"], leaves["ws"], x["ht"], x["wt"], student_bias=leaves["bs"],
                                         teacher_bias=x["bt"], labels=x["labels"], backend=backend, **opts)
    loss.backward()
    return loss, {k: v.grad for k, v in leaves.items()}


def fused_fp64(x: dict, **opts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The exact answer from the inputs as given (no operand rounding)."""
    ref = {k: x[k].double().cpu().requires_grad_(k in ("hs", "ws", "bs")) for k in ("hs", "ws", "bs", "ht", "wt", "bt")}
    labels = x["labels"].cpu()
    loss = reduce64(rows64(ref["hs"] @ ref["ws"].T + ref["bs"], ref["ht"] @ ref["wt"].T + ref["bt"], labels, **opts),
                    labels, "mean")
    loss.backward()
    return loss.detach(), {k: ref[k].grad for k in ("hs", "ws", "bs")}


def assert_close(loss, grads, want_loss, want_grads, rtol: float, gtol: float) -> None:
    torch.testing.assert_close(loss.double().cpu(), want_loss.double().cpu(), rtol=rtol, atol=rtol)
    for k, want in want_grads.items():
        want = want.double().cpu()
        torch.testing.assert_close(grads[k].double().cpu(), want, rtol=0, atol=gtol * float(want.abs().max()),
                                   msg=lambda m, k=k: f"grad of {k}: {m}")


# catches: a fused backend that fails under autocast (the Triton GEMM path raised "expected m1 and m2
# to have the same dtype" / "Expected out tensor to have dtype BFloat16"), one that ignores autocast
# (fp32 GEMMs: 1e-2 away from the autocast reference) or lets autocast round its logits to bf16, and
# gradients that do not come back in each leaf's dtype (fp32 for the master weight)
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_fused_under_autocast(backend, hidden_dtype, monkeypatch):
    x = head_inputs(hidden_dtype=hidden_dtype)
    opts = dict(divergence="jsd", temperature=2.5, alpha=0.3)
    loss, grads = fused_run(fused_backend(backend, monkeypatch), x, cast=True, **opts)
    assert loss.dtype == torch.float32
    assert {k: g.dtype for k, g in grads.items()} == {"hs": hidden_dtype, "ws": torch.float32, "bs": torch.float32}
    assert_close(loss, grads, *fused_fp64(x, **opts), *TOL[torch.bfloat16])  # the fp64 answer, bf16 tolerance
    # and the same bf16 operands as the reference backend under autocast: fp32 sums give the loss to
    # fp32 precision; the gradients to G's rounding (bf16 for the two backward GEMMs; fp32 in the reference)
    want, want_grads = fused_run("torch", x, cast=True, **opts)
    assert_close(loss, grads, want, want_grads, 1e-5, 1e-2)
    assert abs(loss.item() - fused_run("torch", x, **opts)[0].item()) > 1e-4  # autocast did round the operands


# catches: an fp32 master weight beside bf16 hidden states refused outside autocast, or multiplied in
# bf16 (the weight rounded: 1e-3 off) instead of the wider dtype
@pytest.mark.parametrize("backend", FUSED)
def test_fused_fp32_master_weight_with_bf16_hidden_states(backend, monkeypatch):
    x = head_inputs(hidden_dtype=torch.bfloat16, teacher_dtype=torch.float32)
    opts = dict(divergence="forward_kl", temperature=1.0, alpha=0.3)
    loss, grads = fused_run(fused_backend(backend, monkeypatch), x, **opts)
    assert grads["hs"].dtype == torch.bfloat16 and grads["ws"].dtype == torch.float32
    want, want_grads = fused_fp64(x, **opts)
    torch.testing.assert_close(loss.double().cpu(), want, rtol=1e-5, atol=1e-5)
    for k in ("ws", "bs"):  # fp32 gradients; grad_h comes back in bf16 (2**-9 relative)
        assert_close(loss, {k: grads[k]}, want, {k: want_grads[k]}, 1e-5, 1e-5)
    assert_close(loss, {"hs": grads["hs"]}, want, {"hs": want_grads["hs"]}, 1e-5, 1e-2)


# catches: fused logits computed in the operands' dtype (bf16 F.linear: logits of size 100 are 0.5
# apart; the chunked backend's loss was 3% off and its gradients up to 29% of their largest entry)
@pytest.mark.parametrize("backend", FUSED)
def test_fused_bf16_inputs_with_large_logits_match_fp64(backend, monkeypatch):
    x = head_inputs(hidden_dtype=torch.bfloat16, weight_dtype=torch.bfloat16, scale=6.0, seed=3)
    z = x["hs"].double() @ x["ws"].double().T
    assert z.abs().max() > 100
    opts = dict(divergence="forward_kl", temperature=1.0, alpha=0.3)
    loss, grads = fused_run(fused_backend(backend, monkeypatch), x, **opts)
    assert_close(loss, grads, *fused_fp64(x, **opts), 1e-4, 1e-2)  # gradients come back in bf16


# catches: the tiled fused kernel's scaled row log-sum-exp (log p = z/T - lse subtracts two numbers of
# size 1e4/T: ~3e-4 relative off in the gradient), in every fused backend: the inputs are multiples
# of 1/128, so every backend's fp32 logits are exact and only the softmax can lose digits
@pytest.mark.parametrize("backend", FUSED)
def test_fused_large_shared_offset(backend, monkeypatch):
    gen = torch.Generator().manual_seed(4)

    def dyadic(*shape: int, scale: int) -> torch.Tensor:
        return (torch.randint(-8, 9, shape, generator=gen) / scale).to(DEVICE)

    x = {"hs": dyadic(20, 40, scale=8), "ws": dyadic(301, 40, scale=16), "bs": 1e4 + dyadic(301, scale=128),
         "ht": dyadic(20, 24, scale=8), "wt": dyadic(301, 24, scale=16), "bt": 1e4 + dyadic(301, scale=128)}
    x["labels"] = torch.randint(0, 301, (20,), generator=gen).to(DEVICE)
    opts = dict(divergence="reverse_kl", temperature=2.5, alpha=0.3)
    loss, grads = fused_run(fused_backend(backend, monkeypatch), x, **opts)
    tol = 2e-6 if DEVICE == "cpu" else 1e-5  # compiled kernels use the approximate exp / log instructions
    assert_close(loss, grads, *fused_fp64(x, **opts), tol, tol)


# catches: weight_grad_fp32 not reaching the backend, or grad_W summed over row chunks in bf16 anyway
# (with a bf16 head, each of the 64 chunks rounds the running sum; fp32 rounds once at the end)
@pytest.mark.parametrize("backend", ["chunked", "triton:gemm"])
def test_weight_grad_fp32_accumulation(backend, monkeypatch, capsys):
    monkeypatch.setattr(chunked, "_fused_rows_per_block", lambda vocab: 4)
    name = fused_backend(backend, monkeypatch, chunk_rows=4)
    x = head_inputs(n=256, hidden_dtype=torch.bfloat16, weight_dtype=torch.bfloat16, teacher_dtype=torch.bfloat16)
    x["labels"][:] = torch.randint(0, 301, (256,), generator=torch.Generator().manual_seed(5))
    want = fused_fp64(x)[1]["ws"]
    errors = {}
    for fp32 in (False, True):
        grad = fused_run(name, x, weight_grad_fp32=fp32)[1]["ws"]
        assert grad.dtype == torch.bfloat16
        errors[fp32] = float((grad.double().cpu() - want).abs().max() / want.abs().max())
    with capsys.disabled():
        print(f"\n{backend}: grad_W max error / max |grad_W| vs fp64, 64 chunks of 4 rows: "
              f"bf16 accumulation {errors[False]:.2e}, fp32 accumulation {errors[True]:.2e}")
    # fp32: what is left is G's bf16 rounding for the tensor-core GEMMs and the result's (2**-9 each);
    # bf16: 1.7e-2 here, one rounding of the running sum per chunk
    assert errors[True] <= 2.0**-7
    assert errors[True] < errors[False] / 3


# catches: distill_loss or sparse_distill_loss backends that break, or compute in bf16, when called
# inside an autocast region on the bf16 logits an autocast LM head produces
@pytest.mark.parametrize("backend", ["torch", "chunked", "triton"])
@pytest.mark.parametrize("op", ["dense", "sparse"])
def test_logits_ops_under_autocast(backend, op):
    x = head_inputs()
    with autocast():
        h = x["hs"].clone().requires_grad_()
        s = h @ x["ws"].T  # bf16, as the model's own LM head gives under autocast
        t = x["ht"] @ x["wt"].T
        assert s.dtype == t.dtype == torch.bfloat16
        if op == "dense":
            loss = distill_loss(s, t, labels=x["labels"], temperature=2.5, alpha=0.3, divergence="jsd",
                                backend=backend)
        else:
            values, ids = t.float().topk(7, -1)
            loss = sparse_distill_loss(s, ids, values, x["labels"], teacher_logsumexp=t.float().logsumexp(-1),
                                       tail="bucket", temperature=1.0, alpha=0.3, backend=backend)
    assert loss.dtype == torch.float32
    (grad_s,) = torch.autograd.grad(loss, s)
    s64 = s.detach().double().cpu().requires_grad_()
    labels = x["labels"].cpu()
    if op == "dense":
        rows = rows64(s64, t.double().cpu(), labels, temperature=2.5, alpha=0.3, divergence="jsd")
    else:
        rows = sparse_rows64(torch.where(labels[:, None] != -100, s64, 0.0), ids.cpu(), values.cpu(),
                             t.double().cpu().logsumexp(-1), labels, tail="bucket", alpha=0.3)
    want = reduce64(rows, labels, "mean")
    want.backward()
    torch.testing.assert_close(loss.double().cpu(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_s.double().cpu(), s64.grad, rtol=0, atol=1e-2 * float(s64.grad.abs().max()))


# catches: a bucket-tail membership that misses ids in later vocabulary blocks (the sorted-id cursor),
# a loss gather or fix-up that drops ids past the first block of BLOCK_K, repeated ids across blocks,
# and a tile sized by k (the [BLOCK_V, next_pow2(k)] membership tile spilled registers at k >= 64)
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_sparse_triton_large_k(tail, monkeypatch):
    monkeypatch.setattr(softmax_kl, "BLOCK_V", 256)  # V = 1271: 5 blocks per row, the last ragged
    launches: list[dict] = []
    kernel = sparse_kl._sparse_forward_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append({k: v for k, v in kwargs.items() if k in ("BLOCK_V", "BLOCK_K")})
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(sparse_kl, "_sparse_forward_kernel", Spy())
    gen = torch.Generator().manual_seed(6)
    n, vocab = 10, 1271
    s = torch.randn(n, vocab, generator=gen) * 2
    teacher = torch.randn(n, vocab, generator=gen) * 3
    for k in (7, 100):
        values, ids = teacher.topk(k, -1)
        values[1, k - 3:] = float("-inf")  # empty slots
        if tail == "renormalize":
            ids[0, k - 1] = ids[0, 2]  # a repeated id in another BLOCK_K block counts twice
        labels = torch.randint(0, vocab, (n,), generator=gen)
        labels[3] = -100
        lse = teacher.logsumexp(-1)
        x = s.clone().to(DEVICE).requires_grad_()
        got = sparse_distill_loss(x, ids.to(DEVICE), values.to(DEVICE), labels.to(DEVICE),
                                  teacher_logsumexp=lse.to(DEVICE), tail=tail, temperature=2.0, alpha=0.3,
                                  reduction="sum", backend="triton")
        got.backward()
        s64 = s.double().requires_grad_()
        want = reduce64(sparse_rows64(s64, ids, values, lse, labels, temperature=2.0, tail=tail, alpha=0.3), labels,
                        "sum")
        want.backward()
        torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad.double().cpu(), s64.grad, rtol=0, atol=1e-5 * float(s64.grad.abs().max()))
    assert launches[0] == launches[1] == {"BLOCK_V": 256, "BLOCK_K": sparse_kl.BLOCK_K}


def offset_rows(kind: str, n: int = 9, vocab: int = 301) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits whose rows start off 16-byte boundaries in different ways."""
    gen = torch.Generator().manual_seed(7)
    wide = [torch.randn(n, vocab + 3, generator=gen).to(DEVICE) * 2 for _ in range(2)]
    if kind == "padded stride":  # aligned data, row stride V + 3: rows start at every residue
        return wide[0][:, :vocab], wide[1][:, :vocab]
    if kind == "misaligned data":  # data 4 bytes past a boundary: nothing can be peeled
        return wide[0][:, 1:vocab + 1], wide[1][:, 1:vocab + 1]
    return wide[0][:, :vocab], wide[1][:, :vocab].contiguous()  # strides V + 3 and V: rows disagree


# catches: the aligned-body / edge split dropping or double-counting columns (odd V, a padded row
# stride), and peeling claimed where the student, teacher and gradient rows disagree or are misaligned
@pytest.mark.parametrize("kind, peeled", [("padded stride", True), ("misaligned data", False),
                                          ("strides disagree", False)])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_rows_off_16_byte_boundaries(kind, peeled, divergence, monkeypatch):
    monkeypatch.setattr(softmax_kl, "BLOCK_V", 64)  # several body blocks per row
    s, t = offset_rows(kind)
    assert softmax_kl.peeling(s, t)["PEEL"] is peeled
    labels = torch.randint(0, 301, (9,), generator=torch.Generator().manual_seed(8)).to(DEVICE)
    x = s.detach().requires_grad_()  # the view itself: its data pointer and strides
    got = distill_loss(x, t, labels=labels, divergence=divergence, temperature=2.5, alpha=0.3, reduction="none",
                       backend="triton")
    got.sum().backward()
    s64 = s.detach().double().cpu().requires_grad_()
    want = rows64(s64, t.double().cpu(), labels.cpu(), divergence=divergence, temperature=2.5, alpha=0.3)
    want.sum().backward()
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double().cpu(), s64.grad, rtol=0, atol=1e-5 * float(s64.grad.abs().max()))
