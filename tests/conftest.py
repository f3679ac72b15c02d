"""Shared fixtures: tiny preset model directories and a minimal run config."""

from __future__ import annotations

import os

import torch

# Triton kernels run on the CPU through the interpreter in CI. The variable is read when
# triton is imported (transformers imports it below), so it must be set first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from hkd.models.loading import write_preset  # noqa: E402

TEACHER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
           "num_key_value_heads": 2}
REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout: tests run from a clone

STUDENT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1}

BASE_CONFIG: dict[str, Any] = {
    "teacher": {"preset": "tiny-llama", "preset_overrides": TEACHER, "seed": 1},
    "student": {"preset": "tiny-llama", "preset_overrides": STUDENT, "seed": 2},
    "data": {"kind": "synthetic", "num_examples": 32, "batch_size": 4, "max_length": 48},
    "schedule": {
        "ramp_steps": 1,
        "phases": [
            {"name": "structure", "steps": 2, "stages": {"attention": 1.0}},
            {"name": "feature", "steps": 2, "stages": {"attention": 0.5, "hidden": 1.0}},
            {"name": "decision", "steps": 2, "stages": {"hidden": 0.5, "logits": 1.0}},
        ],
    },
    "stages": {"hidden": {"include_embeddings": True}, "logits": {"alpha": 0.2}},
    "optim": {"lr": 1e-3, "grad_accum": 2},
    "train": {"progress": False},
}


@pytest.fixture
def raw_config() -> dict[str, Any]:
    """A fresh copy of a tiny 6-step, three-phase config (presets, synthetic data)."""
    return copy.deepcopy(BASE_CONFIG)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Teacher and student written once per session as real HF directories."""
    root = tmp_path_factory.mktemp("models")
    return {
        "teacher": write_preset("tiny-llama", root / "teacher", TEACHER, seed=1),
        "student": write_preset("tiny-llama", root / "student", STUDENT, seed=2),
    }


@pytest.fixture
def subprocess_env():
    """Environment for subprocesses that run hkd (inherits this interpreter's path)."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [env.get("PYTHONPATH", "")] if p)
    return env


def load_bench_script(name: str) -> Any:
    """Import ``bench/NAME.py`` (scripts, not a package) as a module for its tests."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _kernel_registry_restored():
    """A test that builds a plugin manager makes its plugins' kernel backends the registry's plugin
    layer; the next test starts from the layer it found, as a new process would."""
    from hkd.kernels import registry

    saved = [{op: dict(table) for op, table in layer.items()} for layer in (registry._BACKENDS, registry._PLUGIN_BACKENDS)]
    yield
    for layer, before in zip((registry._BACKENDS, registry._PLUGIN_BACKENDS), saved):
        layer.clear()
        layer.update(before)
