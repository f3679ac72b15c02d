"""docs/plugins.md: the hook reference matches hkd/plugin/hookspecs.py, and its code examples run."""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from hkd.plugin import hookspecs
from hkd.kernels import distill_loss, registry
from hkd.plugin.manager import build_manager
from hkd.sampling.verify import build_verifier

DOCS = Path(__file__).resolve().parents[1] / "docs"


def load_generator() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gen_hooks", DOCS / "gen_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def example(marker: str) -> types.ModuleType:
    """Run the page's Python block that contains ``marker`` as a module (a plugin object)."""
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "plugins.md").read_text(), re.S)
    [code] = [b for b in blocks if f"@hookimpl\ndef {marker}(" in b]
    module = types.ModuleType(f"docs_example_{marker}")
    sys.modules[module.__name__] = module  # dataclasses look their module up while the class is made
    try:
        exec(compile(code, f"docs/plugins.md ({marker})", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module


def test_plugins_md_hook_reference_is_up_to_date(capsys):
    generator = load_generator()
    assert generator.main(["--check"]) == 0, capsys.readouterr().err
    documented = re.findall(r"^### `(\w+)`", generator.reference(), re.M)
    assert documented == [n for n in vars(hookspecs) if n.startswith("hkd_")]  # every hook, in source order


def test_a_changed_docstring_makes_the_check_fail(monkeypatch, capsys):
    generator = load_generator()
    monkeypatch.setattr(hookspecs.hkd_after_step, "__doc__", "Changed.")
    assert generator.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().err


def test_the_verifier_example_runs():
    # the template package (installed in CI) ships the same verifier: keep it out of this test
    installed = {ep.name for ep in __import__("importlib.metadata").metadata.entry_points(group="hkd")}
    pm = build_manager(disable=installed & {"example"}, extra_plugins=[("docs_verifier", example("hkd_add_verifiers"))])
    verify = build_verifier(pm, "length_limit", {"max_chars": 5})
    assert verify({}, "=> 42").passed and verify({}, "=> 123456").reason == "too_long"


def test_the_stage_example_builds():
    module = example("hkd_add_stages")
    [spec] = module.hkd_add_stages()
    assert spec.name == "final_cosine" and spec.config_cls().eps == 1e-8


@pytest.fixture
def float64_backend():
    pm = build_manager(extra_plugins=[("docs_kernel", example("hkd_add_kernel_backends"))])
    yield pm
    registry._BACKENDS["distill_loss"].pop("float64")  # keep the process-wide registry as other tests expect


def test_the_kernel_backend_example_registers_and_matches_the_reference(float64_backend):
    student = torch.randn(7, 37, requires_grad=True)
    teacher = torch.randn(7, 37)
    labels = torch.tensor([1, 2, -100, 4, 5, 6, -100])
    options = {"labels": labels, "temperature": 2.0, "alpha": 0.3}
    ours = distill_loss(student, teacher, backend="float64", **options)
    (grad,) = torch.autograd.grad(ours, student)
    reference = distill_loss(student, teacher, backend="torch", **options)
    (reference_grad,) = torch.autograd.grad(reference, student)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(grad, reference_grad)
    rows = {b["name"]: b for b in registry.backends("distill_loss")}
    assert rows["float64"]["available"] and not rows["float64"]["auto"]  # negative priority: never auto
