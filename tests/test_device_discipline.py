"""Device discipline of the training step, checked on the CPU.

On a GPU a tensor made on the CPU inside the step and mixed with device tensors crashes at step
1 (or costs a copy and a sync every step). On the CPU every device is ``cpu``, so two checks
stand in for the GPU:

* static: every tensor factory call in the step's packages names its ``device=`` (the inputs'
  device); a CPU tensor (no device, or ``device="cpu"``) is allowed only at the sites listed in
  :data:`CPU_SITES`, each with its reason;
* dynamic: a real step of every built-in stage runs with factory calls that name no device sent
  to the ``meta`` device (what ``torch.device("meta")`` does), so any such tensor mixed with the
  models' tensors raises on the spot, as a GPU would; the call sites in hkd are recorded too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import hkd
from hkd.config import Config, from_dict
from tests.stage_runs import SCENARIOS, scenario_config

HKD = Path(hkd.__file__).resolve().parent
STEP_PACKAGES = ("train", "models", "teachers", "plugins")
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint",
             "randperm", "eye", "linspace", "logspace", "scalar_tensor", "empty_strided", "tril_indices",
             "triu_indices"}

# (file under hkd/, enclosing function, factory) -> why a CPU tensor is right there
CPU_SITES: dict[tuple[str, str, str], str] = {
    ("teachers/cache.py", "sampled_targets", "zeros"): "hkd cache-teacher (not the step): draws on the CPU so a "
                                                      "seed gives the same targets on any machine",
    ("teachers/cache.py", "sampled_targets", "ones"): "hkd cache-teacher (not the step): counts of the CPU draws",
    ("teachers/cache.py", "build_cache.flush", "tensor"): "hkd cache-teacher (not the step): row offsets written "
                                                          "to a shard file",
    ("plugins/mlm.py", "mask_tokens", "rand"): "masks drawn from a CPU generator (the same masks on every device), "
                                               "copied once to the ids' device",
    ("plugins/mlm.py", "mask_tokens", "randint"): "random replacement ids from the same CPU generator, copied once",
    ("plugins/uld.py", "UldStage.teacher_batch", "tensor"): "the teacher's tokenization is built on the host from "
                                                            "Python lists and copied once to the device",
    ("plugins/uld.py", "UldStage.loss", "tensor"): "the aligned positions come from the host's re-tokenisation (Python "
                                                  "lists): built there, copied once (pinned, asynchronous on CUDA)",
    ("teachers/cache.py", "TeacherCache.read", "zeros"): "cached targets are gathered on the host, on the reader "
                                                         "thread ahead of the step, and copied once (pinned on CUDA)",
    # whole files: the teacher-on-its-own-ranks wire (hkd/teachers/ranked.py) and launcher (hkd/train/placement.py)
    # send headers and control messages on the CPU (gloo) group; none of their CPU tensors meets the models'
    ("teachers/ranked.py", "*", "*"): "message headers and descriptions on the CPU (gloo) metadata group",
    ("train/placement.py", "*", "*"): "stop and end messages on the CPU (gloo) control group",
}


def factory_calls(path: Path) -> list[tuple[str, str, int, bool]]:
    """``(enclosing function, factory, line, on the cpu)`` of every ``torch.<factory>(...)`` call in ``path``
    whose ``device=`` is missing or the literal ``"cpu"``."""
    found: list[tuple[str, str, int, bool]] = []
    scope: list[str] = []

    class Visitor(ast.NodeVisitor):
        def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
            scope.append(node.name)
            self.generic_visit(node)
            scope.pop()

        visit_AsyncFunctionDef = visit_ClassDef = visit_FunctionDef  # type: ignore[assignment]

        def visit_Call(self, node: ast.Call) -> None:
            func = node.func
            if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "torch"
                    and func.attr in FACTORIES | {"from_numpy"}):
                device = next((k.value for k in node.keywords if k.arg == "device"), None)
                explicit_cpu = isinstance(device, ast.Constant) and device.value == "cpu"
                if device is None or explicit_cpu or func.attr == "from_numpy":
                    found.append((".".join(scope), func.attr, node.lineno, explicit_cpu))
            self.generic_visit(node)

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def test_tensor_factories_in_the_step_packages_name_their_device():
    # catches: torch.tensor(...)/torch.zeros(...) without device= in hkd/train, models, teachers or plugins (the
    # uld stage's metric, stacked by the loop with device tensors, crashed every GPU run at step 1)
    unlisted, seen = [], set()
    for package in STEP_PACKAGES:
        for path in sorted((HKD / package).rglob("*.py")):
            relative = path.relative_to(HKD).as_posix()
            for function, factory, line, _ in factory_calls(path):
                key = (relative, function, factory)
                seen.add(key)
                if key not in CPU_SITES and (relative, "*", "*") not in CPU_SITES:
                    unlisted.append(f"hkd/{relative}:{line} torch.{factory} in {function or '<module>'}")
    assert not unlisted, ("tensor factories without device= (use the inputs' device, or list a justified CPU "
                          "site in CPU_SITES):\n" + "\n".join(unlisted))
    stale = sorted(key for key in set(CPU_SITES) - seen if (HKD / key[0]).is_file() and key[1] != "*")
    assert not stale, f"CPU_SITES lists sites that no longer exist: {stale}"


def test_the_static_check_sees_a_cpu_metric():
    # catches: a checker that parses nothing (a wrong path or visitor) and so passes everything
    import textwrap

    source = textwrap.dedent("""
        import torch
        def loss(x):
            return {"metric/a": torch.tensor(1.0), "b": torch.zeros(3, device=x.device), "c": torch.ones(2, device="cpu")}
    """)
    path = Path(sys.modules[__name__].__file__).with_name("_factory_probe.py")  # type: ignore[arg-type]
    try:
        path.write_text(source)
        assert [(f, k, cpu) for f, k, _, cpu in factory_calls(path)] == [("loss", "tensor", False), ("loss", "ones", True)]
    finally:
        path.unlink()


class FactoriesOnMeta(TorchFunctionMode):
    """Tensor factories called without ``device=`` land on ``meta`` (as under ``torch.device("meta")``), and
    the hkd lines that called them are recorded. A meta tensor mixed with the models' real tensors raises."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []
        self.constructors = _device_constructors()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        if func in self.constructors and kwargs.get("device") is None:
            kwargs["device"] = "meta"
            frame = sys._getframe(1)
            while frame is not None and not frame.f_code.co_filename.startswith(str(HKD)):
                frame = frame.f_back  # type: ignore[assignment]
            if frame is not None:
                self.sites.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {func.__name__}")
        return func(*args, **kwargs)


