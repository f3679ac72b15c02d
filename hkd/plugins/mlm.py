"""Masked-LM logit distillation (DistilBERT's objective) for ``*ForMaskedLM`` teachers and students.

Each micro-batch is masked BERT's way: every real token that is not a special token
(``[CLS]``, ``[SEP]``, padding, ...) is chosen with probability ``mask_rate``; a chosen token
becomes ``[MASK]`` with probability ``mask_token``, a uniformly random vocabulary id with
probability ``random_token`` (Hugging Face's collator convention: any id), and stays itself
otherwise (80/10/10 by default). Both models then read the *masked* sequence, and at the
chosen positions only::

    loss = (1 - alpha) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + alpha * CE(z_s, original token)

through :func:`hkd.kernels.distill_loss` (``alpha``: the MLM hard loss; ``scale_t2: false``
drops the ``T^2``). The masks are a function of ``(seed, step, micro-batch)`` only (the micro-batch
numbered across ranks as one process would), so a resumed run masks exactly as the uninterrupted
one would, and N ranks as one process with N times the micro-batches. The per-position sum is divided
by ``mask_rate`` times the step's real tokens (all micro-batches and ranks), the expected
number of chosen positions up to the special tokens' share: the value reads as a mean per
masked token and accumulated gradients equal one big batch's.

The stage runs both forwards itself on the masked input (the loop's shared forward reads the
unmasked batch, which the hidden and attention stages keep using), so a phase with ``mlm``
and ``hidden`` runs each model twice. It needs the teacher's MLM head: a bare encoder
(``BertModel``, such as all-MiniLM-L6-v2) or an offline cache is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hkd import ConfigError, ModelView, Stage, StageContext, StageSpec, StepState, hookimpl, kernels
from hkd import ranged
from hkd import to_device


@dataclass
class MLMStageConfig:
    mask_rate: float = ranged(0.15, low=0, low_open=True, high=1)  # share of real, non-special tokens chosen as targets
    mask_token: float = ranged(0.8, low=0, high=1)  # of the chosen: replaced by [MASK]
    random_token: float = ranged(0.1, low=0, high=1)  # of the chosen: replaced by a random id (the rest keep their token)
    alpha: float = ranged(0.0, low=0, high=1)  # weight of the MLM hard loss (cross-entropy against the original token)
    scale_t2: bool = True  # multiply the soft loss by T^2 (Hinton) so gradients keep their scale
    seed: int = ranged(0, low=0, high=2**63, high_open=True)  # masks depend on (seed, step, micro-batch, rank) only
    backend: str | None = None  # distill_loss backend; default: the run's kernels.distill_loss or "auto"


def mask_generator(seed: int, step: int, micro_batch: int, rank: int) -> torch.Generator:
    """A CPU generator for one micro-batch's masks; SeedSequence keeps nearby tuples' streams independent."""
    state = np.random.SeedSequence([seed, step, micro_batch, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def mask_tokens(input_ids: Tensor, attention_mask: Tensor, special_ids: Tensor, *, mask_id: int, vocab_size: int,
                rate: float, mask_token: float, random_token: float,
                generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(masked_ids, chosen)``: BERT's 80/10/10 corruption of ``input_ids`` ``[B, S]`` and the bool map of the
    positions that are targets. The random draws depend only on the shape: they are made on the CPU from
    ``generator`` (so the result does not depend on the device) and copied to ``input_ids``' device, where the
    rest happens; the ids are never read back to the host."""
    device, shape = input_ids.device, input_ids.shape
    # host draws from a CPU generator (deterministic on every device), one copy each to the device
    draws = to_device(torch.rand(shape, generator=generator, device="cpu"), device)
    kind = to_device(torch.rand(shape, generator=generator, device="cpu"), device)
    random_ids = to_device(torch.randint(vocab_size, shape, generator=generator, device="cpu"), device)
    candidates = attention_mask.bool() & ~torch.isin(input_ids, special_ids.to(device))
    chosen = candidates & (draws < rate)
    masked = torch.where(chosen & (kind < mask_token), torch.full_like(input_ids, mask_id), input_ids)
    replaced = chosen & (kind >= mask_token) & (kind < mask_token + random_token)
    masked = torch.where(replaced, random_ids, masked)
    return masked, chosen


def is_masked_lm(model: Any) -> bool:
    return type(model).__name__.endswith("ForMaskedLM")


