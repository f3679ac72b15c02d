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
from hkd import to_device

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

    def teacher_batch(self, batch: dict[str, Tensor], host: dict[str, Tensor] | None = None) \
            -> tuple[dict[str, Tensor], list[list[tuple[int, int]]]]:
        """The batch's text in the teacher's tokenization (right-padded) and each row's aligned position pairs.

        ``host``: the same micro-batch as the loop built it on the host (``StepState.host_batch``); its
        tokens are read there, so a batch on an accelerator is never copied back."""
        source = host if host is not None else batch
        rows, pairs = [], []
        for ids, labels, mask in zip(source["input_ids"].tolist(), source["labels"].tolist(),
                                     source["attention_mask"].tolist()):
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
        # built on the host from Python lists, then copied once (nothing here waits for the device)
        input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], dtype=torch.long, device="cpu")
        attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], dtype=torch.long,
                                      device="cpu")
        return {"input_ids": to_device(input_ids, device), "attention_mask": to_device(attention_mask, device)}, pairs

    def loss(self, batch: dict[str, Tensor], teacher: ModelView | None, student: ModelView | None,
             state: StepState) -> dict[str, Tensor]:
        assert student is not None and student.logits is not None
        student_logits = student.logits
        teacher_inputs, pairs = self.teacher_batch(batch, state.host_batch)
        with torch.no_grad():
            teacher_logits = self._models["teacher"](**teacher_inputs).logits
        device = student_logits.device
        # the aligned positions: built on the host, one (pinned, asynchronous on CUDA) copy
        aligned = torch.tensor([[r for r, row in enumerate(pairs) for _ in row], [s for row in pairs for s, _ in row],
                                [t for row in pairs for _, t in row]], dtype=torch.long, device="cpu")
        rows, s_pos, t_pos = to_device(aligned, device).unbind(0)
        temperature = state.temperature
        scale = temperature**2 if self.config.scale_t2 else 1.0
        soft = cross_vocab_distance(student_logits[rows, s_pos], teacher_logits[rows, t_pos], self.match,
                                    temperature, self.config.shared).sum() * scale
        labels = next_token_labels(batch["labels"])
        hard = F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
        alpha = self.config.alpha
        targets = (labels != IGNORE_INDEX).sum().clamp_min(1)  # on the device: the loop reads metrics once per step
        return {
            "uld": ((1 - alpha) * soft + alpha * hard) / max(state.tokens, 1),  # 0 targets: 0, not nan
            "metric/uld_aligned": torch.full((), float(s_pos.numel()), device=device) / targets,
        }


@hookimpl
def hkd_add_stages() -> list[StageSpec]:
    return [StageSpec("uld", UldStageConfig, UldStage, "logits KD across tokenizers: span alignment + shared-entry "
                      "KL + Universal Logit Distillation", "decision", cross_tokenizer=True)]