def run_device_part_on_meta(run, step, monkeypatch):  # type: ignore[no-untyped-def]
    """One real step whose device part (forwards, stage losses, gradient sync and clipping) runs under
    :class:`FactoriesOnMeta`; the host part (building batches) runs as usual. Returns the recorded sites."""
    import hkd.train.loop as loop
    from hkd.train.loop import train_step

    probe = FactoriesOnMeta()

    def on_meta(function):  # type: ignore[no-untyped-def]
        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            with probe:
                return function(*args, **kwargs)

        return wrapped

    for name in ("micro_batch_terms", "sync_gradients", "clip_gradients"):
        monkeypatch.setattr(loop, name, on_meta(getattr(loop, name)))
    metrics = train_step(run, step)
    monkeypatch.undo()
    return probe.sites, metrics


def test_the_meta_probe_catches_a_cpu_tensor_mixed_into_the_step(raw_config, tmp_path, monkeypatch):
    # catches: a dynamic check that cannot fail (the uld stage's old metric, torch.tensor(x) without device, put back)
    from hkd.plugins import hidden
    from hkd.train.loop import build_run

    raw = scenario_config("hidden", tmp_path, steps=1)
    run = build_run(from_dict(Config, raw), tmp_path / "run")
    original = hidden.HiddenStage.loss

    def with_cpu_metric(self, batch, teacher, student, state):  # type: ignore[no-untyped-def]
        terms = original(self, batch, teacher, student, state)
        return terms | {"metric/cpu": torch.tensor(0.5)}

    monkeypatch.setattr(hidden.HiddenStage, "loss", with_cpu_metric)
    with pytest.raises(Exception, match="meta"):
        run_device_part_on_meta(run, 0, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_a_step_of_every_stage_makes_no_tensor_off_the_models_device(scenario, tmp_path, monkeypatch):
    # catches: a stage, teacher source or the loop creating a CPU tensor inside the step that meets device
    # tensors (a crash or a hidden copy on a GPU), e.g. the uld stage's metric or the mlm stage's masks
    from hkd.train.loop import build_run

    raw = scenario_config(scenario, tmp_path, steps=2)
    run = build_run(from_dict(Config, raw), tmp_path / "run")
    sites, metrics = run_device_part_on_meta(run, 0, monkeypatch)
    assert not sites, "factory calls without device= inside the step:\n" + "\n".join(sites)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if k.startswith("loss"))


