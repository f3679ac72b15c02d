"""An example third-party hkd plugin.

Stage ``final_cosine``: 1 - cosine similarity between the student's and the teacher's final
hidden states (the LM-head inputs), through a learned projector when widths differ. The
whole stage is a config dataclass, a Stage subclass and one hook.

Verifier ``length_limit`` (in :mod:`hkd_example_plugin.verifiers`): its hook is imported
here because hkd registers this module, the entry point's target, as the plugin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from hkd import ModelView, Stage, StageContext, StageSpec, StepState, TapRequest, hookimpl
from hkd_example_plugin.verifiers import hkd_add_verifiers  # noqa: F401  (registered with this module)


@dataclass
class FinalCosineConfig:
    eps: float = 1e-8


class FinalCosineStage(Stage):
    def __init__(self, config: FinalCosineConfig, context: StageContext) -> None:
        super().__init__()
        self.config = config
        self.projector = nn.Linear(context.student.config.hidden_size, context.teacher.config.hidden_size, bias=False)

    def teacher_request(self) -> TapRequest:
        return TapRequest(final_hidden=True)

    def student_request(self) -> TapRequest:
        return TapRequest(final_hidden=True)

    def loss(self, batch: dict[str, Tensor], teacher: ModelView | None, student: ModelView | None,
             state: StepState) -> dict[str, Tensor]:
        assert teacher is not None and student is not None
        assert teacher.final_hidden is not None and student.final_hidden is not None
        projected = self.projector(student.final_hidden.float())
        per_token = 1 - F.cosine_similarity(projected, teacher.final_hidden.float(), dim=-1, eps=self.config.eps)
        return {"final_cosine": (per_token * batch["loss_mask"]).sum() / max(state.tokens, 1)}


@hookimpl
def hkd_add_stages() -> list[StageSpec]:
    return [StageSpec("final_cosine", FinalCosineConfig, FinalCosineStage, "cosine between final hidden states", "feature")]
