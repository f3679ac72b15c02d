"""Plugins written yesterday keep working: a package written from hkd 0.1's docs, run by today's hkd.

``plugin_v0_1/`` is that package, frozen: the 0.1 plugin template (stage ``final_cosine``,
verifier ``length_limit``) plus a ``distill_loss`` backend whose function has the 0.1
signature (no ``skew``) and lifecycle hooks. Options hkd added since must reach it only
where they change nothing; where they would, the run is refused when it is built (a named
backend) or another backend serves it (``auto``), never a ``TypeError`` at step 1.
"""

from __future__ import annotations

import importlib
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hkd.config import Config, ConfigError, from_dict
from hkd.kernels import distill_loss, registry
from hkd.models.loading import build_preset
from hkd.plugin.manager import build_manager
from hkd.plugin.stage import StageContext
from hkd.sampling.verify import build_verifier
from hkd.train.loop import distill

ROOT = Path(__file__).resolve().parent / "plugin_v0_1"
PACKAGE = "hkd_example_plugin"


def _own_modules() -> dict[str, object]:
    return {name: module for name, module in sys.modules.items() if name == PACKAGE or name.startswith(PACKAGE + ".")}


@pytest.fixture
def v0_1():
    """The frozen package imported from ``plugin_v0_1/`` (not the installed template of the same name)
    and registered under the names of its entry points; modules and kernel registry restored after."""
    saved_modules = _own_modules()
    saved = [{op: dict(table) for op, table in layer.items()} for layer in (registry._BACKENDS, registry._PLUGIN_BACKENDS)]
    for name in saved_modules:
        del sys.modules[name]
    sys.path.insert(0, str(ROOT))
    importlib.invalidate_caches()
    try:
        package = importlib.import_module(PACKAGE)
        assert Path(package.__file__).is_relative_to(ROOT)
        kernel = importlib.import_module(f"{PACKAGE}.float64_kernel")
        observer = importlib.import_module(f"{PACKAGE}.observer")
        installed = {ep.name for ep in metadata.entry_points(group="hkd")}  # the template, when pip-installed
        pm = build_manager(disable=installed & {"example"}, extra_plugins=[
            ("example_v0_1", package), ("example_kernels_v0_1", kernel), ("example_observer_v0_1", observer)])
        yield SimpleNamespace(pm=pm, kernel=kernel, observer=observer)
    finally:
        sys.path.remove(str(ROOT))
        for name in _own_modules():
            del sys.modules[name]
        sys.modules.update(saved_modules)
        for layer, before in zip((registry._BACKENDS, registry._PLUGIN_BACKENDS), saved):
            layer.clear()
            layer.update(before)


def run(v0_1, raw_config, run_dir: Path, kernel: str, steps: int = 2, **logits) -> list[dict[str, float]]:
    """A tiny run of the logits stage (through ``kernel``) and the plugin's own stage; each step's metrics."""
    raw_config["schedule"] = {"phases": [{"name": "p", "steps": steps, "stages": {"logits": 1.0, "final_cosine": 0.5}}],
                              "temperature": {"start": 2.0, "end": 2.0}}
    raw_config["stages"] = {"logits": {"alpha": 0.2, **logits}}
    raw_config["kernels"] = {"distill_loss": kernel}
    raw_config["optim"]["grad_accum"] = 1
    v0_1.observer.EVENTS.clear()
    distill(from_dict(Config, raw_config), run_dir, pm=v0_1.pm)
    return [event[2] for event in v0_1.observer.EVENTS if event[0] == "after_step"]


