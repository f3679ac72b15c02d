import pytest
import torch

from hkd.config import ConfigError
from hkd.layermap import LayerMapConfig
from hkd.divergence import kl_divergence
from hkd.plugins.attention import AttentionStage, AttentionStageConfig

from .helpers import batch, context, models, run_stage


@pytest.mark.parametrize("mode", ["maps", "relations"])
def test_identical_models_have_zero_loss(mode):
    teacher, student = models(same=True)
    stage = AttentionStage(AttentionStageConfig(mode=mode, value_relation=True, relation_heads=2), context(teacher, student))
    loss = run_stage(stage, teacher, student, batch())["attention"]
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_head_mismatch_is_averaged_and_trains_the_student():
    teacher, student = models({"num_attention_heads": 4, "num_key_value_heads": 2}, {"num_attention_heads": 2, "num_key_value_heads": 1})
    stage = AttentionStage(AttentionStageConfig(mode="maps"), context(teacher, student))
    assert not stage.per_head and stage.layer_map == [(1, 2), (2, 4)]
    loss = run_stage(stage, teacher, student, batch())["attention"]
    assert loss.item() > 0
    loss.backward()
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert teacher.model.layers[0].self_attn.q_proj.weight.grad is None


def test_relations_work_across_head_counts_and_gqa():
    teacher, student = models({"num_attention_heads": 4, "num_key_value_heads": 2}, {"num_attention_heads": 2, "num_key_value_heads": 1})
    stage = AttentionStage(AttentionStageConfig(mode="relations", relation_heads=2), context(teacher, student))
    assert run_stage(stage, teacher, student, batch())["attention"].item() > 0


def test_loss_value_matches_a_hand_computed_kl_on_one_layer():
    teacher, student = models({"num_attention_heads": 4}, {"num_attention_heads": 4, "num_key_value_heads": 2})
    cfg = AttentionStageConfig(layer_map=LayerMapConfig("explicit", [[2, 4]]))
    stage = AttentionStage(cfg, context(teacher, student))
    b = batch()
    loss = run_stage(stage, teacher, student, b)["attention"]
    teacher.set_attn_implementation("eager")
    student.set_attn_implementation("eager")
    pt = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_attentions=True).attentions[3]
    ps = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_attentions=True).attentions[1]
    kl = (pt * (pt.clamp_min(1e-30).log() - ps.clamp_min(1e-30).log())).sum(-1).mean(1)  # [B, S]
    expected = (kl * b["loss_mask"]).sum() / b["loss_mask"].sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_row_kl_ignores_zero_mass_keys():
    t = torch.tensor([[0.5, 0.5, 0.0]]).log()
    s = torch.tensor([[0.25, 0.25, 0.5]]).log()
    assert kl_divergence(t, s).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())


def test_config_errors_name_the_key():
    teacher, student = models({"num_attention_heads": 4}, {"num_attention_heads": 2, "num_key_value_heads": 1})
    with pytest.raises(ConfigError, match=r"stages\.x\.heads: per_head needs equal head counts"):
        AttentionStage(AttentionStageConfig(heads="per_head"), context(teacher, student))
    with pytest.raises(ConfigError, match=r"stages\.x\.layer_map: student layer 3 is out of range"):
        AttentionStage(AttentionStageConfig(layer_map=LayerMapConfig("explicit", [[3, 1]])), context(teacher, student))
    with pytest.raises(ConfigError, match=r"stages\.x\.relation_heads: 3 does not divide"):
        AttentionStage(AttentionStageConfig(mode="relations", relation_heads=3), context(teacher, student))
