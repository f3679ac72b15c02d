"""Non-finite inputs, error messages, the registry and autograd contracts."""

from __future__ import annotations

import math

import pytest
import torch

from hkd import kernels
from hkd.kernels import KernelBackend, distill_loss, fused_linear_distill_loss, register_backend

from .helpers import BACKENDS, DEVICE, reduce64, rows64

# the interpreter evaluates masked-out lanes too (inf - inf there); the results never use them
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def logits(n: int = 6, vocab: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=gen).to(DEVICE), torch.randn(n, vocab, generator=gen).to(DEVICE)


# --------------------------------------------------------------------------- non-finite inputs

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_minus_inf_logits_are_zero_probability_tokens(backend, divergence):
    s, t = logits()
    s[:, :10] = t[:, :10] = float("-inf")  # e.g. a masked-out part of the vocabulary
    x = s.clone().requires_grad_()
    got = distill_loss(x, t, divergence=divergence, temperature=2.0, reduction="none", backend=backend)
    got.sum().backward()
    expected = rows64(s[:, 10:].double().cpu(), t[:, 10:].double().cpu(), divergence=divergence, temperature=2.0)
    torch.testing.assert_close(got.double().cpu(), expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(x.grad).all() and (x.grad[:, :10] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_missing_teacher_mass_is_infinite(backend):
    s, t = logits()
    s[0, 3] = float("-inf")  # forward KL: the teacher puts mass where the student has none
    rows = distill_loss(s, t, reduction="none", backend=backend)
    assert rows[0].item() == math.inf and torch.isfinite(rows[1:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_to_its_row_but_ignored_rows_stay_clean(backend):
    s, t = logits()
    s[1, 5] = float("nan")
    s[2, :] = float("nan")  # padding garbage on an ignored row
    labels = torch.tensor([1, 2, -100, 3, 4, 5], device=DEVICE)
    x = s.clone().requires_grad_()
    rows = distill_loss(x, t, labels=labels, alpha=0.3, reduction="none", backend=backend)
    assert math.isnan(rows[1].item()) and rows[2].item() == 0.0
    rows[[0, 2, 3, 4, 5]].sum().backward()
    assert (x.grad[2] == 0).all()
    # catches: a NaN that leaks into other rows' values or gradients (through a shared max, sum or
    # count), which a finiteness check alone would miss when the leak is finite but wrong
    clean = [0, 3, 4, 5]
    s64 = s[clean].double().cpu().requires_grad_()
    want = rows64(s64, t[clean].double().cpu(), labels[clean].cpu(), alpha=0.3)
    want.sum().backward()
    torch.testing.assert_close(rows[clean].double().cpu(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad[clean].double().cpu(), s64.grad, rtol=0, atol=1e-6 * float(s64.grad.abs().max()))


# --------------------------------------------------------------------------- errors

def test_vocab_mismatch_names_both_sizes():
    s, _ = logits(vocab=50)
    _, t = logits(vocab=51)
    with pytest.raises(ValueError, match="50.*51"):
        distill_loss(s, t)
    h = torch.randn(4, 8)
    with pytest.raises(ValueError, match="vocab sizes differ.*50.*51"):
        fused_linear_distill_loss(h, torch.randn(50, 8), h, torch.randn(51, 8))


def test_fused_hidden_size_mismatch():
    with pytest.raises(ValueError, match="student hidden size 8"):
        fused_linear_distill_loss(torch.randn(4, 8), torch.randn(50, 9), torch.randn(4, 3), torch.randn(50, 3))


@pytest.mark.parametrize("option,value,valid", [
    ("divergence", "kl", "forward_kl"), ("reduction", "avg", "mean"), ("backend", "cuda", "chunked"),
])
def test_unknown_names_list_the_valid_ones(option, value, valid):
    s, t = logits()
    with pytest.raises(ValueError, match=f"{value}.*{valid}"):
        distill_loss(s, t, **{option: value})


def test_alpha_needs_labels_and_labels_need_the_right_shape():
    s, t = logits()
    with pytest.raises(ValueError, match="labels"):
        distill_loss(s, t, alpha=0.5)
    with pytest.raises(ValueError, match="labels"):
        distill_loss(s, t, labels=torch.zeros(5, dtype=torch.long))


def test_out_of_range_labels_are_named_when_the_cross_entropy_uses_them():
    s, t = logits(n=6, vocab=50)
    labels = torch.tensor([3, -100, 50, 7, -1, 2], device=DEVICE)
    weight = torch.randn(50, 4, device=DEVICE)
    h = torch.randn(6, 4, device=DEVICE)
    if DEVICE == "cuda":  # a check would be a host sync: the bad rows' losses are NaN instead (no out-of-bounds read)
        for rows in (distill_loss(s, t, labels=labels, alpha=0.5, reduction="none"),
                     fused_linear_distill_loss(h, weight, h, weight, labels=labels, alpha=0.5, reduction="none")):
            assert rows.isnan().tolist() == [False, False, True, False, True, False]
    else:
        with pytest.raises(ValueError, match=r"token ids in \[0, 50\) or ignore_index=-100; row 2 has 50 \(2 such rows\)"):
            distill_loss(s, t, labels=labels, alpha=0.5)
        with pytest.raises(ValueError, match=r"row 2 has 50"):
            fused_linear_distill_loss(h, weight, h, weight, labels=labels, alpha=0.5)
    # without the cross-entropy term labels only mark ignored rows; other values are harmless: the
    # mean runs over the 5 rows not labelled -100 (catches: such rows dropped, or counted as ignored)
    want = reduce64(rows64(s.double().cpu(), t.double().cpu(), labels.cpu()), labels.cpu(), "mean")
    torch.testing.assert_close(distill_loss(s, t, labels=labels, alpha=0.0).double().cpu(), want, rtol=1e-5, atol=1e-6)


def test_triton_requested_where_it_cannot_run(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("triton runs here")
    monkeypatch.delenv("TRITON_INTERPRET")
    s, t = logits()
    with pytest.raises(RuntimeError, match="triton.*no CUDA device"):
        distill_loss(s, t, backend="triton")
    assert [b["name"] for b in kernels.backends("distill_loss") if b["auto"]] == ["chunked"]


# --------------------------------------------------------------------------- registry

def test_custom_backend_explicit_auto_and_duplicates(clean_registry):
    calls = []

    def halve(student, teacher, labels, **options):
        calls.append(options["divergence"])
        return kernels.get_backend("distill_loss", "torch").fn(student, teacher, labels, **options) / 2

    s, t = logits()
    register_backend(KernelBackend("distill_loss", "halve", halve, priority=5))
    base = distill_loss(s, t, backend="torch")
    assert distill_loss(s, t, backend="halve", divergence="jsd").item() != 0 and calls == ["jsd"]
    assert distill_loss(s, t, backend="halve").item() == pytest.approx(base.item() / 2)
    with pytest.raises(ValueError, match="already registered"):
        register_backend(KernelBackend("distill_loss", "halve", halve))
    register_backend(KernelBackend("distill_loss", "halve", halve, priority=99), replace=True)
    assert distill_loss(s, t).item() == pytest.approx(base.item() / 2)  # auto now prefers it


def test_auto_falls_back_quietly_and_explicit_unavailable_raises(clean_registry):
    def boom(*args, **kwargs):
        raise AssertionError("must not run")

    register_backend(KernelBackend("distill_loss", "gone", boom, priority=100,
                                   is_available=lambda: (False, "library missing")))
    register_backend(KernelBackend("distill_loss", "picky", boom, priority=99, supports=lambda *t: False))
    s, t = logits()
    distill_loss(s, t)  # auto skips both
    rows = {b["name"]: b for b in kernels.backends("distill_loss")}
    assert rows["gone"]["available"] is False and rows["gone"]["reason"] == "library missing"
    assert rows["chunked"]["auto"] and not rows["picky"]["auto"]
    with pytest.raises(RuntimeError, match="'gone'.*library missing"):
        distill_loss(s, t, backend="gone")


# --------------------------------------------------------------------------- autograd contracts

@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_gradient(backend):
    s, t = logits()
    x, y = s.clone().requires_grad_(), t.clone().requires_grad_()
    distill_loss(x, y, divergence="jsd", backend=backend).backward()
    assert x.grad is not None and y.grad is None
    h, w = (torch.randn(*shape, device=DEVICE, requires_grad=True) for shape in ((6, 16), (50, 16)))
    ht, wt = (torch.randn(*shape, device=DEVICE, requires_grad=True) for shape in ((6, 8), (50, 8)))
    fused_linear_distill_loss(h, w, ht, wt, backend=backend).backward()
    assert h.grad is not None and w.grad is not None and ht.grad is None and wt.grad is None


# (forward-only calls: test_paths.test_forward_only_allocates_nothing_of_size_n_by_v)


def test_stored_gradient_backends_refuse_a_second_backward():
    s, t = logits()
    x = s.clone().requires_grad_()
    loss = distill_loss(x, t, backend="chunked")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
