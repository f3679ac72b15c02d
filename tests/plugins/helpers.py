"""Build a stage directly (no loop) on tiny models, for stage-level tests."""

from __future__ import annotations

import torch

from hkd.data.encoding import collate, encode
from hkd.models.loading import build_preset, char_tokenizer
from hkd.plugin.stage import StageContext, StepState
from hkd.models.taps import enable_taps, forward_with_taps


def models(teacher_overrides=None, student_overrides=None, same=False):
    teacher = build_preset("tiny-llama", {"num_hidden_layers": 4, **(teacher_overrides or {})}, seed=1).eval()
    student = teacher if same else build_preset("tiny-llama", {"num_hidden_layers": 2, **(student_overrides or {})}, seed=2)
    enable_taps(teacher)
    enable_taps(student)
    return teacher, student


def batch(texts=("12+34=", "7+8="), completions=("46", "15 ok")):
    tok = char_tokenizer()
    return collate([encode(tok, p, c, 32) for p, c in zip(texts, completions)], tok.pad_token_id)


def run_stage(stage, teacher, student, b, temperature=1.0):
    with torch.no_grad():
        t_view = forward_with_taps(teacher, b, stage.teacher_request())
    s_view = forward_with_taps(student, b, stage.student_request())
    tokens = int(b["loss_mask"].sum())
    return stage.loss(b, t_view, s_view, StepState(step=0, temperature=temperature, tokens=tokens))


def context(teacher, student, name="x"):
    return StageContext(name, teacher, student, {}, f"stages.{name}")
