"""Decision stage across tokenizers: Universal Logit Distillation with character-offset span alignment.

The teacher and the student may use different tokenizers (different vocabularies). The
batch is the student's tokenization; for each row the stage recovers the text (prompt and
completion separately) with the student's tokenizer, encodes it with the teacher's
(:func:`hkd.data.tokenalign.retokenize`), runs the teacher itself under ``no_grad`` (like the RL
stage runs its own forwards; it asks the loop for no teacher view) and compares, for every
student target token that starts a span both tokenizations share, the two predictions made
from the same text:

    loss = (1 - alpha) * T^2 * sum_pairs D(p_teacher_T, q_student_T) + alpha * CE(student, labels)

divided by the step's target-token count. ``D`` (:func:`hkd.data.tokenalign.cross_vocab_distance`)
compares shared vocabulary entries directly (generalized KL, or L1) and the rest by ULD
(sorted-probability Wasserstein distance); ``shared: none`` is pure ULD; ``shared: first_char``
compares next-first-character probabilities instead of shared entries (see :mod:`hkd.data.tokenalign`). With the same
tokenizer on both sides and ``shared: kl`` this is the ``logits`` stage's forward KL.

The stage declares ``cross_tokenizer=True`` on its spec: a schedule whose stages all do may
pair models with different vocabularies (:func:`hkd.models.loading.check_compatible`). Hidden-state
and attention stages compare positions one to one and stay refused across tokenizers.
Needs a live teacher (not ``teacher_cache``) and data without a chat template (the text
must be recoverable from the student's tokens). Logged: ``metric/uld_aligned``, the share of
target tokens whose prediction met a teacher prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from hkd import ConfigError
from hkd import HkdError
from hkd import hookimpl
from hkd import Stage, StageContext, StageSpec, StepState
from hkd import Retokenized, VocabMatch, cross_vocab_distance, retokenize
from hkd import ModelView, TapRequest
from hkd import IGNORE_INDEX, next_token_labels
from hkd import ranged

CACHE_ROWS = 200_000  # re-tokenized rows kept (a few hundred bytes each)


@dataclass
class UldStageConfig:
    teacher_tokenizer: str | None = None  # tokenizer directory; default: the teacher model's directory
    # shared vocabulary entries: generalized KL, L1, ULD like the rest (none), or first-character sums (first_char)
    shared: Literal["kl", "l1", "none", "first_char"] = "kl"
    alpha: float = ranged(0.0, low=0, high=1)  # weight of the hard-label cross-entropy on every student target token
    scale_t2: bool = True  # multiply the soft loss by T^2


class UldStage(Stage):
    def __init__(self, config: UldStageConfig, context: StageContext) -> None:
        super().__init__()
        where = context.config_path
        if not 0.0 <= config.alpha <= 1.0:
            raise ConfigError(f"{where}.alpha: must be in [0, 1], got {config.alpha}")
        teacher = context.teacher
        if teacher is None or not getattr(context, "teacher_live", True) or any(p.is_meta for p in teacher.parameters()):
            raise ConfigError(f"{where}: the uld stage runs the teacher on its own tokenization of each batch and "
                              "needs a live teacher (not teacher_cache)")
        for role, model in (("teacher", teacher), ("student", context.student)):
            if getattr(model, "lm_head", None) is None:
                raise ConfigError(f"{where}: the {role} has no LM head (an encoder?); disable this stage")
        self.config = config
        from hkd import load_tokenizer  # transformers: imported when the stage is built, not by `hkd stages`

        self.student_tok: Any = context.tokenizer or load_tokenizer(Path(str(context.student.config.name_or_path)))
        teacher_dir = Path(config.teacher_tokenizer or str(teacher.config.name_or_path))
        self.teacher_tok: Any = load_tokenizer(teacher_dir)
        if self.student_tok is None or self.teacher_tok is None:
            missing = "student" if self.student_tok is None else f"teacher ({str(teacher_dir)!r})"
            raise HkdError(f"{where}: the uld stage needs both tokenizers; the {missing} has none "
                           f"(set {where}.teacher_tokenizer to a tokenizer directory)")
        self.match = VocabMatch.build(self.student_tok, self.teacher_tok)
        # a row's re-tokenization depends only on its tokens; data repeats every epoch
        self._retokenized: dict[tuple[int, ...], Retokenized] = {}
        self._models: dict[str, Any] = {"teacher": teacher}  # not a submodule: the loop owns it

    def student_request(self) -> TapRequest:
        return TapRequest(logits=True)

    def teacher_batch(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[list[tuple[int, int]]]]:
        """The batch's text in the teacher's tokenization (right-padded) and each row's aligned position pairs."""
        rows, pairs = [], []
        for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                     batch["attention_mask"].tolist()):
            length = sum(mask)
            key = tuple(ids[:length] + [-1] + labels[:length])
            encoded = self._retokenized.get(key)
            if encoded is None:
                encoded = retokenize(ids[:length], labels[:length], self.student_tok, self.teacher_tok)
                if len(self._retokenized) < CACHE_ROWS:
                    self._retokenized[key] = encoded
            rows.append(encoded.teacher_ids)
            pairs.append(encoded.pairs)
        width = max(len(r) for r in rows)
        pad = self.teacher_tok.pad_token_id or 0
        device = batch["input_ids"].device
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[r, : len(row)] = 1
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}, pairs

    def loss(self, batch: dict[str, Tensor], teacher: ModelView | None, student: ModelView | None,
             state: StepState) -> dict[str, Tensor]:
        assert student is not None and student.logits is not None
        student_logits = student.logits
        teacher_inputs, pairs = self.teacher_batch(batch)
        with torch.no_grad():
            teacher_logits = self._models["teacher"](**teacher_inputs).logits
        rows = torch.tensor([r for r, row in enumerate(pairs) for _ in row], dtype=torch.long)
        s_pos = torch.tensor([s for row in pairs for s, _ in row], dtype=torch.long)
        t_pos = torch.tensor([t for row in pairs for _, t in row], dtype=torch.long)
        temperature = state.temperature
        scale = temperature**2 if self.config.scale_t2 else 1.0
        soft = cross_vocab_distance(student_logits[rows, s_pos], teacher_logits[rows, t_pos], self.match,
                                    temperature, self.config.shared).sum() * scale
        labels = next_token_labels(batch["labels"])
        hard = F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
        alpha = self.config.alpha
        targets = max(int((labels != -100).sum()), 1)
        return {
            "uld": ((1 - alpha) * soft + alpha * hard) / max(state.tokens, 1),  # 0 targets: 0, not nan
            "metric/uld_aligned": torch.tensor(len(s_pos) / targets),
        }


@hookimpl
def hkd_add_stages() -> list[StageSpec]:
    return [StageSpec("uld", UldStageConfig, UldStage, "logits KD across tokenizers: span alignment + shared-entry "
                      "KL + Universal Logit Distillation", "decision", cross_tokenizer=True)]
