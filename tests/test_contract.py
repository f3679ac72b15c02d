"""The plugin contract: pluggy-native hook calls, teacher sources, the public API, the step's host reads."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import pluggy
import pytest
import torch

import hkd
from hkd.config import Config, from_dict
from hkd.errors import ConfigError, HkdError
from hkd.train.loop import build_run, distill, train_step
from hkd.plugin.manager import build_manager

HKD_ROOT = Path(hkd.__file__).resolve().parents[1]


def test_public_api_at_the_package_root():
    # catches: a name the docs promise (`from hkd import ...`) that the package does not export
    from hkd import ModelView, Stage, StageContext, StageSpec, StepState, TapRequest, hookimpl  # noqa: F401
    from hkd import KernelBackend, SparseTargets, VerifierSpec  # noqa: F401

    assert hkd.Stage is __import__("hkd.plugin.stage", fromlist=["Stage"]).Stage
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hkd.nope  # noqa: B018


def test_a_wrapper_hook_runs_around_the_others():
    # catches: a manager that iterates implementations itself, where wrapper=True silently did nothing
    seen: list[str] = []

    class Plain:
        @hkd.hookimpl
        def hkd_after_step(self, step):
            seen.append(f"plain {step}")

    class Wrapper:
        @hkd.hookimpl(wrapper=True)
        def hkd_after_step(self, step):
            seen.append("before")
            result = yield
            seen.append("after")
            return result

    pm = build_manager(["jsonl", "tensorboard", "wandb", "console"],
                       extra_plugins=[("plain", Plain()), ("wrapper", Wrapper())])
    pm.call("hkd_after_step", step=3, metrics={}, run_dir=Path("."))
    assert seen == ["before", "plain 3", "after"]


def test_a_raising_wrapper_and_a_raising_registration_hook_are_named():
    # catches: errors inside wrappers or registration hooks escaping as bare tracebacks
    class BadWrapper:
        @hkd.hookimpl(wrapper=True)
        def hkd_on_checkpoint(self, step, path):
            yield
            raise OSError("disk gone")

    pm = build_manager(extra_plugins=[("badwrapper", BadWrapper())])
    with pytest.raises(HkdError, match=r"plugin 'badwrapper' failed in hook hkd_on_checkpoint: OSError"):
        pm.call("hkd_on_checkpoint", step=1, path=Path("."))

    class BadStages:
        @hkd.hookimpl
        def hkd_add_stages(self):
            raise KeyError("oops")

    with pytest.raises(HkdError, match=r"plugin 'badstages' failed in hook hkd_add_stages: KeyError"):
        build_manager(extra_plugins=[("badstages", BadStages())]).infos()


def test_a_hook_spec_that_grows_an_argument_reaches_old_and_new_implementations():
    # catches: registration hooks called with no arguments (impl.function()), which broke the
    # promise that specs can grow arguments; here a spec with an argument is called through pluggy
    class Specs:
        @hkd.hookspec
        def hkd_add_widgets(self, flavour: str) -> list[str]:
            """A registration hook with an argument."""
            raise NotImplementedError

    class Old:
        @hkd.hookimpl
        def hkd_add_widgets(self):
            return ["old"]

    class New:
        @hkd.hookimpl
        def hkd_add_widgets(self, flavour):
            return [f"new-{flavour}"]

    pm = build_manager()
    pm.add_hookspecs(Specs)
    pm.register(Old(), name="old")
    pm.register(New(), name="new")
    assert sorted(pm.collect("hkd_add_widgets", flavour="mint")) == [("new", "new-mint"), ("old", "old")]


def test_hooks_are_traced_by_pluggy(raw_config, tmp_path):
    # catches: hook calls bypassing pluggy's caller (tracing, monitoring saw nothing)
    calls: list[str] = []
    pm = build_manager()
    undo = pm.add_hookcall_monitoring(lambda name, impls, kwargs: calls.append(name), lambda *a: None)
    raw_config["schedule"] = {"phases": [{"name": "p", "steps": 1, "stages": {"hidden": 1.0}}]}
    distill(from_dict(Config, raw_config), tmp_path / "run", pm=pm)
    undo()
    assert {"hkd_on_train_start", "hkd_on_phase_start", "hkd_after_step", "hkd_on_checkpoint",
            "hkd_on_train_end"} <= set(calls)


def test_a_plugin_kernel_backend_that_raises_names_backend_and_plugin(raw_config, tmp_path):
    # catches: an exception inside a backend reported only as "stage 'logits' failed"
    from hkd.kernels.registry import KernelBackend

    def broken(*args, **kwargs):
        raise RuntimeError("bad launch")

    class Backends:
        @hkd.hookimpl
        def hkd_add_kernel_backends(self):
            return [KernelBackend(op="distill_loss", name="broken", fn=broken, priority=-100)]

    pm = build_manager(extra_plugins=[("mykernels", Backends())])
    raw_config["schedule"] = {"phases": [{"name": "p", "steps": 1, "stages": {"logits": 1.0}}]}
    raw_config["kernels"] = {"distill_loss": "broken"}
    with pytest.raises(HkdError, match=r"kernel backend 'broken' for distill_loss \(plugin 'mykernels'\) failed: "
                                       r"RuntimeError\('bad launch'\)"):
        distill(from_dict(Config, raw_config), tmp_path / "run", pm=pm)


# what makes the host wait for the device: reading a value, and ops whose output size depends on the data
# (nonzero, boolean-mask indexing, masked_select, unique, repeat_interleave by a tensor) -- on a GPU each
# one is a sync, on the CPU it is free, so they are counted here instead of timed
SYNC_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy", "nonzero", "masked_select",
                "unique", "argwhere")
SYNC_FUNCTIONS = ("nonzero", "masked_select", "unique", "argwhere")


def _bool_index(index) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype == torch.bool and index.dim() > 0
    return isinstance(index, (tuple, list)) and any(_bool_index(i) for i in index)


def count_host_reads(run, steps, monkeypatch, also: tuple[str, ...] = ()) -> list[str]:
    """Run ``steps`` steps and return every host read made by hkd code on the step's thread, except reads of
    the micro-batches as the host built them (``Batches.batch``: host data, nothing to wait for).

    On the CPU the loop's "device" copy of a batch is the host tensor itself, so it is cloned here to tell
    them apart. hkd/kernels/ops.py checks label ranges on CPU tensors only (free there, skipped on CUDA:
    tests/kernels hold that), so it is left out of this CPU count."""
    import threading

    import hkd.train.loop as loop

    reads: list[str] = []
    ours = str(HKD_ROOT / "hkd")
    cpu_only = str(HKD_ROOT / "hkd" / "kernels" / "ops.py")
    host_storages: set[int] = set()
    build_batch = run.batches.batch

    def host_batch(index):
        batch = build_batch(index)
        host_storages.update(t.untyped_storage().data_ptr() for t in batch.values())
        return batch

    def counted(name, tensor) -> None:
        caller = sys._getframe(2).f_code.co_filename
        if (threading.current_thread() is threading.main_thread()
                and (caller.startswith(ours) and caller != cpu_only or caller in also)
                and not (isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() in host_storages)):
            reads.append(f"{name} in {caller}:{sys._getframe(2).f_lineno}")

    def method(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if name != "repeat_interleave" or (args and isinstance(args[0], torch.Tensor)):
                counted(name, self)
            return original(self, *args, **kwargs)

        return read

    def function(name):
        original = getattr(torch, name)

        def read(tensor, *args, **kwargs):
            counted(f"torch.{name}", tensor)
            return original(tensor, *args, **kwargs)

        return read

    def indexing(name):
        original = getattr(torch.Tensor, name)

        def index(self, key, *args):
            if _bool_index(key):
                counted(f"{name} with a boolean mask", self)
            return original(self, key, *args)

        return index

    monkeypatch.setattr(run.batches, "batch", host_batch)
    monkeypatch.setattr(loop, "batch_to_device", lambda batch, device: {k: v.clone() for k, v in batch.items()})
    for name in (*SYNC_METHODS, "repeat_interleave"):
        monkeypatch.setattr(torch.Tensor, name, method(name))
    for name in SYNC_FUNCTIONS:
        monkeypatch.setattr(torch, name, function(name))
    for name in ("__getitem__", "__setitem__"):
        monkeypatch.setattr(torch.Tensor, name, indexing(name))
    try:
        for step in range(steps):
            train_step(run, step)
    finally:
        monkeypatch.undo()
    return reads


def test_one_host_read_per_optimizer_step(raw_config, tmp_path, monkeypatch):
    # catches: float()/item() per stage per micro-batch (a device sync each on a GPU)
    raw_config["schedule"] = {"phases": [{"name": "p", "steps": 3, "stages": {"hidden": 1.0, "logits": 1.0,
                                                                              "attention": 0.5}}]}
    raw_config["optim"]["grad_accum"] = 3
    raw_config["stages"]["hidden"]["log_layers"] = True  # metric/... terms too
    run = build_run(from_dict(Config, raw_config), tmp_path / "run")
    reads = count_host_reads(run, 3, monkeypatch)
    assert len(reads) == 3, reads
    metrics = train_step(run, 3 - 1)
    assert metrics["loss/logits"] > 0 and any(k.startswith("metric/layer/hidden/") for k in metrics)


def test_the_read_counter_sees_syncs_that_are_not_value_reads(raw_config, tmp_path, monkeypatch):
    # catches: a counter blind to nonzero() and boolean-mask indexing (the syncs the offline cache's reader and
    # the mlm stage made inside the step): a stage doing both is counted twice per micro-batch
    from hkd.plugins import hidden

    raw_config["schedule"] = {"phases": [{"name": "p", "steps": 1, "stages": {"hidden": 1.0}}]}
    run = build_run(from_dict(Config, raw_config), tmp_path / "run")
    original = hidden.HiddenStage.loss

    def syncing(self, batch, teacher, student, state):
        batch["loss_mask"].nonzero()
        batch["input_ids"][batch["loss_mask"].bool()]
        return original(self, batch, teacher, student, state)

    monkeypatch.setattr(hidden.HiddenStage, "loss", syncing)
    reads = count_host_reads(run, 1, monkeypatch, also=(__file__,))
    assert len(reads) == 1 + 2 * raw_config["optim"]["grad_accum"], reads


# stage runs with no sampling: the samplers (onpolicy, rl) decode token by token, each token a host read
@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["teacher_cache", "uld", "mlm", "sft", "sentence", "teachers", "logits_fused"])
def test_one_host_read_per_step_for_every_stage_without_sampling(scenario, tmp_path, monkeypatch):
    # catches: per-row nonzero()/tolist() of the cached teacher's reader inside the step, a stage reading the
    # device batch back (uld's re-tokenisation, mlm's masks) or selecting rows with a boolean mask
    from tests.stage_runs import scenario_config

    run = build_run(from_dict(Config, scenario_config(scenario, tmp_path, steps=2, grad_accum=2)), tmp_path / "run")
    reads = count_host_reads(run, 2, monkeypatch)
    assert len(reads) == 2, reads


def test_an_rl_only_phase_skips_the_student_forward_and_a_gradless_micro_batch_skips_backward(
        raw_config, tmp_path, monkeypatch):
    # catches: a full student forward paid for nothing in RL-only phases, and the zero-loss trick
    import hkd.train.run as loop  # the student forward lives with the step helpers

    forwards: list[int] = []
    original = loop.forward_with_taps
    monkeypatch.setattr(loop, "forward_with_taps", lambda m, b, r: forwards.append(1) or original(m, b, r))
    raw_config["schedule"] = {"phases": [{"name": "rl", "steps": 1, "stages": {"rl": 1.0}}]}
    # the KL term toward the teacher gives a gradient even when every reward ties
    raw_config["stages"] = {"rl": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 4,
                                   "kl_weight": 0.1}}
    raw_config["optim"]["grad_accum"] = 3
    result = distill(from_dict(Config, raw_config), tmp_path / "run")
    assert forwards == [] and "loss/rl" in result.last_metrics and result.last_metrics["grad_norm"] > 0


def test_the_final_checkpoint_is_written_once(raw_config, tmp_path):
    # catches: the last step saved twice (and hkd_on_checkpoint firing twice) when steps % every == 0
    saved: list[int] = []

    class Watch:
        @hkd.hookimpl
        def hkd_on_checkpoint(self, step):
            saved.append(step)

    raw_config["train"]["checkpoint_every"] = 3
    raw_config["schedule"] = {"phases": [{"name": "p", "steps": 6, "stages": {"hidden": 1.0}}]}
    distill(from_dict(Config, raw_config), tmp_path / "run", pm=build_manager(extra_plugins=[("watch", Watch())]))
    assert saved == [3, 6]


def test_a_template_stage_under_a_teacher_cache_is_refused_at_start_naming_stage_and_field(raw_config, tmp_path):
    # catches: final_cosine passing the old cache check and dying at step 1 with an AttributeError
    from hkd.teachers.cache import build_cache
    from hkd.models.view import TapRequest

    @dataclass
    class NoOptions:
        pass

    class FinalHidden(hkd.Stage):
        def __init__(self, config, context):
            super().__init__()

        def teacher_request(self):
            return TapRequest(final_hidden=True)

        def loss(self, batch, teacher, student, state):  # pragma: no cover - must never run
            raise AssertionError("a stage the source cannot serve ran")

    class Plugin:
        @hkd.hookimpl
        def hkd_add_stages(self):
            return [hkd.StageSpec("final_only", NoOptions, FinalHidden)]

    raw = copy.deepcopy(raw_config)
    raw["schedule"] = {"phases": [{"name": "p", "steps": 1, "stages": {"logits": 1.0}}]}
    build_cache(from_dict(Config, raw), tmp_path / "cache", top_k=8, progress=False, work_dir=tmp_path / "work")
    raw["teacher_cache"] = str(tmp_path / "cache")
    raw["schedule"]["phases"][0]["stages"]["final_only"] = 1.0
    pm = build_manager(extra_plugins=[("finalonly", Plugin())])
    with pytest.raises(ConfigError, match=r"teacher_cache .* cannot serve what the schedule asks: stage 'final_only' "
                                          r"needs the teacher's final_hidden \(not available\)"):
        distill(from_dict(Config, raw), tmp_path / "run", pm=pm)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_pluggy_version_supports_new_style_wrappers():
    assert tuple(int(x) for x in pluggy.__version__.split(".")[:2]) >= (1, 2)