class MLMStage(Stage):
    def __init__(self, config: MLMStageConfig, context: StageContext) -> None:
        super().__init__()
        self.config = config
        where = context.config_path
        if not 0.0 < config.mask_rate <= 1.0:
            raise ConfigError(f"{where}.mask_rate: must be in (0, 1], got {config.mask_rate}")
        if config.mask_token < 0 or config.random_token < 0 or config.mask_token + config.random_token > 1:
            raise ConfigError(f"{where}: mask_token ({config.mask_token}) and random_token ({config.random_token}) "
                              "must be >= 0 and sum to at most 1")
        if not 0.0 <= config.alpha <= 1.0:
            raise ConfigError(f"{where}.alpha: must be in [0, 1], got {config.alpha}")
        if not context.teacher_live:
            raise ConfigError(f"{where}: the teacher comes from an offline teacher_cache, but masked-LM distillation "
                              "runs the teacher on each step's masked input; use a live teacher")
        if len(context.teachers) > 1:
            raise ConfigError(f"{where}: the mlm stage distils from one teacher; the config has {len(context.teachers)}")
        for role, model in (("teacher", context.teacher), ("student", context.student)):
            if not is_masked_lm(model):
                architectures = getattr(getattr(model, "config", None), "architectures", None)
                raise ConfigError(
                    f"{where}: the {role} ({type(model).__name__}, config architectures {architectures}) has no "
                    "masked-LM head; the mlm stage needs *ForMaskedLM models (a checkpoint whose config.json lists "
                    f"e.g. BertForMaskedLM, loaded with {role}.encoder: true), or disable this stage")
        tokenizer = context.tokenizer
        mask_id = getattr(tokenizer, "mask_token_id", None)
        if mask_id is None:
            raise ConfigError(f"{where}: the tokenizer has no mask token ([MASK]); masked-LM distillation needs one")
        self.mask_id = int(mask_id)
        self.vocab_size = int(context.student.config.vocab_size)
        # a buffer (moved with the stage, not saved): compared with the batch's ids on their device
        self.special_ids: Tensor
        self.register_buffer("special_ids", torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long,
                                                         device=next(context.student.parameters()).device),
                             persistent=False)
        self.backend = config.backend or context.kernels.get("distill_loss", "auto")
        kernels.check_request(  # a named backend that cannot serve these options is refused now, not at step 1
            "distill_loss", self.backend, where=where, elsewhere={"temperature": "schedule.temperature"},
            chosen_by=f"{where}.backend" if config.backend else "kernels.distill_loss",
            alpha=config.alpha, scale_t2=config.scale_t2)
        # plain dict: the models are the loop's, not this stage's parameters (checkpoints hold them once)
        self._models: dict[str, Any] = {"teacher": context.teacher, "student": context.student}

    def masked(self, batch: dict[str, Tensor], state: StepState) -> tuple[Tensor, Tensor]:
        """This micro-batch's ``(masked_ids, chosen)``; the same for the same (seed, step, micro-batch, rank)."""
        # the micro-batch numbered as one process would (rank r trains r*A .. r*A+A-1 of the step's W*A), with
        # rank 0's stream: W ranks mask exactly as one process with W*A micro-batches does
        generator = mask_generator(self.config.seed, state.step, state.rank * state.micro_batches + state.micro_batch, 0)
        return mask_tokens(batch["input_ids"], batch["attention_mask"], self.special_ids, mask_id=self.mask_id,
                           vocab_size=self.vocab_size, rate=self.config.mask_rate, mask_token=self.config.mask_token,
                           random_token=self.config.random_token, generator=generator)

    def loss(self, batch: dict[str, Tensor], teacher: ModelView | None, student: ModelView | None,
             state: StepState) -> dict[str, Tensor]:
        masked_ids, chosen = self.masked(batch, state)
        inputs = {"input_ids": masked_ids, "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            teacher_logits = self._models["teacher"](**inputs).logits
        student_logits = self._models["student"](**inputs).logits
        # every position goes in, the ones not chosen with label -100 (counted for nothing): a boolean-mask
        # selection would wait for the device to count the chosen positions
        labels = batch["input_ids"].masked_fill(~chosen, -100)
        total = kernels.distill_loss(student_logits, teacher_logits, labels=labels,
                                     temperature=state.temperature, scale_t2=self.config.scale_t2,
                                     alpha=self.config.alpha, reduction="sum", backend=self.backend)
        return {"mlm": total / (self.config.mask_rate * max(state.tokens, 1))}


@hookimpl
def hkd_add_stages() -> list[StageSpec]:
    return [StageSpec("mlm", MLMStageConfig, MLMStage, "masked-LM soft targets (DistilBERT) + optional MLM loss",
                      "decision")]
