"""On-policy distillation (GKD): the student samples, the teacher scores the same tokens.

Generalized knowledge distillation (Agarwal et al., 2024): training on the data's completions
teaches the student the teacher's distribution on prefixes the *student* will rarely produce
itself; training on its own samples teaches it where it actually goes. Each optimizer step
is one of two kinds, decided by a coin with probability ``lmbda`` (TRL's name for GKD's
``lambda``; a pure function of (seed, step), the same on every rank and after a resume):

* **on-policy** (probability ``lmbda``): the prompts of the step's batch (each row's tokens
  before its last run of targets: a prompt/completion row's prompt, a conversation up to its
  last assistant turn; as token ids, the BOS and a chat template's markers exactly as the data
  encoded them) go to the run's generation backend, and the student samples one
  continuation per prompt (``sample_temperature``, ``top_p``, ``max_new_tokens``; batched with
  the KV cache; it stops at EOS or the chat template's end-of-turn token). Teacher and student
  then run on prompt + sample, and the loss is the per-token divergence on the sampled tokens:

      onpolicy = (1 / (A W)) * mean_{sampled tokens t} c * D(P_teacher,t , P_student,t)

  with ``A`` gradient-accumulation micro-batches and ``W`` data-parallel ranks (each micro-batch
  samples for its own prompts; the loop averages over ranks), ``c = T^2`` with ``scale_t2``.
* **off-policy** (probability ``1 - lmbda``): the same divergence on the data's own completion
  tokens, per token over the step's target tokens (the logits stage's normalisation).

``D`` is any divergence of :func:`hkd.kernels.distill_loss` at the schedule's temperature
``T``: ``reverse_kl`` (the default, mode-seeking, as in MiniLLM/GKD), ``forward_kl``, ``jsd``
with ``beta`` (GKD's generalized JSD), and DistiLLM's ``skew_forward_kl`` / ``skew_reverse_kl``
(``skew``).
No gradient flows through the sampling: the samples are treated as data, as in GKD.

``lmbda: 0`` is supervised KD on the data (the logits stage's soft loss); ``lmbda: 1`` is
pure on-policy distillation. Sampling policy: with ``refresh_every: 1`` (default) the
student samples with its current weights; with ``refresh_every: N`` the samples come from a
frozen copy of the student taken at the start of every step that is a multiple of ``N``,
whatever that step's coin says, so a sample is never more than ``N - 1`` steps old (what a
serving engine that receives new weights every N steps does). That copy is a buffer of this
stage, so checkpoints carry it and a resumed run samples exactly what the uninterrupted run
would have; it costs one student's weights of memory.

Needs a live teacher (not ``teacher_cache``: it scores tokens no cache has seen) and one
tokenizer shared by teacher and student; with several teachers it reads the first.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hkd import ConfigError, HkdError, ModelView, Stage, StageContext, StageSpec, StepState, TapRequest, hookimpl, kernels
from hkd import IGNORE_INDEX, PromptBatch, next_token_labels, output_head
from hkd import derive_seed
from hkd import ranged
from hkd import full_parameter


@dataclass
class OnPolicyStageConfig:
    lmbda: float = ranged(0.5, low=0, high=1)  # probability that a step trains on the student's own samples (GKD's lambda)
    divergence: str = "reverse_kl"  # any divergence of hkd.kernels.distill_loss
    beta: float = ranged(0.5, low=0, high=1)  # jsd's mixing weight
    skew: float = ranged(0.1, low=0, high=1, high_open=True)  # skew_forward_kl / skew_reverse_kl: DistiLLM's mixing weight, in [0, 1)
    scale_t2: bool = True  # multiply by T^2 so gradients keep their scale across temperatures
    sample_temperature: float = ranged(1.0, low=0, low_open=True, high=1e4)  # the student's sampling temperature (> 0)
    top_p: float = ranged(1.0, low=0, low_open=True, high=1)  # nucleus sampling of the student's samples (1: off)
    max_new_tokens: int = ranged(32, low=1, high=2**20)  # tokens the student samples per prompt, at most
    refresh_every: int = ranged(1, low=1, high=10**9)  # sample from a copy of the student taken at every N-th step, on-policy or not (1: live weights)
    generation_backend: str = "transformers"  # how the student samples (hkd_add_generation_backends)
    generation_backend_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of its factory
    backend: str | None = None  # kernel backend for distill_loss; default: the run's kernels.distill_loss
    seed: int = ranged(0, low=0, high=2**63, high_open=True)  # seeds the per-step coin and the sampling (with the step, rank and micro-batch)


class OnPolicyStage(Stage):
    def __init__(self, config: OnPolicyStageConfig, context: StageContext) -> None:
        super().__init__()
        where = context.config_path
        if not 0.0 <= config.lmbda <= 1.0:
            raise ConfigError(f"{where}.lmbda: a probability, must be in [0, 1], got {config.lmbda}")
        if not 0.0 <= config.beta <= 1.0:
            raise ConfigError(f"{where}.beta: must be in [0, 1], got {config.beta}")
        if not 0.0 <= config.skew < 1.0:  # at 1 the skew divergences are identically 0
            raise ConfigError(f"{where}.skew: must be in [0, 1), got {config.skew}")
        if config.sample_temperature <= 0:
            raise ConfigError(f"{where}.sample_temperature: sampling needs > 0, got {config.sample_temperature}")
        if not 0.0 < config.top_p <= 1.0:
            raise ConfigError(f"{where}.top_p: must be in (0, 1], got {config.top_p}")
        for name in ("max_new_tokens", "refresh_every"):
            if getattr(config, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(config, name)}")
        from hkd.kernels.ops import DIVERGENCES as known

        if config.divergence not in known:
            raise ConfigError(f"{where}.divergence: unknown {config.divergence!r}; use one of {list(known)}")
        if not context.teacher_live or context.teacher is None:
            raise ConfigError(f"{where}: on-policy distillation runs the teacher on the student's samples, which "
                              "needs a live teacher (not teacher_cache)")
        for role, model in (("teacher", context.teacher), ("student", context.student)):
            if output_head(model) is None or getattr(model.config, "is_encoder_decoder", False):
                raise ConfigError(f"{where}: the {role} is not a causal LM (no LM head); on-policy distillation "
                                  "samples text from the student")
        if config.lmbda > 0 and getattr(context.data, "packing", False):  # refused before the first step, not at it
            raise ConfigError(f"{where}: on-policy steps sample from each row's prompt, but data.packing: true holds "
                              "several examples per row; set data.packing: false")
        self.config = config
        self.where = where
        self.kernel_backend = config.backend or context.kernels.get("distill_loss", "auto")
        kernels.check_request(  # a named backend that cannot serve these options is refused now, not at step 1
            "distill_loss", self.kernel_backend, where=where, elsewhere={"temperature": "schedule.temperature"},
            chosen_by=f"{where}.backend" if config.backend else "kernels.distill_loss",
            divergence=config.divergence, beta=config.beta, skew=config.skew, scale_t2=config.scale_t2)
        self.tokenizer = context.tokenizer
        if self.tokenizer is None:
            from hkd import load_tokenizer  # transformers: imported only when the stage is built

            self.tokenizer = load_tokenizer(Path(str(context.student.config.name_or_path)))
        if self.tokenizer is None:
            raise HkdError(f"{where}: on-policy distillation samples text and needs the student's tokenizer")
        # not submodules: the loop trains/freezes these models, this stage does not own them
        self._models: dict[str, Any] = {"student": context.student, "teacher": context.teacher}
        # the sampling policy for refresh_every > 1: a frozen copy, a submodule so checkpoints carry it
        self.policy = None
        if config.refresh_every > 1:
            from hkd import enable_taps

            self.policy = copy.deepcopy(context.student).requires_grad_(False).eval()
            enable_taps(self.policy)  # a tapped student's copy needs its own registration to run
        self._refreshed_at: int | None = None
        self._synced_at: int | None = -1  # the refresh whose weights the backend last received
        pm = context.plugins
        if pm is None:  # built outside the loop (tests, notebooks): the default plugins
            from hkd import build_manager

            pm = build_manager()
        from hkd import GenerationContext, build_generation_backend

        sampler = self.policy if self.policy is not None else context.student
        self.generator = build_generation_backend(pm, config.generation_backend, GenerationContext(
            "student", self.tokenizer, sampler, str(getattr(context.student.config, "name_or_path", "")) or None,
            next(context.student.parameters()).device, f"{where}.generation_backend"),
            config.generation_backend_options)

    # the stage runs its own forwards (on samples, or on the data when the coin says off-policy)
    def teacher_request(self) -> TapRequest:
        return TapRequest()

    def student_request(self) -> TapRequest:
        return TapRequest()

    def on_policy(self, step: int) -> bool:
        """The step's coin: a pure function of (seed, step), identical on every rank."""
        return random.Random(derive_seed(self.config.seed, f"onpolicy:{step}")).random() < self.config.lmbda

    def refresh(self, step: int) -> None:
        """Keep the sampling copy the one taken at the last multiple of ``refresh_every`` up to ``step``.

        Called on every step the stage runs, before its coin, so the copy follows the step count
        alone. A stage built or resumed at a multiple copies now; one resumed between multiples
        holds the checkpoint's copy, which is that multiple's. A stage paused over a multiple
        (a phase without it) copies at its first step back."""
        if self.policy is None:
            return
        every = self.config.refresh_every
        due = step - step % every
        if self._refreshed_at is None and step % every:  # resumed between refreshes: the checkpoint's copy
            self._refreshed_at = due
        if self._refreshed_at != due:
            # by name, from whole tensors: under FSDP the student's parameters are shards (gathered here, on
            # every rank alike), while the copy, taken before sharding, stays whole on each rank
            student = dict(self._models["student"].named_parameters())
            with torch.no_grad():
                for name, mine in self.policy.named_parameters():
                    mine.copy_(full_parameter(student[name]))
            self._refreshed_at = due

    def sampling_model(self, step: int) -> Any:
        """The weights the student samples with at ``step``: live, or the copy from the last refresh."""
        if self.policy is None:
            return self._models["student"]
        self.refresh(step)
        return self.policy

    def loss(self, batch: dict[str, Tensor], teacher: ModelView | None, student: ModelView | None,
             state: StepState) -> dict[str, Tensor]:
        self.refresh(state.step)  # by the step count, whatever the coin says
        on = self.on_policy(state.step)
        if on and "position_ids" in batch:  # packed rows: several examples, so no single prompt per row
            raise ConfigError(f"{self.where}: on-policy steps sample from each row's prompt, but the rows are "
                              "packed (data.packing: true holds several examples per row); set data.packing: false")
        if on:
            inputs, labels, start, tokens = self.sample_batch(batch, state)
        else:  # the data as the loop's forward sees it (packed rows keep their own positions)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
            labels, start = next_token_labels(batch["labels"]), 0
            tokens = None
        student_logits = self._models["student"](**inputs).logits[:, start:-1]
        with torch.no_grad():
            teacher_logits = self._models["teacher"](**inputs).logits[:, start:-1]
        total = kernels.distill_loss(
            student_logits, teacher_logits.to(student_logits.dtype), labels=labels,
            divergence=self.config.divergence, beta=self.config.beta, skew=self.config.skew,
            temperature=state.temperature, scale_t2=self.config.scale_t2, reduction="sum", backend=self.kernel_backend)
        if tokens is None:  # the data's completions: the loop's per-token normalisation
            loss = total / max(state.tokens, 1)
        else:  # the samples: mean over this micro-batch's sampled tokens, averaged over micro-batches and ranks
            loss = total / tokens.clamp_min(1) / (state.micro_batches * state.world_size)
        terms = {"onpolicy": loss, "metric/onpolicy_steps": torch.full((), float(on), device=loss.device)}
        if tokens is not None:
            terms["metric/sample_tokens"] = (tokens / max(labels.shape[0], 1)).detach().float()
        return terms

    def sample_batch(self, batch: dict[str, Tensor], state: StepState) -> tuple[dict[str, Tensor], Tensor, int, Tensor]:
        """Sample one continuation per prompt of ``batch``; returns model inputs for prompt +
        sample, labels marking the sampled tokens, the column where predictions of sampled tokens
        start, and the number of sampled tokens."""
        from hkd import SamplingParams, sync_weights

        host = getattr(state, "host_batch", None)  # the loop's CPU copy: reading it waits for nothing
        prompts = batch_prompts(host if host is not None else batch)
        policy = self.sampling_model(state.step)
        if self.policy is None or self._synced_at != self._refreshed_at:
            # an engine keeping its own weights gets the policy's; the live student: every step
            sync_weights(self.generator, policy)
            self._synced_at = self._refreshed_at
        samples = self.generator.generate(prompts, SamplingParams(
            n=1, max_new_tokens=self.config.max_new_tokens, temperature=self.config.sample_temperature,
            top_p=self.config.top_p,
            seed=derive_seed(self.config.seed, f"onpolicy-sample:{state.step}:0:{global_micro_batch(state)}")))
        inputs, start = samples.scoring_inputs()
        labels = samples.completion_ids.masked_fill(samples.completion_mask == 0, IGNORE_INDEX)
        return inputs, labels, start, samples.completion_mask.sum()


