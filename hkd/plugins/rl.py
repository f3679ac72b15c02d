"""RL correction stage: the student samples, verifiers reward, a policy gradient corrects it.

Once per optimizer step the stage picks ``prompts_per_step`` prompts (with reference answers),
lets the student sample ``samples_per_prompt`` completions for each (on-policy, through the
generation backend ``generation_backend``: the built-in ``transformers`` samples the live student batched
with the KV cache; an engine plugin gets the student's weights through ``sync_weights`` before
each step's sampling), scores every completion with a verifier (the reward is
the verdict's ``score``) and returns

    rl    = - sum_{i,t} A_i * log pi(y_{i,t} | x_i, y_{i,<t})  /  N
    rl_kl = kl_weight * sum_{i,t} KL(pi(. | ...) || teacher(. | ...))  /  N

where ``A_i = r_i - mean(r_group)`` (divided by the group's std with ``normalize_std``) is
the group-relative advantage of sample ``i`` among the samples of its prompt (GRPO), ``pi``
is the student's distribution at the sampling temperature, and ``N`` is the number of
completion tokens sampled in the step (token-level normalisation, so long and short
completions weigh per token). The KL term is the per-token reverse KL from the student to
the teacher over the full vocabulary, on the student's own samples: on-policy distillation
that keeps RL from drifting away from what the teacher would say.

Normalisation: the RL loss ignores the loop's batch (and ``state.tokens``); it is a mean over
its own sampled tokens, computed on the first micro-batch of each step. Later micro-batches
of the same step (``optim.grad_accum > 1``) return no terms, so the number of samples per
step does not depend on gradient accumulation (the loop skips their backward). Under data parallelism each rank samples its
own prompts and the loss is divided by the world size, so the averaged gradient is the mean
over ranks.

No PPO ratio clipping: every batch of samples is used for exactly one gradient step, so the
ratio ``pi / pi_old`` is 1 at that step and a clip would never bind. Prompts for a step are a
pure function of (seed, step), like the loop's batches, so a resumed run samples the same
prompts; the stage holds no state to checkpoint.

Prompts come from ``prompts`` (a JSONL file with ``prompt_field``/``answer_field``; a relative
path is taken from the current directory) or, without one, from ``num_prompts`` synthetic
addition problems (:mod:`hkd.tasks.arith`). A prompt is text or a conversation (a list of
``{role, content}`` messages, TRL's conversational prompt format). They are rendered to token
ids once, when the stage is built, as the training data renders prompts: a conversation, and
a text prompt when ``chat_template`` is on (by default it follows the run's data: on with
``data.chat_template`` or ``data.messages_field``), through the tokenizer's chat template with
the generation prompt, other text as ``[bos] + text``. The sampler gets those ids and stops at
EOS or the template's end-of-turn token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hkd import ConfigError, HkdError, ModelView, Stage, StageContext, StageSpec, StepState, TapRequest, hookimpl
from hkd import PromptBatch
from hkd.tasks.arith import make_problems
from hkd import read_jsonl
from hkd import ranged
from hkd.kernels.divergence import kl_divergence
from hkd import derive_seed
from hkd import VerifierConfig, build_verifier


@dataclass
class RlStageConfig:
    prompts: str | None = None  # JSONL of prompt records; None: synthetic addition problems
    prompt_field: str = "prompt"  # field of the prompt in prompts: text, or a conversation (list of {role, content})
    answer_field: str = "answer"  # field of the reference answer the verifier checks
    num_prompts: int = ranged(256, low=1, high=10**7)  # synthetic only
    digits: int = ranged(2, low=1, high=18)  # synthetic only
    prompts_per_step: int = ranged(8, low=1, high=2**16)  # prompts sampled per optimizer step (per rank)
    samples_per_prompt: int = ranged(4, low=1, high=2**16)  # the group size of the group-relative advantage
    max_new_tokens: int = ranged(48, low=1, high=2**20)  # tokens sampled per completion, at most
    temperature: float = ranged(1.0, low=0, high=1e4)  # the student's sampling temperature
    top_p: float = ranged(1.0, low=0, low_open=True, high=1)  # nucleus sampling (1: off)
    normalize_std: bool = True  # divide advantages by the group's reward std
    kl_weight: float = ranged(0.0, low=0, high=1e6)  # per-token reverse KL toward the teacher on the student's samples
    verifier: VerifierConfig = field(default_factory=lambda: VerifierConfig("exact_answer"))  # its score is the reward
    seed: int = ranged(0, low=0, high=2**63, high_open=True)  # seeds the synthetic prompts, their order and the sampling
    generation_backend: str = "transformers"  # how the student samples (hkd_add_generation_backends)
    generation_backend_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of its factory
    # wrap text prompts in the tokenizer's chat template as a user turn; None: as the run's data does
    # (data.chat_template or data.messages_field). Conversation prompts always use the template
    chat_template: bool | None = None


def group_advantages(rewards: Tensor, group_size: int, normalize_std: bool, eps: float = 1e-6) -> Tensor:
    """``[P*G]`` rewards (prompt-major) -> advantages relative to each prompt's group of ``G``."""
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    if normalize_std:
        centred = centred / (groups.std(1, unbiased=False, keepdim=True) + eps)
    return centred.reshape(-1)


