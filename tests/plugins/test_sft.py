"""SFT stage: plain cross-entropy on the labels, and no teacher forward at all."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hkd.config import ConfigError
from hkd.plugins.sft import SftStage, SftStageConfig
from hkd.plugin.stage import StepState
from hkd.models.taps import forward_with_taps
from tests.plugins.helpers import batch, context, models


def test_sft_is_token_mean_cross_entropy_and_asks_nothing_of_the_teacher():
    teacher, student = models()
    stage = SftStage(SftStageConfig(), context(teacher, student, "sft"))
    assert stage.teacher_request().empty()  # the loop skips the teacher forward
    b = batch()
    view = forward_with_taps(student, b, stage.student_request())
    tokens = int(b["loss_mask"].sum())
    loss = stage.loss(b, None, view, StepState(step=0, temperature=1.0, tokens=tokens))["sft"]
    logits, labels = view.logits[:, :-1], b["labels"][:, 1:]
    reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(loss.double(), reference, atol=1e-6)
    # normalised by the step's token count: twice the tokens (two micro-batches) halves each one's share
    half = stage.loss(b, None, view, StepState(step=0, temperature=1.0, tokens=2 * tokens))["sft"]
    assert torch.allclose(half, loss / 2)


def test_bad_label_smoothing_names_the_key():
    teacher, student = models()
    with pytest.raises(ConfigError, match=r"stages.sft.label_smoothing"):
        SftStage(SftStageConfig(label_smoothing=1.5), context(teacher, student, "sft"))
