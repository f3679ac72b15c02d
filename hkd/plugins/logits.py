"""Decision stage: soft targets with temperature plus hard labels.

``loss = (1 - alpha) * T^2 * D(teacher_T, student_T) + alpha * CE(student, labels)`` per
target token, where D is forward KL, reverse KL, generalized JSD(beta) or DistiLLM's skew KL /
skew reverse KL (``skew``: KL(p_t || skew p_t + (1-skew) p_s) / KL(p_s || skew p_s + (1-skew) p_t))
between the temperature-softened distributions (see :func:`hkd.kernels.distill_loss`). Position ``i``
predicts token ``i + 1``; label -100 (padding, prompt tokens) is excluded. The per-token sum
is divided by the step's token count across all accumulation micro-batches.

``fused: true`` hands the kernels the final hidden states and the LM-head weights instead
of logits, so neither model ever holds a ``[tokens, vocab]`` logits tensor.

From an offline teacher cache (``teacher_cache``) the teacher's view carries sparse targets
(``view.sparse``: :class:`hkd.SparseTargets`) instead of full logits, and the soft loss is the
forward KL ``sum_k p_t (log p_t - log q_s)`` with the student's full-vocabulary ``log q_s``
gathered at the k ids (:func:`hkd.kernels.sparse_distill_loss`). ``sparse_tail`` says what
happens to the teacher's mass outside the cached ids:

* ``renormalize``: ``p_t = softmax(topk_values / T)`` over the k tokens, zero elsewhere. Biased
  (the tail mass vanishes and the top-k are inflated), exact at any temperature for what it is.
* ``bucket``: the tokens outside the top-k are one more outcome with the teacher's exact tail
  mass, from the log-normaliser the cache stored at its temperature; the student also learns
  how much mass to leave there. Exact only at the cache's temperature, so a run at another
  (or a varying) temperature is refused by name.
* ``auto`` (default): ``bucket`` when the source serves the log-normaliser at the run's
  temperature, else ``renormalize``.

Sampled targets (``hkd cache-teacher --targets sampled``) are ``count / K`` of K draws from the
teacher at the cache's temperature: an unbiased estimate of the teacher's distribution, used
as the target as it is (no tail: the draws already cover it); a run at another temperature is
refused. With k = vocabulary size every mode equals the dense loss exactly. Only
``forward_kl`` is defined on sparse targets (reverse KL and JSD need teacher probabilities
outside the cached ids). ``kernels: {sparse_distill_loss: NAME}`` picks its backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from hkd import (
    ConfigError, HkdError, ModelView, Need, SparseTargets, Stage, StageContext, StageSpec, StepState, TapRequest,
    hookimpl, kernels,
)
from hkd import IGNORE_INDEX, apply_logit_softcap, check_supported, full_parameter, next_token_labels, output_head
from hkd import ranged
from hkd.kernels.sparse import exact_bucket_inputs


@dataclass
class LogitsStageConfig:
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"] = "forward_kl"  # KL(teacher||student), KL(student||teacher), generalized JSD (beta) or DistiLLM's skew KLs (skew)
    beta: float = ranged(0.5, low=0, high=1)  # jsd mixing weight
    skew: float = ranged(0.1, low=0, high=1, high_open=True)  # skew_*_kl: weight of the first distribution mixed into the second (DistiLLM), in [0, 1)
    alpha: float = ranged(0.0, low=0, high=1)  # weight of the hard-label cross-entropy
    scale_t2: bool = True  # multiply the soft loss by T^2 (Hinton) so gradients keep their scale
    fused: bool = False  # LM head fused into the loss kernel: no logits tensor is ever built
    # fused: sum the LM-head weight gradient over row chunks in fp32 even when the weight is bf16 / fp16
    # (one rounding at the end instead of one per chunk; costs an fp32 [vocab, hidden] buffer)
    fused_grad_fp32: bool = False
    backend: str | None = None  # kernel backend; default: the run's kernels.<op> or "auto"
    # several teachers (config ``teachers:``): distil towards their weighted mixture, or sum the
    # weighted per-teacher losses
    teachers: Literal["mixture", "sum"] = "mixture"
    # sparse targets (teacher_cache): the teacher's mass outside the cached top-k ids as one more
    # bucket, or dropped (renormalised within the top-k); auto: bucket when the cache serves it
    sparse_tail: Literal["auto", "renormalize", "bucket"] = "auto"

    # options that act only with another (checked when the stage is built, hkd/config/needs.py)
    NEEDS: ClassVar[list[Need]] = [
        Need("beta", "divergence is jsd", lambda c, i: c.divergence == "jsd", ("divergence",)),
        Need("skew", "divergence is skew_forward_kl or skew_reverse_kl", lambda c, i: c.divergence.startswith("skew"),
             ("divergence",)),
        Need("fused_grad_fp32", "fused is true", lambda c, i: c.fused, ("fused",)),
    ]


class LogitsStage(Stage):
    def __init__(self, config: LogitsStageConfig, context: StageContext) -> None:
        super().__init__()
        self.config = config
        for role, model in (("teacher", context.teacher), ("student", context.student)):
            if model is not None and output_head(model) is None:
                raise ConfigError(f"{context.config_path}: the {role} has no LM head (an encoder?); disable this stage")
            if model is not None:
                check_supported(model, logits=True)  # an architecture whose logits hkd cannot reproduce is named
        if not 0.0 <= config.alpha <= 1.0:
            raise ConfigError(f"{context.config_path}.alpha: must be in [0, 1], got {config.alpha}")
        if not 0.0 <= config.beta <= 1.0:
            raise ConfigError(f"{context.config_path}.beta: must be in [0, 1], got {config.beta}")
        if not 0.0 <= config.skew < 1.0:  # at 1 the skew divergences are identically 0 (no signal)
            raise ConfigError(f"{context.config_path}.skew: must be in [0, 1), got {config.skew} (0 = plain KL; "
                              "at 1 skew_forward_kl / skew_reverse_kl are identically 0)")
        self.op = "fused_linear_distill_loss" if config.fused else "distill_loss"
        self.backend = config.backend or context.kernels.get(self.op, "auto")
        # a source without full logits (the offline cache) serves top-k targets instead
        self.sparse = not context.teacher_serves.logits and context.teacher_serves.sparse_logits
        self.sparse_backend = context.kernels.get("sparse_distill_loss", "auto")
        self.sparse_tail = config.sparse_tail
        if not self.sparse and config.sparse_tail != "auto":  # an option that would change nothing is refused
            raise ConfigError(f"{context.config_path}.sparse_tail: {config.sparse_tail!r} applies to top-k targets "
                              "from a teacher_cache; this teacher serves full logits, so remove the option")
        if config.sparse_tail != "auto" and context.teacher_cache_targets == "sampled":  # a cache of another kind
            raise ConfigError(f"{context.config_path}.sparse_tail: {config.sparse_tail!r} applies to top-k targets; "
                              "this teacher_cache holds sampled targets, which have no tail (the draws cover it): "
                              "remove the option, or build the cache with --targets topk")
        if self.sparse_tail == "auto":
            self.sparse_tail = "bucket" if context.teacher_serves.sparse_logsumexp else "renormalize"
        self.config_path = context.config_path
        if self.sparse and config.divergence != "forward_kl":
            raise ConfigError(f"{context.config_path}.divergence: {config.divergence} needs the teacher's full "
                              "distribution; a teacher_cache holds top-k logits only, so use forward_kl")
        # a backend named in the config that cannot serve these options is refused now, not at the first step
        run_time = {"temperature": "schedule.temperature"}
        if self.sparse:
            kernels.check_request("sparse_distill_loss", self.sparse_backend, chosen_by="kernels.sparse_distill_loss",
                                  where=context.config_path,
                                  elsewhere={**run_time, "tail": f"{context.config_path}.sparse_tail"},
                                  tail=self.sparse_tail, alpha=config.alpha, scale_t2=config.scale_t2)
        else:
            request: dict[str, Any] = dict(divergence=config.divergence, beta=config.beta, skew=config.skew,
                                           alpha=config.alpha, scale_t2=config.scale_t2)
            elsewhere = dict(run_time)
            if config.fused:  # the fused op also gets the LM heads' biases and the weight gradient's precision
                request["weight_grad_fp32"] = config.fused_grad_fp32
                for role, model in (("student", context.student), ("teacher", context.teacher)):
                    request[f"{role}_bias"] = getattr(output_head(model) if model is not None else None, "bias", None)
                    elsewhere[f"{role}_bias"] = f"the {role}'s LM head bias"
            kernels.check_request(self.op, self.backend, where=context.config_path, elsewhere=elsewhere,
                                  chosen_by=f"{context.config_path}.backend" if config.backend else f"kernels.{self.op}",
                                  **request)
        if config.teachers != "mixture" and len(context.teachers) == 1:  # an option that would change nothing
            raise ConfigError(f"{context.config_path}.teachers: {config.teachers!r} combines several teachers; this "
                              "run has one (the config's teachers: list is empty), so remove the option")
        self.weights = list(context.teacher_weights) if len(context.teachers) > 1 else [1.0]
        if len(self.weights) > 1:
            if config.fused:
                raise ConfigError(f"{context.config_path}.fused: several teachers are mixed from their full "
                                  "logits; set fused: false (or train with one teacher)")
            lacking = [i for i, serves in enumerate(context.teachers_serve) if not serves.logits]
            if lacking:
                raise ConfigError(f"{context.config_path}: several teachers are mixed from their full logits, but "
                                  f"teacher(s) {lacking} come from a teacher_cache (top-k only); use live teachers")
            for i, teacher in enumerate(context.teachers):
                if output_head(teacher) is None:
                    raise ConfigError(f"{context.config_path}: teacher {i} has no LM head (an encoder?)")
                check_supported(teacher, logits=True)

    def teacher_requests(self, count: int) -> list[TapRequest]:
        if len(self.weights) > 1:  # every teacher's logits, for the mixture
            return [TapRequest(logits=True) for _ in range(count)]
        return super().teacher_requests(count)

    def teacher_request(self) -> TapRequest:
        if self.sparse:
            return TapRequest(sparse_logits=True, sparse_logsumexp=self.sparse_tail == "bucket")
        return self.student_request()

    def student_request(self) -> TapRequest:
        return TapRequest(final_hidden=True) if self.config.fused else TapRequest(logits=True)

    def loss(self, batch: dict[str, Tensor], teacher: ModelView | None, student: ModelView | None,
             state: StepState) -> dict[str, Tensor]:
        assert teacher is not None and student is not None
        # every position, with the label its prediction is scored on (the last one has none): the models'
        # [B, S, V] logits go to the kernels as they are, flattened views, never a logits[:, :-1] copy of
        # [tokens, vocab]; rows labelled IGNORE_INDEX count for nothing, and no boolean-mask selection makes
        # the host wait for the device to count the targets
        labels = F.pad(next_token_labels(batch["labels"]), (0, 1), value=IGNORE_INDEX)
        options: dict[str, Any] = dict(
            labels=labels,
            divergence=self.config.divergence,
            beta=self.config.beta,
            skew=self.config.skew,
            temperature=state.temperature,
            scale_t2=self.config.scale_t2,
            alpha=self.config.alpha,
            reduction="sum",
            backend=self.backend,
        )
        if teacher.sparse is not None:  # offline teacher cache: sparse top-k targets
            total = self.sparse_loss(full_logits(student), teacher.sparse, labels, state.temperature)
        elif self.config.fused and (student.logit_softcap or teacher.logit_softcap):
            # the fused kernel has no soft-cap: build the (capped) logits, as the models themselves do
            total = kernels.distill_loss(full_logits(student), full_logits(teacher), **options)
        elif self.config.fused:
            assert student.final_hidden is not None and teacher.final_hidden is not None
            assert student.lm_head is not None and teacher.lm_head is not None
            # the heads' weights as the kernel needs them: under FSDP each is gathered whole for this call
            # (its gradient goes back to the shards), as FSDP itself would to run the head
            total = kernels.fused_linear_distill_loss(
                student.final_hidden,
                cast(Tensor, full_parameter(cast(Tensor, student.lm_head.weight))),
                teacher.final_hidden,
                cast(Tensor, full_parameter(cast(Tensor, teacher.lm_head.weight))),
                student_bias=full_parameter(getattr(student.lm_head, "bias", None)),
                teacher_bias=full_parameter(getattr(teacher.lm_head, "bias", None)),
                weight_grad_fp32=self.config.fused_grad_fp32,
                **options,
            )
        elif len(self.weights) > 1:
            assert student.logits is not None
            total = self.several_teachers_loss(student.logits, state, options)
        else:
            assert student.logits is not None and teacher.logits is not None
            total = kernels.distill_loss(student.logits, teacher.logits, **options)
        return {"logits": total / max(state.tokens, 1)}

    def several_teachers_loss(self, student_logits: Tensor, state: StepState, options: dict[str, Any]) -> Tensor:
        """``mixture``: the loss against ``p = sum_i w_i softmax(z_i / T)``, passed to the kernel as the
        logits ``T * log p`` (whose softmax at temperature T is ``p`` exactly); ``sum``: the weighted
        sum of each teacher's loss. Teachers' logits are folded in one at a time."""
        teacher_logits = []
        for view in state.teachers:
            assert view is not None and view.logits is not None
            teacher_logits.append(view.logits)
        if self.config.teachers == "sum":
            losses = [w * kernels.distill_loss(student_logits, z, **options) for w, z in zip(self.weights, teacher_logits)]
            return torch.stack(losses).sum()
        t = state.temperature
        mixed: Tensor | None = None
        for weight, logits in zip(self.weights, teacher_logits):
            term = (logits.float() / t).log_softmax(-1) + math.log(weight)
            mixed = term if mixed is None else torch.logaddexp(mixed, term)
        assert mixed is not None
        return kernels.distill_loss(student_logits, (mixed * t).to(student_logits.dtype), **options)

    def sparse_loss(self, student_logits: Tensor, targets: SparseTargets, labels: Tensor, temperature: float) -> Tensor:
        """Summed loss against sparse teacher targets (``[B, S, k]``: at each position, the teacher's
        prediction of the next token); student logits ``[B, S, V]`` with ``labels`` ``[B, S]`` (the label
        each position is scored on), or ``[B, S-1, V]`` with ``labels[:, 1:]`` (the targets are then shifted
        here). Top-k targets are renormalised within the top-k or get the tail as one more bucket
        (``sparse_tail``); sampled targets are used as they are."""
        shift = student_logits.shape[1] == targets.ids.shape[1] - 1
        ids, values = (targets.ids[:, :-1], targets.values[:, :-1]) if shift else (targets.ids, targets.values)
        exact_at = targets.kind == "sampled" or self.sparse_tail == "bucket"
        if exact_at and not math.isclose(temperature, targets.temperature, rel_tol=1e-6):
            what = "sampled targets" if targets.kind == "sampled" else f"{self.config_path}.sparse_tail: bucket"
            raise HkdError(f"{what}: the targets are exact at temperature {targets.temperature:g} only (the "
                           f"teacher_cache's), but this step runs at {temperature:g}; set schedule.temperature to "
                           f"{targets.temperature:g} or rebuild the cache with --temperature")
        tail, logsumexp = "renormalize", None
        if targets.kind == "sampled":
            # log(count / K) times T: the kernel divides by T, and softmax(log(count / K)) = count / K
            values = values * temperature
        elif self.sparse_tail == "bucket":
            if targets.logsumexp is None:
                raise HkdError(f"{self.config_path}.sparse_tail: bucket needs the teacher's log-normaliser, which "
                               "these targets lack; use sparse_tail: renormalize or a cache built by this hkd")
            tail = "bucket"
            lse = targets.logsumexp[:, :-1] if shift else targets.logsumexp
            values, logsumexp = exact_bucket_inputs(values, lse, temperature, student_logits.shape[-1])
        return kernels.sparse_distill_loss(
            student_logits, ids, values, labels, temperature=temperature, tail=tail, teacher_logsumexp=logsumexp,
            alpha=self.config.alpha, scale_t2=self.config.scale_t2, reduction="sum", backend=self.sparse_backend)


def full_logits(view: ModelView) -> Tensor:
    """The view's logits, or the LM head applied to its final hidden state (with the model's soft-cap)."""
    if view.logits is not None:
        return view.logits
    assert view.final_hidden is not None and view.lm_head is not None
    return apply_logit_softcap(view.lm_head(view.final_hidden), view.logit_softcap)


@hookimpl
def hkd_add_stages() -> list[StageSpec]:
    return [StageSpec("logits", LogitsStageConfig, LogitsStage, "soft-target KL/JSD with temperature + hard CE", "decision")]
