"""Sentence stage: distil the pooled sentence embedding, what a sentence-embedding user keeps.

Each model's last hidden layer ``[B, S, H]`` is pooled per sequence: ``mean`` over the tokens
its ``attention_mask`` marks (special tokens included, as sentence-transformers' mean pooling
does), or ``cls`` (the first token). With ``e_s`` the student's pooled embedding, ``P`` a linear
projector student width -> teacher width (identity when widths match and ``projector: auto``)
and ``e_t`` the teacher's, per sentence:

* ``cosine``: ``1 - cos(P e_s, e_t)``; ``mse``: mean over features of ``(P e_s - e_t)^2``.
* ``similarity`` (weight; 0 = off): the mean over the micro-batch's ``B x B`` pairs of
  ``(cos(e_s_i, e_s_j) - cos(e_t_i, e_t_j))^2``, on the student's own embeddings (no
  projector: similarities are comparable across widths), i.e. the similarity structure
  that the exported model's ``encode()`` shows.

Both are means over sentences (pairs) of the whole optimizer step: every micro-batch has
``data.batch_size`` rows, so a micro-batch's sum is divided by rows x ``grad_accum`` x ranks,
and accumulated gradients equal one big batch's for the per-sentence term (the pair term is
a mean of per-micro-batch means). Packed rows (``data.packing``) hold several sentences and
are refused. The pooling chosen here is the one written to ``final/`` for sentence-transformers
(:mod:`hkd.models.export`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from hkd import ConfigError, HkdError, ModelView, Stage, StageContext, StageSpec, StepState, TapRequest, hookimpl
from hkd import ranged


@dataclass
class SentenceStageConfig:
    pooling: Literal["mean", "cls"] = "mean"  # a sentence's vector from the last hidden layer: mean over the attention mask, or the first token
    loss: Literal["cosine", "mse"] = "cosine"  # between the (projected) student's and the teacher's sentence vectors: 1 - cos, or MSE
    projector: Literal["auto", "linear", "none"] = "auto"  # auto: linear only when widths differ
    similarity: float = ranged(0.0, low=0, high=1e6)  # weight of the in-batch similarity-matrix loss (0: off)


def pool(hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """``[B, H]`` sentence embeddings from ``[B, S, H]`` hidden states (fp32)."""
    hidden = hidden.float()
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


def cosine_matrix(embeddings: Tensor) -> Tensor:
    normed = F.normalize(embeddings, dim=-1)
    return normed @ normed.T


class SentenceStage(Stage):
    def __init__(self, config: SentenceStageConfig, context: StageContext) -> None:
        super().__init__()
        self.config = config
        assert context.teacher is not None
        if not 0.0 <= config.similarity <= 1e6:
            raise ConfigError(f"{context.config_path}.similarity: must be >= 0, got {config.similarity}")
        self.teacher_layer = int(context.teacher.config.num_hidden_layers)
        self.student_layer = int(context.student.config.num_hidden_layers)
        s_width, t_width = context.student.config.hidden_size, context.teacher.config.hidden_size
        if config.projector == "none" and s_width != t_width:
            raise ConfigError(f"{context.config_path}.projector: 'none' needs equal widths, student {s_width} vs "
                              f"teacher {t_width}")
        use_projector = config.projector == "linear" or (config.projector == "auto" and s_width != t_width)
        self.projector = nn.Linear(s_width, t_width, bias=False) if use_projector else None
        self.where = context.config_path
        if getattr(context.data, "packing", False):  # refused before the first step, not at it
            raise ConfigError(f"{self.where}: data.packing puts several sentences in one row, so there is no one "
                              "sentence to pool; set data.packing: false")

    def export_options(self) -> dict[str, Any]:
        return {"pooling": self.config.pooling}  # sentence-transformers pools as this stage trained

    def teacher_request(self) -> TapRequest:
        return TapRequest(hidden={self.teacher_layer})

    def student_request(self) -> TapRequest:
        return TapRequest(hidden={self.student_layer})

    def loss(self, batch: dict[str, Tensor], teacher: ModelView | None, student: ModelView | None,
             state: StepState) -> dict[str, Tensor]:
        if "position_ids" in batch:
            raise HkdError(f"{self.where}: data.packing puts several sentences in one row, so there is no one "
                           "sentence to pool; set data.packing: false")
        assert teacher is not None and student is not None
        assert teacher.hidden_states is not None and student.hidden_states is not None
        t_hidden, s_hidden = teacher.hidden_states[self.teacher_layer], student.hidden_states[self.student_layer]
        assert t_hidden is not None and s_hidden is not None
        mask = batch["attention_mask"]
        t_emb = pool(t_hidden, mask, self.config.pooling)
        s_emb = pool(s_hidden, mask, self.config.pooling)
        mapped = self.projector(s_emb) if self.projector is not None else s_emb
        if self.config.loss == "cosine":
            per_sentence = 1 - F.cosine_similarity(mapped, t_emb, dim=-1)
        else:
            per_sentence = (mapped - t_emb).pow(2).mean(-1)
        shares = state.micro_batches * state.world_size  # micro-batches in the step, all ranks
        terms = {"sentence": per_sentence.sum() / (per_sentence.shape[0] * shares)}
        if self.config.similarity > 0:
            gap = cosine_matrix(s_emb) - cosine_matrix(t_emb)
            terms["similarity"] = self.config.similarity * gap.pow(2).mean() / shares
        return terms


@hookimpl
def hkd_add_stages() -> list[StageSpec]:
    return [StageSpec("sentence", SentenceStageConfig, SentenceStage,
                      "pooled sentence embedding (mean/CLS): cosine/MSE, optional in-batch similarity", "feature")]