def test_the_logits_stage_hands_the_kernels_the_models_tensors_without_copies(monkeypatch):
    # catches: logits[:, :-1] (reshaped by the kernels: a copy of [tokens, vocab] per model and micro-batch) or a
    # boolean-mask selection of the target rows (a host sync) coming back into the logits stage
    import hkd.kernels
    from hkd.models.taps import forward_with_taps
    from hkd.plugin.stage import StepState
    from hkd.plugins.logits import LogitsStage, LogitsStageConfig
    from tests.plugins.helpers import batch, context, models

    teacher, student = models()
    b = batch()
    tokens = int(b["loss_mask"].sum())
    for fused in (False, True):
        stage = LogitsStage(LogitsStageConfig(alpha=0.2, fused=fused), context(teacher, student, "logits"))
        with torch.no_grad():
            t_view = forward_with_taps(teacher, b, stage.teacher_request())
        s_view = forward_with_taps(student, b, stage.student_request())
        seen: dict[str, torch.Tensor] = {}
        op = "fused_linear_distill_loss" if fused else "distill_loss"
        original = getattr(hkd.kernels, op)

        def spy(*args, _original=original, **kwargs):  # type: ignore[no-untyped-def]
            seen["student"], seen["teacher"] = args[0], args[2 if fused else 1]
            return _original(*args, **kwargs)

        monkeypatch.setattr(hkd.kernels, op, spy)
        got = stage.loss(b, t_view, s_view, StepState(step=0, temperature=2.0, tokens=tokens))["logits"]
        monkeypatch.undo()
        s_whole = s_view.final_hidden if fused else s_view.logits
        t_whole = t_view.final_hidden if fused else t_view.logits
        for mine, whole in ((seen["student"], s_whole), (seen["teacher"], t_whole)):
            assert mine.data_ptr() == whole.data_ptr() and mine.shape == whole.shape and mine.is_contiguous()
        with torch.no_grad():
            expected = hkd.kernels.distill_loss(student.lm_head(s_view.final_hidden)[:, :-1] if fused else
                                                s_view.logits[:, :-1], t_view.logits[:, :-1] if not fused else
                                                teacher.lm_head(t_view.final_hidden)[:, :-1],
                                                labels=b["labels"][:, 1:], temperature=2.0, alpha=0.2,
                                                reduction="sum") / tokens
        torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)


SYNC_FREE = ["attention", "hidden", "logits", "logits_fused", "sft", "teacher_cache", "teachers", "uld", "mlm",
             "sentence"]  # the samplers (onpolicy, rl) decode token by token, reading each token on the host


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA: torch.cuda.set_sync_debug_mode('error') raises on a host sync only on a "
                           "CUDA device; on the CPU, tests/test_contract.py counts the host reads instead")
@pytest.mark.parametrize("scenario", SYNC_FREE)
def test_the_device_part_of_a_step_never_syncs_on_cuda(scenario, tmp_path, monkeypatch):
    # catches: any host sync inside the step on a GPU (item/tolist, nonzero, boolean masks, a copy from pageable
    # memory, a blocking host-to-device copy of a batch) -- the one read per step is made after this part
    import hkd.train.loop as loop
    from hkd.train.loop import build_run, train_step

    raw = scenario_config(scenario, tmp_path, steps=3, device="cuda", precision="bf16-mixed")
    run = build_run(from_dict(Config, raw), tmp_path / "run")
    train_step(run, 0)  # first calls: lazy initialisation, kernel compilation

    def strict(function):  # type: ignore[no-untyped-def]
        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            torch.cuda.set_sync_debug_mode("error")
            try:
                return function(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return wrapped

    for name in ("micro_batch_terms", "sync_gradients", "clip_gradients"):
        monkeypatch.setattr(loop, name, strict(getattr(loop, name)))
    for step in (1, 2):
        metrics = train_step(run, step)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if k.startswith("loss"))
