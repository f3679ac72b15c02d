"""Decision stage: soft targets with temperature plus hard labels.

``loss = (1 - alpha) * T^2 * D(teacher_T, student_T) + alpha * CE(student, labels)`` per
target token, where D is forward KL, reverse KL or generalized JSD(beta) between the
temperature-softened distributions (see :func:`hkd.kernels.distill_loss`). Position ``i``
predicts token ``i + 1``; label -100 (padding, prompt tokens) is excluded. The per-token sum
is divided by the step's token count across all accumulation micro-batches.

``fused: true`` hands the kernels the final hidden states and the LM-head weights instead
of logits, so neither model ever holds a ``[tokens, vocab]`` logits tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from hkd import kernels
from hkd.config import ConfigError
from hkd.hookspecs import hookimpl
from hkd.stage import Stage, StageContext, StageSpec, StepState
from hkd.taps import ModelView, TapRequest


@dataclass
class LogitsStageConfig:
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = 0.5  # jsd mixing weight
    alpha: float = 0.0  # weight of the hard-label cross-entropy
    scale_t2: bool = True  # multiply the soft loss by T^2 (Hinton) so gradients keep their scale
    fused: bool = False  # LM head fused into the loss kernel: no logits tensor is ever built
    backend: str | None = None  # kernel backend; default: the run's kernels.<op> or "auto"


class LogitsStage(Stage):
    def __init__(self, config: LogitsStageConfig, context: StageContext) -> None:
        super().__init__()
        self.config = config
        for role, model in (("teacher", context.teacher), ("student", context.student)):
            if model is not None and getattr(model, "lm_head", None) is None:
                raise ConfigError(f"{context.config_path}: the {role} has no LM head (an encoder?); disable this stage")
        if not 0.0 <= config.alpha <= 1.0:
            raise ConfigError(f"{context.config_path}.alpha: must be in [0, 1], got {config.alpha}")
        if not 0.0 <= config.beta <= 1.0:
            raise ConfigError(f"{context.config_path}.beta: must be in [0, 1], got {config.beta}")
        self.op = "fused_linear_distill_loss" if config.fused else "distill_loss"
        self.backend = config.backend or context.kernels.get(self.op, "auto")

    def teacher_request(self) -> TapRequest:
        return TapRequest(final_hidden=True) if self.config.fused else TapRequest(logits=True)

    def student_request(self) -> TapRequest:
        return self.teacher_request()

    def loss(self, batch: dict[str, Tensor], teacher: ModelView | None, student: ModelView, state: StepState) -> dict[str, Tensor]:
        assert teacher is not None
        labels = batch["labels"][:, 1:]
        options = dict(
            labels=labels,
            divergence=self.config.divergence,
            beta=self.config.beta,
            temperature=state.temperature,
            scale_t2=self.config.scale_t2,
            alpha=self.config.alpha,
            reduction="sum",
            backend=self.backend,
        )
        if self.config.fused:
            assert student.final_hidden is not None and teacher.final_hidden is not None
            assert student.lm_head is not None and teacher.lm_head is not None
            total = kernels.fused_linear_distill_loss(
                student.final_hidden[:, :-1],
                student.lm_head.weight,
                teacher.final_hidden[:, :-1],
                teacher.lm_head.weight,
                student_bias=getattr(student.lm_head, "bias", None),
                teacher_bias=getattr(teacher.lm_head, "bias", None),
                **options,
            )
        else:
            assert student.logits is not None and teacher.logits is not None
            total = kernels.distill_loss(student.logits[:, :-1], teacher.logits[:, :-1], **options)
        return {"logits": total / max(state.tokens, 1)}


@hookimpl
def hkd_add_stages() -> list[StageSpec]:
    return [StageSpec("logits", LogitsStageConfig, LogitsStage, "soft-target KL/JSD with temperature + hard CE", "decision")]
