import pytest
import torch
import torch.nn.functional as F

from hkd.config import ConfigError
from hkd.plugins.hidden import HiddenStage, HiddenStageConfig

from .helpers import batch, context, models, run_stage


def test_projectors_exist_only_when_widths_differ():
    teacher, student = models({"hidden_size": 64}, {"hidden_size": 32})
    stage = HiddenStage(HiddenStageConfig(include_embeddings=True), context(teacher, student))
    assert stage.layer_map == [(0, 0), (1, 2), (2, 4)]
    assert set(stage.projectors) == {"0_0", "1_2", "2_4"}
    assert stage.projectors["1_2"].weight.shape == (64, 32)
    same_t, same_s = models(same=True)
    assert len(HiddenStage(HiddenStageConfig(), context(same_t, same_s)).projectors) == 0


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_loss_matches_manual_computation(kind):
    teacher, student = models({"hidden_size": 64}, {"hidden_size": 32})
    stage = HiddenStage(HiddenStageConfig(loss=kind), context(teacher, student))
    b = batch()
    loss = run_stage(stage, teacher, student, b)["hidden"]
    with torch.no_grad():
        hs_t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states
        hs_s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states
        total = 0
        for s, t in stage.layer_map:
            p = stage.projectors[f"{s}_{t}"](hs_s[s])
            per = (p - hs_t[t]).pow(2).mean(-1) if kind == "mse" else 1 - F.cosine_similarity(p, hs_t[t], dim=-1)
            total += (per * b["loss_mask"]).sum() / b["loss_mask"].sum()
    assert loss.item() == pytest.approx(total.item() / 2, rel=1e-5)
    loss.backward()
    assert stage.projectors["1_2"].weight.grad is not None


def test_identical_models_without_projector_give_zero():
    teacher, student = models(same=True)
    stage = HiddenStage(HiddenStageConfig(include_embeddings=True), context(teacher, student))
    assert run_stage(stage, teacher, student, batch())["hidden"].item() == pytest.approx(0.0, abs=1e-7)


def test_projector_none_with_different_widths_is_an_error():
    teacher, student = models({"hidden_size": 64}, {"hidden_size": 32})
    with pytest.raises(ConfigError, match=r"stages\.x\.projector: 'none' needs equal widths, student 32 vs teacher 64"):
        HiddenStage(HiddenStageConfig(projector="none"), context(teacher, student))
