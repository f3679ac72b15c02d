"""Feature stage: align mapped hidden states, through learned projectors when widths differ.

Per token: ``mse`` = mean over features of (P h_s - h_t)^2, ``cosine`` = 1 - cos(P h_s, h_t),
``nmse`` = ||P h_s - h_t||^2 divided by the teacher layer's mean ||h_t||^2 over the batch's real
tokens (detached), where P is a linear projector student_width -> teacher_width (identity when
widths match and ``projector: auto``).

Hidden-state norms differ by orders of magnitude across layers (BERT's embedding output is
near unit scale per feature, its last blocks much larger; a pre-norm decoder's residual stream
grows with depth), so with plain ``mse`` the mean over mapped pairs is dominated by the layers
with the largest norms. ``nmse`` puts every pair on the same scale (1.0 = predicting zeros);
``normalize: layernorm`` applies a parameter-free LayerNorm to both sides before the loss. Projectors are this stage's parameters: they train with the
student and are saved in checkpoints. Layer 0 (embeddings) can be mapped too.

The stage loss is the mean over mapped pairs, or with ``layer_weights`` (one non-negative
weight per pair, in layer-map order) the weighted mean ``sum w_i L_i / sum w_i``. Under AdamW a
constant factor on the whole stage cancels, but the weights still decide how the student's
shared lower blocks split their update between the intermediate targets and the last one
(bench/layer_analysis.py measures that split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hkd import ConfigError, ModelView, Stage, StageContext, StageSpec, StepState, TapRequest, hookimpl
from hkd import LayerMapConfig, build_layer_map, layer_metrics
from hkd import ranged


@dataclass
class HiddenStageConfig:
    loss: Literal["mse", "cosine", "nmse"] = "mse"  # per token: MSE, 1 - cos, or MSE over the teacher layer's mean squared norm (nmse)
    normalize: Literal["none", "layernorm"] = "none"  # layernorm: per-token LayerNorm (no affine) on both sides
    projector: Literal["auto", "linear", "none"] = "auto"  # auto: linear only when widths differ
    include_embeddings: bool = False  # also map the embedding outputs (layer 0 to layer 0)
    layer_map: LayerMapConfig = field(default_factory=lambda: LayerMapConfig(strategy="auto"))  # which student layer learns from which teacher layer
    log_layers: bool = False  # diagnostic: log each mapped pair's loss as metric/layer/hidden/<s>_<t>
    layer_weights: list[float] | None = ranged(None, low=0, high=1e6)  # one weight per mapped pair (layer-map order); None: equal


class HiddenStage(Stage):
    def __init__(self, config: HiddenStageConfig, context: StageContext) -> None:
        super().__init__()
        self.config = config
        assert context.teacher is not None
        t_cfg, s_cfg = context.teacher.config, context.student.config
        self.layer_map = build_layer_map(
            config.layer_map.strategy,
            s_cfg.num_hidden_layers,
            t_cfg.num_hidden_layers,
            pairs=config.layer_map.pairs,
            include_embeddings=config.include_embeddings,
            where=f"{context.config_path}.layer_map",
            student_dir=getattr(context.student.config, "name_or_path", None),  # init/auto: a cut student's hkd-init.json
        )
        self.pair_weights = pair_weights(config.layer_weights, self.layer_map, f"{context.config_path}.layer_weights")
        # a buffer (moved with the stage, not saved): made once, not copied to the device every step
        self.weights: Tensor
        self.register_buffer("weights", torch.tensor(self.pair_weights, device=next(context.student.parameters()).device),
                             persistent=False)
        widths_differ = s_cfg.hidden_size != t_cfg.hidden_size
        if config.projector == "none" and widths_differ:
            raise ConfigError(
                f"{context.config_path}.projector: 'none' needs equal widths, student {s_cfg.hidden_size} vs "
                f"teacher {t_cfg.hidden_size}"
            )
        use_projector = config.projector == "linear" or (config.projector == "auto" and widths_differ)
        self.projectors = nn.ModuleDict(
            {f"{s}_{t}": nn.Linear(s_cfg.hidden_size, t_cfg.hidden_size, bias=False) for s, t in self.layer_map}
            if use_projector
            else {}
        )

    def teacher_request(self) -> TapRequest:
        return TapRequest(hidden={t for _, t in self.layer_map})

    def student_request(self) -> TapRequest:
        return TapRequest(hidden={s for s, _ in self.layer_map})

    def loss(self, batch: dict[str, Tensor], teacher: ModelView | None, student: ModelView | None, state: StepState) -> dict[str, Tensor]:
        assert student is not None and teacher is not None
        assert teacher.hidden_states is not None and student.hidden_states is not None
        mask = batch["loss_mask"].float()
        pair_sums: dict[tuple[int, int], Tensor] = {}
        for s, t in self.layer_map:
            s_hidden, t_hidden = student.hidden_states[s], teacher.hidden_states[t]
            assert s_hidden is not None and t_hidden is not None  # requested: a source fills these
            s_hidden, t_hidden = s_hidden.float(), t_hidden.float()
            key = f"{s}_{t}"
            if key in self.projectors:
                s_hidden = self.projectors[key](s_hidden)
            if self.config.normalize == "layernorm":
                s_hidden = F.layer_norm(s_hidden, s_hidden.shape[-1:])
                t_hidden = F.layer_norm(t_hidden, t_hidden.shape[-1:])
            if self.config.loss == "mse":
                per_token = (s_hidden - t_hidden).pow(2).mean(-1)
            elif self.config.loss == "nmse":
                scale = (t_hidden.detach().pow(2).sum(-1) * mask).sum() / mask.sum().clamp_min(1)
                per_token = (s_hidden - t_hidden).pow(2).sum(-1) / scale.clamp_min(1e-12)
            else:
                per_token = 1 - F.cosine_similarity(s_hidden, t_hidden, dim=-1)
            pair_sums[(s, t)] = (per_token * mask).sum()
        stacked = torch.stack(list(pair_sums.values()))
        weights = self.weights.to(stacked.dtype)
        terms = {"hidden": (stacked * weights).sum() / (weights.sum() * max(state.tokens, 1))}
        if self.config.log_layers:
            terms.update(layer_metrics("hidden", pair_sums, mask))
        return terms


def pair_weights(weights: list[float] | None, layer_map: list[tuple[int, int]], where: str) -> list[float]:
    """One finite non-negative weight per mapped pair, not all zero; equal weights when none are given."""
    if weights is None:
        return [1.0] * len(layer_map)
    pairs = ", ".join(f"{s}->{t}" for s, t in layer_map)
    if len(weights) != len(layer_map):
        raise ConfigError(f"{where}: {len(weights)} weight(s) for {len(layer_map)} mapped pair(s) ({pairs}); "
                          "give one per pair, in this order")
    for index, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"{where}[{index}]: expected a finite number >= 0, got {weight!r}")
    if not any(weights):
        raise ConfigError(f"{where}: every weight is 0; at least one pair ({pairs}) must count")
    return [float(w) for w in weights]


@hookimpl
def hkd_add_stages() -> list[StageSpec]:
    return [StageSpec("hidden", HiddenStageConfig, HiddenStage, "MSE/normalised MSE/cosine between mapped hidden states", "feature")]
