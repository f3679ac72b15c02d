"""The uniform layer map when the student is deeper than its teacher (``init-config`` offers such students)."""

from __future__ import annotations

import pytest
import torch

from hkd.models.layermap import build_layer_map
from hkd.plugins.attention import AttentionStage, AttentionStageConfig
from hkd.plugins.hidden import HiddenStage, HiddenStageConfig
from tests.plugins.helpers import batch, context, models, run_stage


@pytest.mark.parametrize("student,teacher,expected", [
    (8, 2, [1, 1, 1, 1, 2, 2, 2, 2]),  # four student blocks per teacher block
    (3, 2, [1, 2, 2]),
    (5, 4, [1, 2, 3, 4, 4]),
    (4, 4, [1, 2, 3, 4]),  # equal depth: the identity
    (2, 4, [2, 4]),  # shallower student: unchanged TinyBERT mapping
])
def test_uniform_maps_every_student_block_to_its_proportional_teacher_block(student, teacher, expected):
    """Catches: round(s * L_t / L_s) giving teacher layer 0 (out of range for attention) to a deeper student."""
    mapping = build_layer_map("uniform", student, teacher)
    assert mapping == list(zip(range(1, student + 1), expected))
    for s, t in mapping:  # block s ends at depth s/L_s, which lies inside teacher block t
        assert (t - 1) / teacher < s / student <= t / teacher
    assert build_layer_map("uniform", student, teacher, include_embeddings=True)[0] == (0, 0)


@pytest.mark.parametrize("stage_cls,config_cls", [(AttentionStage, AttentionStageConfig), (HiddenStage, HiddenStageConfig)])
def test_stages_train_a_student_deeper_than_its_teacher(stage_cls, config_cls):
    """Catches: the structural and feature stages refusing (ConfigError: teacher layer 0) a deeper student."""
    teacher, student = models({"num_hidden_layers": 2}, {"num_hidden_layers": 4})
    stage = stage_cls(config_cls(), context(teacher, student))
    assert [t for _, t in stage.layer_map if _ > 0] == [1, 1, 2, 2]
    losses = run_stage(stage, teacher, student, batch())
    total = sum(v for k, v in losses.items() if not k.startswith("metric/"))
    assert torch.isfinite(total) and total > 0
    total.backward()
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