def global_micro_batch(state: StepState) -> int:
    """The micro-batch's place in the step, numbered as one process would (rank ``r`` trains micro-batches
    ``r*A .. r*A+A-1`` of the step's ``W*A``): what the samples are seeded by, so ``W`` ranks draw exactly
    the samples one process with ``W*A`` micro-batches would (``0:i`` in the seed's text: rank 0's)."""
    return state.rank * state.micro_batches + state.micro_batch


def batch_prompts(batch: dict[str, Tensor], tokenizer: Any = None) -> PromptBatch:
    """Each row's prompt as token ids: its real tokens before its last run of targets (``labels !=
    IGNORE_INDEX``): the prompt of a prompt/completion row, and everything before the last assistant
    turn of a conversation (earlier turns are context, as in TRL's GKD). Exactly as the data encoded
    them (BOS, a chat template's markers), never decoded and re-encoded. A row without targets is
    its whole self. ``tokenizer`` is not used (kept for callers written before)."""
    labels, ids = batch["labels"].tolist(), batch["input_ids"].tolist()  # one host read per micro-batch
    mask = batch["attention_mask"].tolist() if "attention_mask" in batch else [[1] * len(row) for row in ids]
    rows = []
    for row_ids, row_labels, row_mask in zip(ids, labels, mask):
        start = sum(row_mask)  # rows are right-padded
        targets = [i for i, label in enumerate(row_labels[:start]) if label != IGNORE_INDEX]
        if targets:
            start = targets[-1]
            while start > 0 and row_labels[start - 1] != IGNORE_INDEX:
                start -= 1
        rows.append(row_ids[:start])
    return PromptBatch(rows)


@hookimpl
def hkd_add_stages() -> list[StageSpec]:
    return [StageSpec("onpolicy", OnPolicyStageConfig, OnPolicyStage,
                      "on-policy distillation (GKD): divergence on the student's own samples, lambda mix with data",
                      "decision")]
