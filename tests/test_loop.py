"""End to end: tiny teacher -> tiny student through all three stages."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hkd.config import Config, from_dict
from hkd.errors import HkdError
from hkd.train.loop import distill
from hkd.plugin.manager import build_manager
from hkd.plugin.hookspecs import hookimpl


def run(raw, path, **kwargs):
    return distill(from_dict(Config, raw), path, **kwargs)


def test_three_phase_run_writes_metrics_checkpoints_and_a_loadable_student(raw_config, tmp_path):
    raw_config["train"]["checkpoint_every"] = 2
    raw_config["train"]["keep_checkpoints"] = 2
    result = run(raw_config, tmp_path / "run")
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4, 5, 6]
    assert [l["phase"] for l in lines] == [0, 0, 1, 1, 2, 2]
    assert set(lines[0]) >= {"loss", "loss/attention", "weight/attention", "temperature", "lr", "tokens_per_s"}
    assert "loss/logits" in lines[-1] and "loss/attention" not in lines[-1]
    # ramp_steps=1: the first step of phase 2 is halfway between the phases' weights
    assert lines[2]["weight/attention"] == pytest.approx(0.75) and lines[2]["weight/hidden"] == pytest.approx(0.5)
    # catches: a logged total that is not the weighted sum of the logged stage losses (a stage's loss
    # dropped or counted twice, weights applied to the log but not the total; was finiteness only)
    for l in lines:
        stages = [k.removeprefix("weight/") for k in l if k.startswith("weight/") and l[k] > 0]
        assert stages and all(f"loss/{k}" in l for k in stages), l
        assert l["loss"] == pytest.approx(sum(l[f"weight/{k}"] * l[f"loss/{k}"] for k in stages), rel=1e-5)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-00000004", "step-00000006"]  # keep the last 2
    student = AutoModelForCausalLM.from_pretrained(result.final_dir)
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000006" / "student.safetensors"))
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight, saved["model.layers.0.mlp.up_proj.weight"])
    # hidden-stage projectors were trained and checkpointed
    stages = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000006" / "stages.safetensors"))
    assert any(k.startswith("hidden.projectors.") for k in stages)


def test_resume_ends_with_the_same_parameters_as_an_uninterrupted_run(raw_config, tmp_path):
    full = run(raw_config, tmp_path / "full")
    raw_config["train"]["checkpoint_every"] = 3
    short = dict(raw_config, schedule=raw_config["schedule"])

    class StopAfter3:
        @hookimpl
        def hkd_on_checkpoint(self, step):
            if step == 3:
                raise KeyboardInterrupt  # a crash right after the step-3 checkpoint

    with pytest.raises(KeyboardInterrupt):
        run(short, tmp_path / "resumed", pm=build_manager(extra_plugins=[("stop", StopAfter3())]))
    resumed = run(raw_config, tmp_path / "resumed", resume=True)
    a = AutoModelForCausalLM.from_pretrained(full.final_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed.final_dir).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4, 5, 6]


def test_resume_without_checkpoint_is_an_error(raw_config, tmp_path):
    with pytest.raises(HkdError, match=r"--resume: no checkpoint in"):
        run(raw_config, tmp_path / "empty", resume=True)


def test_teacher_is_not_run_when_no_active_stage_needs_it(raw_config, tmp_path, monkeypatch):
    import hkd.train.run as loop  # the student forward lives with the step helpers
    import hkd.teachers.sources as sources

    calls = []
    original = loop.forward_with_taps
    for module in (loop, sources):  # the student's forward and the live teacher's
        monkeypatch.setattr(module, "forward_with_taps",
                            lambda m, b, r: calls.append(m.config.hidden_size) or original(m, b, r))
    raw_config["schedule"] = {"phases": [{"name": "p", "steps": 1, "stages": {"hidden": 0.0, "logits": 1.0}}]}
    run(raw_config, tmp_path / "a")
    assert sorted(set(calls)) == [32, 64]  # both models ran for the logits stage
    calls.clear()
    raw_config["schedule"]["phases"].append({"name": "off", "steps": 1, "stages": {"logits": 0.0, "hidden": 0.0}})
    run(raw_config, tmp_path / "b")
    assert calls.count(64) == 2  # 2 micro-batches in step 1; none in the phase where nothing is active


def test_gradient_accumulation_matches_one_big_batch(raw_config, tmp_path):
    """Normalising by the step's token count makes 2x4 accumulated == 1x8 in one batch."""
    raw_config["schedule"] = {"phases": [{"name": "p", "steps": 1, "stages": {"hidden": 1.0, "logits": 1.0}}]}
    raw_config["data"]["shuffle"] = False
    raw_config["optim"].update(grad_accum=2, grad_clip=0.0)
    raw_config["data"]["batch_size"] = 4
    a = run(raw_config, tmp_path / "a")
    raw_config["optim"]["grad_accum"] = 1
    raw_config["data"]["batch_size"] = 8
    b = run(raw_config, tmp_path / "b")
    assert a.last_metrics["tokens"] == b.last_metrics["tokens"]
    sa = AutoModelForCausalLM.from_pretrained(a.final_dir).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(b.final_dir).state_dict()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-4, atol=1e-6)


class NanStage:
    """A plugin whose stage yields NaN from step 2 on (step 1 trains normally)."""

    @hookimpl
    def hkd_add_stages(self):
        from dataclasses import dataclass

        from hkd.plugin.stage import Stage, StageSpec
        from hkd.models.taps import TapRequest

        @dataclass
        class Empty:
            pass

        class Nan(Stage):
            def __init__(self, config, context):
                super().__init__()
                self.scale = torch.nn.Parameter(torch.ones(()))

            def student_request(self):
                return TapRequest(final_hidden=True)

            def loss(self, batch, teacher, student, state):
                value = student.final_hidden.float().pow(2).mean() * self.scale
                return {"nan": value * (float("nan") if state.step >= 1 else 1.0)}

        return [StageSpec("nan", Empty, Nan)]


def test_non_finite_losses_skip_steps_then_abort(raw_config, tmp_path):
    raw_config["schedule"] = {"phases": [{"name": "p", "steps": 5, "stages": {"nan": 1.0}}]}
    raw_config["train"]["max_nonfinite_steps"] = 2
    pm = build_manager(extra_plugins=[("nan", NanStage())])
    with pytest.raises(HkdError, match=r"2 non-finite steps in a row \(last from stage\(s\) \['nan'\]\) at step 3"):
        run(raw_config, tmp_path / "nan", pm=pm)
    lines = [json.loads(l) for l in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["loss"] > 0  # step 1 trained and was logged, step 2 was skipped


def test_encoder_models_use_structural_and_feature_stages(raw_config, tmp_path):
    bert = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
    raw_config["teacher"] = {"preset": "tiny-bert", "encoder": True}
    raw_config["student"] = {"preset": "tiny-bert", "encoder": True, "preset_overrides": bert}
    raw_config["schedule"] = {"phases": [{"name": "p", "steps": 2, "stages": {"attention": 1.0, "hidden": 1.0}}]}
    raw_config["stages"] = {"attention": {"mode": "relations", "relation_heads": 2}}
    result = run(raw_config, tmp_path / "bert")
    assert result.last_metrics["loss/attention"] > 0 and result.last_metrics["loss/hidden"] > 0
    raw_config["schedule"]["phases"][0]["stages"] = {"logits": 1.0}
    with pytest.raises(HkdError, match=r"stages\.logits: the teacher has no LM head"):
        run(raw_config, tmp_path / "bert2")