def policy_gradient_loss(token_logp: Tensor, mask: Tensor, advantages: Tensor) -> Tensor:
    """``-sum(A_i * log pi(y_it)) / N`` over real completion tokens; ``token_logp``/``mask`` ``[R, T]``."""
    mask = mask.to(token_logp.dtype)
    return -(advantages[:, None] * token_logp * mask).sum() / mask.sum().clamp_min(1)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens of ``KL(student || teacher)`` over the vocabulary; logits ``[R, T, V]``."""
    per_token = kl_divergence(student_logits.float().log_softmax(-1), teacher_logits.float().log_softmax(-1))
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def load_prompt_records(config: RlStageConfig, where: str) -> list[dict[str, Any]]:
    if config.prompts is None:
        return [{config.prompt_field: p.prompt, config.answer_field: p.answer}
                for p in make_problems(config.num_prompts, config.digits, config.seed)]
    if not Path(config.prompts).is_file():
        raise ConfigError(f"{where}.prompts: file {config.prompts!r} does not exist")
    return read_jsonl(config.prompts, "fail", (config.prompt_field, config.answer_field),
                      conversations={config.prompt_field: False})


class RlStage(Stage):
    def __init__(self, config: RlStageConfig, context: StageContext) -> None:
        super().__init__()
        where = context.config_path
        for name in ("prompts_per_step", "max_new_tokens", "num_prompts"):
            if getattr(config, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(config, name)}")
        if config.samples_per_prompt < 2:
            raise ConfigError(f"{where}.samples_per_prompt: group-relative advantages need >= 2, "
                              f"got {config.samples_per_prompt}")
        if config.temperature <= 0:
            raise ConfigError(f"{where}.temperature: on-policy sampling needs > 0, got {config.temperature}")
        if config.kl_weight > 0 and not context.teacher_live:  # with teacher_cache the teacher is only a skeleton
            raise ConfigError(f"{where}.kl_weight: the KL term runs the teacher on the student's samples, "
                              "which needs a live teacher (not teacher_cache); set kl_weight: 0")
        self.config = config
        self.records = load_prompt_records(config, where)
        if context.tokenizer is None:
            from hkd import load_tokenizer  # transformers: imported when an RL stage is built

            self.tokenizer = load_tokenizer(Path(str(context.student.config.name_or_path)))
        else:
            self.tokenizer = context.tokenizer
        if self.tokenizer is None:
            raise HkdError(f"{where}: the RL stage samples text and needs the student's tokenizer")
        data = getattr(context, "data", None)
        chat_template = config.chat_template
        if chat_template is None:  # as the data the student trains on renders its prompts
            chat_template = data is not None and bool(data.chat_template or getattr(data, "messages_field", None))
        # every prompt as token ids, rendered once: a bad conversation or template fails here, not at step k
        self.prompt_ids = PromptBatch.from_texts(self.tokenizer, [r[config.prompt_field] for r in self.records],
                                                 chat_template, f"{where}.prompts").ids
        pm = context.plugins
        if pm is None:  # built outside the loop (tests, notebooks): the default plugins
            from hkd import build_manager

            pm = build_manager()
        self.verify = build_verifier(pm, config.verifier.name, config.verifier.options, f"{where}.verifier")
        from hkd import GenerationContext, build_generation_backend

        student = context.student
        self.backend = build_generation_backend(pm, config.generation_backend, GenerationContext(
            "student", self.tokenizer, student, str(getattr(student.config, "name_or_path", "")) or None,
            next(student.parameters()).device, f"{where}.generation_backend"), config.generation_backend_options)
        # not submodules: the models are trained/frozen by the loop, not owned by this stage
        self._models: dict[str, Any] = {"student": context.student, "teacher": context.teacher}

    def student_request(self) -> TapRequest:
        return TapRequest()  # the stage runs its own forward on its samples

    def step_indices(self, step: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """``prompts_per_step`` record indices for this step and rank: consecutive slices of a per-epoch shuffle."""
        size, n = self.config.prompts_per_step, len(self.records)
        picks = []
        for k in range((step * world_size + rank) * size, (step * world_size + rank + 1) * size):
            order = list(range(n))
            random.Random(self.config.seed * 1_000_003 + k // n).shuffle(order)
            picks.append(order[k % n])
        return picks

    def step_prompts(self, step: int, rank: int = 0, world_size: int = 1) -> list[dict[str, Any]]:
        """The records of :meth:`step_indices`."""
        return [self.records[i] for i in self.step_indices(step, rank, world_size)]

    def loss(self, batch: dict[str, Tensor], teacher: ModelView | None, student: ModelView | None,
             state: StepState) -> dict[str, Tensor]:
        if state.micro_batch > 0:  # the step's samples were drawn on its first micro-batch
            return {}
        model = self._models["student"]
        cfg, rank, world = self.config, state.rank, state.world_size
        indices = self.step_indices(state.step, rank, world)
        records = [self.records[i] for i in indices]
        from hkd import SamplingParams, sync_weights

        sync_weights(self.backend, model)  # an engine with its own weights copy samples today's student
        samples = self.backend.generate(
            PromptBatch([self.prompt_ids[i] for i in indices]),
            SamplingParams(n=cfg.samples_per_prompt, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           top_p=cfg.top_p, seed=derive_seed(cfg.seed, f"rl:{state.step}:{rank}")))
        device = samples.completion_ids.device
        rewards = torch.tensor([self.verify(records[i // cfg.samples_per_prompt], text).score
                                for i, text in enumerate(samples.texts)], dtype=torch.float32, device=device)
        advantages = group_advantages(rewards, cfg.samples_per_prompt, cfg.normalize_std)

        inputs, start = samples.scoring_inputs()  # log-probs are the sampling policy's
        student_logits = model(**inputs).logits[:, start:-1] / cfg.temperature
        token_logp = student_logits.float().log_softmax(-1).gather(-1, samples.completion_ids[..., None]).squeeze(-1)
        mask = samples.completion_mask
        terms: dict[str, Tensor] = {
            "rl": policy_gradient_loss(token_logp, mask, advantages) / world,
            "metric/reward": rewards.mean(),
        }
        if cfg.kl_weight > 0:
            teacher_model = self._models["teacher"]
            assert teacher_model is not None
            with torch.no_grad():
                teacher_logits = teacher_model(**inputs).logits[:, start:-1]
            kl = reverse_kl(student_logits * cfg.temperature, teacher_logits, mask)
            terms["rl_kl"] = cfg.kl_weight * kl / world
            terms["metric/rl_kl"] = kl.detach()
        return terms


@hookimpl
def hkd_add_stages() -> list[StageSpec]:
    return [StageSpec("rl", RlStageConfig, RlStage, "on-policy policy gradient with verifier rewards (+ reverse KL)",
                      "rl")]