def test_a_v0_1_backend_named_in_the_config_trains_and_matches_the_reference(v0_1, raw_config, tmp_path):
    # catches: hkd passing skew= (or any option added since 0.1) to a backend whose function does not
    # take it: TypeError at the first loss; or the backend silently not used, or computing other numbers
    ours = run(v0_1, raw_config, tmp_path / "float64", "float64_v0")
    assert v0_1.kernel.CALLS and {c["divergence"] for c in v0_1.kernel.CALLS} == {"forward_kl"}
    assert all(c["temperature"] == 2.0 for c in v0_1.kernel.CALLS)
    assert [e[0] for e in v0_1.observer.EVENTS] == ["train_start", "after_step", "after_step", "train_end"]
    calls = len(v0_1.kernel.CALLS)
    reference = run(v0_1, raw_config, tmp_path / "torch", "torch")
    assert len(v0_1.kernel.CALLS) == calls  # the reference run did not go through the plugin
    assert len(ours) == len(reference) == 2
    for mine, theirs in zip(ours, reference):
        assert mine["loss/logits"] == pytest.approx(theirs["loss/logits"], rel=1e-4)
        assert mine["loss/final_cosine"] == pytest.approx(theirs["loss/final_cosine"], rel=1e-4)
    verify = build_verifier(v0_1.pm, "length_limit", {"max_chars": 5})  # the 0.1 verifier still loads
    assert verify({}, "=> 42").passed and verify({}, "=> 123456").reason == "too_long"


def test_a_v0_1_backend_named_for_skew_is_refused_when_the_run_is_built(v0_1, raw_config, tmp_path):
    # catches: a request the named backend cannot serve (skew, which its function does not take)
    # failing at step 1 after the models loaded, or skew silently dropped (plain KL trained instead)
    with pytest.raises(ConfigError) as refused:
        run(v0_1, raw_config, tmp_path / "run", "float64_v0", divergence="skew_forward_kl", skew=0.2)
    message = str(refused.value)
    assert message.startswith("stages.logits.divergence: kernel backend 'float64_v0' for distill_loss")
    assert "kernels.distill_loss" in message and "takes no 'skew' argument" in message
    assert "stages.logits.skew=0.2" in message and "torch" in message  # and which backends can
    assert v0_1.observer.EVENTS == [] and v0_1.kernel.CALLS == []  # no step ran, not even train start


def test_the_onpolicy_stage_refuses_a_v0_1_backend_for_skew_at_build_time(v0_1):
    # catches: the on-policy stage (divergence and skew in its own config) reaching its first sampled
    # step before the backend named in stages.onpolicy.backend is found unable to compute skew reverse KL
    from hkd.plugins.onpolicy import OnPolicyStage, OnPolicyStageConfig

    model = build_preset("tiny-llama", {"num_hidden_layers": 1}, seed=3)
    context = StageContext("onpolicy", model, model, {}, "stages.onpolicy", v0_1.pm)
    config = OnPolicyStageConfig(divergence="skew_reverse_kl", skew=0.3, backend="float64_v0")
    with pytest.raises(ConfigError, match=r"^stages\.onpolicy\.divergence: kernel backend 'float64_v0' for "
                                          r"distill_loss \(chosen by stages\.onpolicy\.backend\).*"
                                          r"stages\.onpolicy\.skew=0\.3: its function takes no 'skew' argument"):
        OnPolicyStage(config, context)


def test_auto_serves_skew_from_another_backend_and_still_prefers_the_v0_1_one_otherwise(v0_1, raw_config, tmp_path):
    # catches: auto picking the highest-priority backend although it cannot serve the request
    # (TypeError, or skew dropped), or never picking a plugin backend again once skew exists
    metrics = run(v0_1, raw_config, tmp_path / "run", "auto", divergence="skew_forward_kl", skew=0.2)
    assert len(metrics) == 2 and all(m["loss/logits"] > 0 for m in metrics)
    assert v0_1.kernel.CALLS == []
    student, teacher = torch.randn(6, 37), torch.randn(6, 37)
    skewed = distill_loss(student, teacher, divergence="skew_forward_kl", skew=0.2)
    assert skewed.item() == pytest.approx(
        distill_loss(student, teacher, divergence="skew_forward_kl", skew=0.2, backend="torch").item(), rel=1e-6)
    assert v0_1.kernel.CALLS == []
    distill_loss(student, teacher, divergence="jsd", beta=0.3)  # an option it takes: auto still prefers it
    assert [c["divergence"] for c in v0_1.kernel.CALLS] == ["jsd"] and v0_1.kernel.CALLS[0]["beta"] == 0.3
