"""Supervised fine-tuning stage: hard cross-entropy on the batch's labels, no teacher.

``loss = sum over target tokens of -log q_s(label)``, divided by the step's token count
(the loop's normalisation contract). It asks nothing of the teacher, so a phase made only of
``sft`` runs no teacher forward at all. That makes plain SFT one more phase of the same
loop: the demo trains its teacher on worked solutions with it, and the answer-only and
SFT-on-distilled-data baselines are ``{sft: 1.0}`` runs on the respective data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from hkd import ConfigError, ModelView, Stage, StageContext, StageSpec, StepState, TapRequest, hookimpl
from hkd import IGNORE_INDEX, next_token_labels
from hkd import ranged


@dataclass
class SftStageConfig:
    label_smoothing: float = ranged(0.0, low=0, high=1, high_open=True)  # label smoothing of the cross-entropy on the target tokens, in [0, 1)


class SftStage(Stage):
    def __init__(self, config: SftStageConfig, context: StageContext) -> None:
        super().__init__()
        if getattr(context.student, "lm_head", None) is None:
            raise ConfigError(f"{context.config_path}: the student has no LM head (an encoder?); disable this stage")
        if not 0.0 <= config.label_smoothing < 1.0:
            raise ConfigError(f"{context.config_path}.label_smoothing: must be in [0, 1), got {config.label_smoothing}")
        self.config = config

    def student_request(self) -> TapRequest:
        return TapRequest(logits=True)

    def loss(self, batch: dict[str, Tensor], teacher: ModelView | None, student: ModelView | None, state: StepState) -> dict[str, Tensor]:
        assert student is not None and student.logits is not None
        logits = student.logits[:, :-1].float()  # position i predicts token i + 1
        labels = next_token_labels(batch["labels"])
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                reduction="sum", label_smoothing=self.config.label_smoothing)
        return {"sft": total / max(state.tokens, 1)}


@hookimpl
def hkd_add_stages() -> list[StageSpec]:
    return [StageSpec("sft", SftStageConfig, SftStage, "cross-entropy on the labels (no teacher forward)", "decision",
                      cross_tokenizer=True)]  # never reads the teacher: any teacher tokenizer will do
