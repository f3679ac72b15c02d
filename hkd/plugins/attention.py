"""Structural stage: transfer attention patterns on mapped layers.

Two ways to compare models whose attention differs in shape:

* ``maps`` (TinyBERT): KL(teacher || student) between attention distributions of each query
  row, per head when both models have the same number of query heads, otherwise between
  the head-averaged distributions (``heads: average``). ``value_relation: true`` adds the
  MiniLM value-relation term, which is head-count agnostic.
* ``relations`` (MiniLMv2): concatenate all heads' q (k, v), split them into
  ``relation_heads`` equal parts, and match the self-relations ``softmax(X X^T / sqrt(d))``.
  Works for any head counts and GQA because only the total width must divide evenly.

Every row term is a KL over the keys a query may attend to (the model's own mask: causal,
padding), summed over real target positions and divided by the step's token count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from einops import rearrange
from torch import Tensor

from hkd import ConfigError, ModelView, Stage, StageContext, StageSpec, StepState, TapRequest, hookimpl
from hkd.kernels.divergence import kl_divergence
from hkd import LayerMapConfig, build_layer_map, layer_metrics
from hkd import ranged

if TYPE_CHECKING:  # QKV lives with the taps, which import transformers
    from hkd import QKV


@dataclass
class AttentionStageConfig:
    mode: Literal["maps", "relations"] = "maps"  # maps: attention distributions (TinyBERT); relations: MiniLMv2's q/k/v self-relations
    heads: Literal["auto", "per_head", "average"] = "auto"  # maps: auto = per_head when counts match
    value_relation: bool = False  # maps: add the MiniLM value-relation KL
    relations: list[Literal["qq", "kk", "vv"]] = field(default_factory=lambda: ["qq", "kk", "vv"])  # relations mode: which self-relations to match
    relation_heads: int = ranged(4, low=1, high=2**16)  # relations mode: q, k and v are split into this many heads (must divide each width)
    layer_map: LayerMapConfig = field(default_factory=lambda: LayerMapConfig(strategy="auto"))  # which student block learns from which teacher block
    log_layers: bool = False  # diagnostic: log each mapped pair's loss as metric/layer/attention/<s>_<t>


def key_logprobs(qkv: QKV) -> Tensor:
    """Per-head attention log-probabilities over keys, rows summing to 1.

    With attention sinks (gpt-oss) the model's rows sum to ``1 - p(sink)``; they are
    renormalised over the keys, so the KL compares where attention goes among the tokens (a
    proper distribution on both sides, whether or not the other model has sinks).
    """
    logp = qkv.attention_logprobs()
    return logp if qkv.sink_logprob() is None else logp - logp.logsumexp(-1, keepdim=True)


def self_relation_logp(x: Tensor, heads: int, allowed: Tensor) -> Tensor:
    """MiniLMv2 relation: ``x`` ``[B, H, S, d]`` -> log-softmax of scaled ``[B, R, S, S]`` relations."""
    x = rearrange(x.float(), "b h s d -> b s (h d)")
    x = rearrange(x, "b s (r e) -> b r s e", r=heads)
    with torch.autocast(x.device.type, enabled=False):  # fp32 relations under bf16 autocast too
        scores = torch.matmul(x, x.transpose(-1, -2)) * x.shape[-1] ** -0.5
    return scores.masked_fill(~allowed, float("-inf")).log_softmax(dim=-1)


class AttentionStage(Stage):
    def __init__(self, config: AttentionStageConfig, context: StageContext) -> None:
        super().__init__()
        self.config = config
        assert context.teacher is not None
        teacher_cfg, student_cfg = context.teacher.config, context.student.config
        self.layer_map = build_layer_map(
            config.layer_map.strategy,
            student_cfg.num_hidden_layers,
            teacher_cfg.num_hidden_layers,
            pairs=config.layer_map.pairs,
            where=f"{context.config_path}.layer_map",
            student_dir=getattr(context.student.config, "name_or_path", None),  # init/auto: a cut student's hkd-init.json
        )
        if any(s == 0 or t == 0 for s, t in self.layer_map):
            raise ConfigError(f"{context.config_path}.layer_map: attention exists only for blocks 1..L, not 0")
        same_heads = teacher_cfg.num_attention_heads == student_cfg.num_attention_heads
        if config.heads == "per_head" and not same_heads:
            raise ConfigError(
                f"{context.config_path}.heads: per_head needs equal head counts, teacher has "
                f"{teacher_cfg.num_attention_heads}, student {student_cfg.num_attention_heads}; use average or relations"
            )
        self.per_head = config.heads == "per_head" or (config.heads == "auto" and same_heads)
        if config.mode == "relations":
            for role, cfg in (("teacher", teacher_cfg), ("student", student_cfg)):
                head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
                kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
                for width in {cfg.num_attention_heads * head_dim, kv_heads * head_dim}:
                    if width % config.relation_heads:
                        raise ConfigError(
                            f"{context.config_path}.relation_heads: {config.relation_heads} does not divide the "
                            f"{role}'s q/k/v width {width}"
                        )

    def _request(self, index: int) -> TapRequest:
        return TapRequest(attention={pair[index] for pair in self.layer_map})

    def teacher_request(self) -> TapRequest:
        return self._request(1)

    def student_request(self) -> TapRequest:
        return self._request(0)

    def _layer_terms(self, teacher: QKV, student: QKV) -> Tensor:
        """Per-query KL ``[B, S]`` for one mapped layer pair."""
        allowed = student.allowed()
        if self.config.mode == "relations":
            terms = []
            for rel in self.config.relations:
                pick = {"qq": "query", "kk": "key", "vv": "value"}[rel]
                t = self_relation_logp(getattr(teacher, pick), self.config.relation_heads, allowed)
                s = self_relation_logp(getattr(student, pick), self.config.relation_heads, allowed)
                terms.append(kl_divergence(t, s).mean(1))
            return torch.stack(terms).sum(0)
        t_logp, s_logp = key_logprobs(teacher), key_logprobs(student)
        if self.per_head:
            kl = kl_divergence(t_logp, s_logp).mean(1)
        else:  # compare head-averaged distributions
            t_avg = t_logp.exp().mean(1, keepdim=True).clamp_min(1e-30).log()
            s_avg = s_logp.exp().mean(1, keepdim=True).clamp_min(1e-30).log()
            kl = kl_divergence(t_avg.masked_fill(~allowed, float("-inf")), s_avg).squeeze(1)
        if self.config.value_relation:
            t = self_relation_logp(teacher.value, 1, allowed)
            s = self_relation_logp(student.value, 1, allowed)
            kl = kl + kl_divergence(t, s).squeeze(1)
        return kl

    def loss(self, batch: dict[str, Tensor], teacher: ModelView | None, student: ModelView | None, state: StepState) -> dict[str, Tensor]:
        assert student is not None and teacher is not None
        mask = batch["loss_mask"].float()
        pair_sums = {
            (s, t): (self._layer_terms(teacher.attention[t], student.attention[s]) * mask).sum() for s, t in self.layer_map
        }
        total = torch.stack(list(pair_sums.values())).sum()
        terms = {"attention": total / (len(self.layer_map) * max(state.tokens, 1))}
        if self.config.log_layers:
            terms.update(layer_metrics("attention", pair_sums, mask))
        return terms


@hookimpl
def hkd_add_stages() -> list[StageSpec]:
    return [
        StageSpec(
            "attention", AttentionStageConfig, AttentionStage, "KL between attention maps or q/k/v relations", "structural"
        )
    ]
