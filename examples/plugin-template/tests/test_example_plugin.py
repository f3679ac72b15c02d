"""Tests of the example plugin, run against an installed copy (``pip install ./examples/plugin-template``).

They check what a plugin author must get right: hkd finds the package through its entry
point, the stage computes the documented loss, and the verifier passes, rejects and
complains about bad options as it says.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hkd import ConfigError, StageContext, StepState, TapRequest, build_manager, build_verifier
from hkd.models.loading import build_preset
from hkd.models.taps import forward_with_taps
from hkd.plugin.stage import build_stages
from hkd.sampling.verify import available_verifiers

from hkd_example_plugin import FinalCosineConfig, FinalCosineStage


def test_hkd_finds_the_plugin_through_its_entry_point():
    pm = build_manager()
    info = {i.name: i for i in pm.infos()}["example"]
    assert info.module == "hkd_example_plugin" and info.stages == ("final_cosine",)
    assert info.distribution == "hkd-example-plugin 0.1.0"
    assert "length_limit" in available_verifiers(pm)


def test_final_cosine_matches_a_hand_computed_reference():
    teacher = build_preset("tiny-llama", {"num_hidden_layers": 2, "hidden_size": 64}, seed=1).eval()
    student = build_preset("tiny-llama", {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                                          "num_attention_heads": 2, "num_key_value_heads": 1}, seed=2)
    context = StageContext("final_cosine", teacher, student, {}, "stages.final_cosine")
    stage = build_stages(build_manager(), ["final_cosine"], {}, lambda name: context)["final_cosine"]
    ids = torch.tensor([[5, 17, 42, 9, 3], [8, 8, 30, 2, 0]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.tensor([[0, 1, 1, 1, 1]] * 2)}
    with torch.no_grad():
        teacher_view = forward_with_taps(teacher, batch, TapRequest(final_hidden=True))
    student_view = forward_with_taps(student, batch, TapRequest(final_hidden=True))
    loss = stage.loss(batch, teacher_view, student_view, StepState(step=0, temperature=1.0, tokens=8))["final_cosine"]
    cos = F.cosine_similarity(stage.projector(student_view.final_hidden), teacher_view.final_hidden, dim=-1)
    assert loss.item() == pytest.approx(((1 - cos) * batch["loss_mask"]).sum().item() / 8, rel=1e-6)
    loss.backward()
    assert stage.projector.weight.grad is not None and stage.projector.weight.grad.abs().sum() > 0


def test_identical_final_states_give_zero_loss():
    model = build_preset("tiny-llama", {"num_hidden_layers": 1}, seed=3).eval()
    stage = FinalCosineStage(FinalCosineConfig(), StageContext("final_cosine", model, model, {}, "stages.final_cosine"))
    with torch.no_grad():
        stage.projector.weight.copy_(torch.eye(model.config.hidden_size))
    ids = torch.tensor([[5, 17, 42, 9]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    view = forward_with_taps(model, batch, TapRequest(final_hidden=True))
    loss = stage.loss(batch, view, view, StepState(step=0, temperature=1.0, tokens=4))["final_cosine"]
    assert abs(loss.item()) < 1e-6


def test_length_limit_passes_short_and_rejects_long_completions():
    verify = build_verifier(build_manager(), "length_limit", {"max_chars": 10})
    assert verify({"prompt": "1+1="}, "  => 2  \n").passed  # surrounding whitespace does not count
    verdict = verify({"prompt": "1+1="}, "1+1+0=2 c0; => 2")
    assert (verdict.passed, verdict.score, verdict.reason) == (False, 0.0, "too_long")


@pytest.mark.parametrize("options, message", [
    ({"max_chars": 0}, "max_chars must be a positive integer, got 0"),
    ({"max_words": 5}, "bad options for verifier 'length_limit'"),
])
def test_length_limit_names_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        build_verifier(build_manager(), "length_limit", options, where="verifiers[0]")
