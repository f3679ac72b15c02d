"""A backend receives the options it declares; what it cannot serve falls back (auto) or is refused by name.

The rule mirrors pluggy's for hook implementations: an op may grow options without breaking
backends written before them, as long as an option a backend does not take is dropped only
where it cannot change the result.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from hkd.errors import ConfigError
from hkd.kernels import (
    KernelBackend, check_request, distill_loss, fused_linear_distill_loss, register_backend, sparse_distill_loss,
)
from hkd.kernels import registry
from hkd.kernels.reference import row_losses


def logits(n: int = 5, vocab: int = 23, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=gen), torch.randn(n, vocab, generator=gen)


def recording(calls: list[dict], signature: str):
    """A reference backend with the given keyword signature that records what it received."""
    namespace: dict = {}
    exec(f"def fn(student, teacher, labels, {signature}):\n    return record(student, teacher, labels, locals())",
         {"record": lambda s, t, labels, options: record(s, t, labels, options, calls)}, namespace)
    return namespace["fn"]


def record(student, teacher, labels, options, calls):
    options = {k: v for k, v in options.items() if k not in ("student", "teacher", "labels")}
    options.update(options.pop("kwargs", {}))
    calls.append(options)
    return row_losses(student, teacher, labels, **{"ignore_index": -100, "beta": 0.5, "temperature": 1.0,
                                                   "scale_t2": True, "alpha": 0.0, "divergence": "forward_kl",
                                                   **options})


OLD = "*, ignore_index, divergence, beta, temperature, scale_t2, alpha"  # distill_loss backends before skew


def test_a_backend_receives_only_the_keywords_its_function_declares(clean_registry):
    # catches: every option passed to every backend (TypeError for a backend written before skew), or
    # a **kwargs backend no longer receiving options it did not name
    old, catch_all = [], []
    register_backend(KernelBackend("distill_loss", "old", recording(old, OLD)))
    register_backend(KernelBackend("distill_loss", "all", recording(catch_all, "**kwargs")))
    s, t = logits()
    got = distill_loss(s, t, divergence="jsd", beta=0.3, temperature=2.0, backend="old")
    assert set(old[0]) == {"ignore_index", "divergence", "beta", "temperature", "scale_t2", "alpha"}
    assert got.item() == pytest.approx(distill_loss(s, t, divergence="jsd", beta=0.3, temperature=2.0,
                                                    backend="torch").item(), rel=1e-6)
    distill_loss(s, t, divergence="skew_reverse_kl", skew=0.4, backend="all")
    assert catch_all[0]["skew"] == 0.4 and set(catch_all[0]) == set(registry._OPS["distill_loss"].options)
    assert registry.get_backend("distill_loss", "old").takes == frozenset(old[0]) | {"student", "teacher", "labels"}
    assert registry.get_backend("distill_loss", "all").takes is None


@pytest.mark.parametrize("signature, call, missing", [
    (OLD, dict(divergence="skew_forward_kl", skew=0.0), "skew"),  # a skew divergence needs skew, even at 0
    (OLD, dict(divergence="skew_reverse_kl"), "skew"),
    ("*, ignore_index, divergence, beta, scale_t2, alpha", dict(temperature=2.0), "temperature"),
    ("*, ignore_index, divergence, temperature, scale_t2, alpha", dict(divergence="jsd"), "beta"),
    ("*, ignore_index, divergence, beta, temperature, scale_t2", dict(alpha=0.5), "alpha"),
])
def test_an_option_is_dropped_only_where_it_cannot_change_the_result(clean_registry, signature, call, missing):
    # catches: a non-default option silently dropped (the backend trains plain KL when skew KL was asked),
    # or an option refused although its value changes nothing (skew outside the skew divergences, T = 1)
    calls: list[dict] = []
    register_backend(KernelBackend("distill_loss", "lacking", recording(calls, signature)))
    s, t = logits()
    labels = torch.tensor([1, 2, -100, 4, 5])
    with pytest.raises(ValueError, match=rf"kernel backend 'lacking' for distill_loss cannot serve .*: its function "
                                         rf"takes no '{missing}' argument; backends that can: .*torch"):
        distill_loss(s, t, labels=labels, backend="lacking", **call)
    assert calls == []
    inert = {"skew": dict(divergence="reverse_kl", skew=0.4), "temperature": dict(temperature=1.0),
             "beta": dict(divergence="reverse_kl", beta=0.2), "alpha": dict(alpha=0.0)}[missing]
    got = distill_loss(s, t, labels=labels, backend="lacking", **inert)
    assert missing not in calls[0]
    assert got.item() == pytest.approx(distill_loss(s, t, labels=labels, backend="torch", **inert).item(), rel=1e-6)


def test_auto_passes_over_a_backend_that_cannot_serve_the_call(clean_registry):
    # catches: auto choosing by priority alone and then failing (or dropping skew) inside the backend
    calls: list[dict] = []
    register_backend(KernelBackend("distill_loss", "old", recording(calls, OLD), priority=100))
    s, t = logits()
    distill_loss(s, t, divergence="reverse_kl")
    assert [c["divergence"] for c in calls] == ["reverse_kl"]  # auto prefers it where it can serve
    got = distill_loss(s, t, divergence="skew_forward_kl", skew=0.3)
    assert len(calls) == 1
    assert got.item() == pytest.approx(distill_loss(s, t, divergence="skew_forward_kl", skew=0.3,
                                                    backend="torch").item(), rel=1e-6)


def test_declared_divergences_bound_what_a_backend_serves(clean_registry):
    # catches: a backend that computes one divergence handed another (wrong numbers), or one whose
    # function has no divergence argument refused although it declared the only one it computes
    calls: list[dict] = []
    register_backend(KernelBackend("distill_loss", "fkl", recording(calls, "*, ignore_index, temperature, scale_t2, "
                                                                        "alpha"), priority=100, divergences={"forward_kl"}))
    s, t = logits()
    distill_loss(s, t, backend="fkl")
    assert calls and "divergence" not in calls[0]
    with pytest.raises(ValueError, match=r"'fkl' for distill_loss cannot serve divergence='jsd': it computes only "
                                         r"\['forward_kl'\]"):
        distill_loss(s, t, divergence="jsd", backend="fkl")
    distill_loss(s, t, divergence="jsd")  # auto: another backend
    assert len(calls) == 1
    backend = KernelBackend("distill_loss", "x", lambda *a, **k: None, divergences=["jsd", "reverse_kl"])
    assert backend.divergences == frozenset({"jsd", "reverse_kl"})
    assert KernelBackend("distill_loss", "x", len, 0, registry.always, None).divergences is None  # 0.1's positional form


@pytest.mark.parametrize("fn, divergences, message", [
    (lambda student, teacher: None, None, "takes 2 positional arguments, but distill_loss passes 3"),
    (lambda s, t, labels, *, foo: None, None, "requires 'foo', which distill_loss never passes"),
    (lambda *args, **kwargs: None, ("forward_kl", "kl"), r"divergences \['kl'\] are not divergences of the op"),
])
def test_registration_refuses_a_backend_no_call_could_reach(clean_registry, fn, divergences, message):
    # catches: a backend whose signature can never match the op accepted, failing at its first call
    with pytest.raises(ValueError, match=message):
        register_backend(KernelBackend("distill_loss", "bad", fn, divergences=divergences))


def test_check_request_refuses_at_build_time_naming_the_config_keys(clean_registry):
    # catches: the refusal reaching a run only at step 1, or a message that names neither the key
    # that chose the backend nor the setting it cannot serve
    register_backend(KernelBackend("distill_loss", "old", recording([], OLD)))
    register_backend(KernelBackend("distill_loss", "no_t", recording([], "*, ignore_index, divergence, beta, skew, "
                                                                        "scale_t2, alpha")))
    common = dict(where="stages.logits", elsewhere={"temperature": "schedule.temperature"})
    check_request("distill_loss", "old", chosen_by="kernels.distill_loss", divergence="jsd", skew=0.5, **common)
    check_request("distill_loss", "auto", chosen_by="kernels.distill_loss", divergence="skew_forward_kl", **common)
    with pytest.raises(ConfigError, match=r"^stages\.logits\.divergence: kernel backend 'old' for distill_loss "
                                          r"\(chosen by stages\.logits\.backend\) cannot serve "
                                          r"stages\.logits\.divergence='skew_forward_kl', stages\.logits\.skew=0\.1: "
                                          r"its function takes no 'skew' argument; backends that can: .*torch"):
        check_request("distill_loss", "old", chosen_by="stages.logits.backend", divergence="skew_forward_kl", **common)
    # the schedule sets the temperature per step, so a backend must take it
    with pytest.raises(ConfigError, match=r"^schedule\.temperature: kernel backend 'no_t' .*known only at run time.*"
                                          r"takes no 'temperature' argument"):
        check_request("distill_loss", "no_t", chosen_by="kernels.distill_loss", **common)
    with pytest.raises(ConfigError, match=r"^kernels\.distill_loss: unknown kernel backend 'nope' for distill_loss"):
        check_request("distill_loss", "nope", chosen_by="kernels.distill_loss", **common)
    register_backend(KernelBackend("distill_loss", "gone", recording([], OLD), is_available=lambda: (False, "no GPU")))
    with pytest.raises(ConfigError, match=r"^kernels\.distill_loss: kernel backend 'gone' .*cannot run here: no GPU"):
        check_request("distill_loss", "gone", chosen_by="kernels.distill_loss", **common)
    with pytest.raises(TypeError, match=r"distill_loss has no option\(s\) \['tail'\]"):
        check_request("distill_loss", "torch", chosen_by="kernels.distill_loss", tail="bucket", **common)


@pytest.mark.parametrize("op, public, not_options", [
    ("distill_loss", distill_loss, {"labels", "reduction", "backend"}),
    ("fused_linear_distill_loss", fused_linear_distill_loss, {"labels", "reduction", "backend"}),
    ("sparse_distill_loss", sparse_distill_loss, {"labels", "reduction", "backend", "teacher_logsumexp",
                                                  "divergence"}),
])
def test_each_ops_declared_options_are_its_public_keyword_defaults(op, public, not_options):
    # catches: an option added to a public op but not to its declaration (backends never told it
    # exists, so it could be dropped unchecked), or a declared default drifting from the op's
    declared = {name: option.default for name, option in registry._OPS[op].options.items()}
    keywords = {name: p.default for name, p in inspect.signature(public).parameters.items()
                if p.default is not p.empty and name not in not_options}
    assert declared == keywords
