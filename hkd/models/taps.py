"""Capture what the active stages ask for from one forward pass.

Hidden states come from ``output_hidden_states``. Attention maps are *computed* from the
query/key/value tensors each attention layer hands to its attention function: hkd registers
an attention implementation ``hkd_tap`` with transformers' ``AttentionInterface`` that
records q/k/v (after RoPE and any q/k norm or clipping, before grouped-query expansion) for
the requested layers, together with everything else the model passes to its attention
function (scaling, soft-cap, sliding window, sinks), and then runs the model's original
implementation (SDPA, or the model's own eager function for models such as Gemma 2 and
gpt-oss whose maths SDPA cannot do). So models keep their fast attention, GQA and differing
head counts work, and the maps carry gradients for the student. The mask is built by the
original implementation's mask function and recorded too.

Only architectures in :data:`hkd.models.architectures.SUPPORT` are routed through the tap; asking
any other model for attention maps or logits raises an error naming it.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from hkd.models.architectures import SUPPORT, apply_logit_softcap, check_supported, logit_softcap, output_head, support
from hkd.errors import HkdError
from hkd.models.loading import decoder_body, num_layers
from hkd.models.view import ModelView, TapRequest

__all__ = ["QKV", "ModelView", "TapRequest", "TAP_IMPLEMENTATION", "enable_taps", "forward_with_taps"]

TAP_IMPLEMENTATION = "hkd_tap"

# keyword arguments models pass to their attention function that do not change its maths here
_PASSTHROUGH_KWARGS = frozenset({
    "position_ids", "cache_position", "use_cache", "output_attentions", "output_hidden_states", "return_dict",
    "past_key_values", "position_embeddings", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
    "token_type_ids", "head_mask", "deterministic", "target_dtype",
})
_APPLIED_KWARGS = frozenset({"scaling", "dropout", "softcap", "sliding_window", "s_aux", "is_causal"})


@dataclass
class QKV:
    """One layer's attention inputs as the model passed them to its attention function.

    q ``[B, Hq, S, d]``, k and v ``[B, Hkv, S, d]``; ``mask`` as the model's attention
    implementation receives it (bool ``True`` = attend, or additive float, ``[B, 1, S, S]``; a
    2-D padding mask or ``None`` for implementations that take the pattern from flags);
    ``softcap``: attention-logit soft-cap (Gemma 2); ``sliding_window``: the layer's window
    (query ``i`` sees keys ``j > i - window``); ``sinks``: per-head sink logits ``[Hq]``
    (gpt-oss), which take part in the softmax denominator but attend to nothing;
    ``dropout``: the attention dropout the model applied (0 in eval; maps are pre-dropout).
    """

    query: Tensor
    key: Tensor
    value: Tensor
    mask: Tensor | None
    scaling: float
    causal: bool
    softcap: float | None = None
    sliding_window: int | None = None
    sinks: Tensor | None = None
    dropout: float = 0.0

    def allowed(self) -> Tensor:
        """Boolean ``[B, 1, S, S]``: which key positions each query may attend to."""
        batch, _, seq, _ = self.query.shape
        if self.mask is not None and self.mask.dim() == 4:
            mask = self.mask[..., -seq:, -seq:]
            allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        else:  # the pattern lives in flags (SDPA's is_causal, flash kernels' window): rebuild it
            positions = torch.arange(seq, device=self.query.device)
            distance = positions[:, None] - positions[None, :]
            allowed = torch.ones(seq, seq, dtype=torch.bool, device=self.query.device)
            if self.causal:
                allowed = distance >= 0
                if self.sliding_window is not None:
                    allowed = allowed & (distance < self.sliding_window)
            allowed = allowed.expand(batch, 1, seq, seq)
            if self.mask is not None:  # 2-D padding mask [B, S]
                allowed = allowed & self.mask[:, None, None, -seq:].bool()
        # a query row with no allowed key (left padding) would give NaN: let it see every key;
        # such rows are padding and every stage masks them out
        return allowed | ~allowed.any(dim=-1, keepdim=True)

    def attention_logits(self) -> Tensor:
        """Pre-softmax attention scores ``[B, Hq, S, S]`` (fp32): scaled, soft-capped as the model does."""
        groups = self.query.shape[1] // self.key.shape[1]
        key = self.key.repeat_interleave(groups, dim=1) if groups > 1 else self.key
        # fp32 also under bf16 autocast (which would run this matmul in bf16): the maps are compared by
        # KL, and bf16 scores put the errors of the rounding where the two models' maps differ
        with torch.autocast(self.query.device.type, enabled=False):
            scores = torch.matmul(self.query.float(), key.float().transpose(-1, -2)) * self.scaling
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        return scores.masked_fill(~self.allowed(), float("-inf"))

    def attention_logprobs(self) -> Tensor:
        """Per-head attention log-probabilities over keys ``[B, Hq, S, S]`` (fp32), as the model computed them.

        With sinks the rows sum to ``1 - p(sink)`` (the model's own ``output_attentions`` drops
        the sink column too); :meth:`sink_logprob` gives the missing mass.
        """
        scores = self.attention_logits()
        return scores - self._log_normaliser(scores)

    def sink_logprob(self) -> Tensor | None:
        """Log-probability ``[B, Hq, S, 1]`` each query gives its sink, or ``None`` without sinks."""
        if self.sinks is None:
            return None
        scores = self.attention_logits()
        return self._sink_scores(scores) - self._log_normaliser(scores)

    def _sink_scores(self, scores: Tensor) -> Tensor:
        assert self.sinks is not None
        return self.sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)

    def _log_normaliser(self, scores: Tensor) -> Tensor:
        if self.sinks is not None:
            scores = torch.cat([scores, self._sink_scores(scores)], dim=-1)
        return scores.logsumexp(dim=-1, keepdim=True)


# the implementation each tapped model ran before, by id of its config (the mask function only gets the
# config); the attention modules carry it too (``_hkd_inner_attention``), so a deep copy keeps it
_INNER: dict[int, str] = {}


def _remember_inner(config: Any, inner: str) -> None:
    if id(config) not in _INNER:
        weakref.finalize(config, _INNER.pop, id(config), None)
    _INNER[id(config)] = inner


def _inner_attention(module: torch.nn.Module) -> Callable[..., Any]:
    inner = getattr(module, "_hkd_inner_attention", None)
    if inner is None:
        raise HkdError(f"{type(module).__name__} runs the hkd tap without enable_taps(model)")
    if inner == "eager":  # each model's own eager function: it carries soft-capping, sinks, ...
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise HkdError(f"{type(module).__name__}: no eager_attention_forward next to it to run under the hkd tap")
        return eager  # type: ignore[no-any-return]
    implementation: Callable[..., Any] = AttentionInterface._global_mapping[inner]  # type: ignore[assignment]
    return implementation


def _tap_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kwargs: Any):
    store = getattr(module, "_hkd_tap_store", None)
    if store is not None:
        unknown = {k for k, v in kwargs.items() if v is not None} - _PASSTHROUGH_KWARGS - _APPLIED_KWARGS
        if unknown:  # something changes the attention maths that QKV does not model: never approximate
            raise HkdError(f"{type(module).__name__}: attention arguments {sorted(unknown)} are not reproduced by hkd's taps")
        sinks = kwargs.get("s_aux")
        store[module._hkd_tap_layer] = QKV(  # type: ignore[index]
            query, key, value, attention_mask,
            scaling=float(kwargs.get("scaling") or query.shape[-1] ** -0.5),
            causal=bool(kwargs.get("is_causal", getattr(module, "is_causal", True))),
            softcap=float(kwargs["softcap"]) if kwargs.get("softcap") else None,
            sliding_window=int(kwargs["sliding_window"]) if kwargs.get("sliding_window") else None,
            sinks=sinks if isinstance(sinks, Tensor) else None,
            dropout=float(kwargs.get("dropout") or 0.0),
        )
    return _inner_attention(module)(module, query, key, value, attention_mask, **kwargs)


def _tap_mask(*args: Any, config: Any = None, **kwargs: Any) -> Any:
    """The mask the original implementation would get (bool for SDPA, additive for eager, 2-D for flash)."""
    inner = _INNER.get(id(config))
    if inner is None:  # e.g. a deep copy of a tapped model: guessing could hand eager a boolean mask
        raise HkdError("a model runs the hkd tap without enable_taps(model) (a copy of a tapped model?): call it first")
    return ALL_MASK_ATTENTION_FUNCTIONS[inner](*args, config=config, **kwargs)


AttentionInterface.register(TAP_IMPLEMENTATION, _tap_attention)
AttentionMaskInterface.register(TAP_IMPLEMENTATION, _tap_mask)

_PROJECTIONS = ("q_proj", "query", "q_lin", "qkv_proj", "Wqkv", "query_key_value", "c_attn")


def _attention_modules(model: PreTrainedModel) -> dict[int, torch.nn.Module]:
    """Self-attention modules (those that call the attention function) by 1-based block index."""
    layers = num_layers(model)
    for candidate in model.modules():
        if isinstance(candidate, torch.nn.ModuleList) and len(candidate) == layers:
            found = {}
            for index, block in enumerate(candidate, start=1):
                found_here = next((m for m in block.modules() if any(hasattr(m, p) for p in _PROJECTIONS)), None)
                if found_here is None:
                    break
                found[index] = found_here
            else:
                return found
    raise HkdError(f"{type(model).__name__}: could not find its {layers} attention layers to tap")


def enable_taps(model: PreTrainedModel) -> None:
    """Route a supported model's attention through ``hkd_tap`` (once; the original implementation still runs).

    Models outside :data:`hkd.models.architectures.SUPPORT` are left untouched: hidden states still
    work, and :func:`forward_with_taps` refuses their attention maps by name.
    """
    current = model.config._attn_implementation
    entry = support(model)
    if current == TAP_IMPLEMENTATION:  # already tapped, or a copy of a tapped model: its configs are new objects
        current = next(m._hkd_inner_attention for m in _attention_modules(model).values())
        for module in model.modules():
            if hasattr(module, "config"):
                _remember_inner(module.config, current)  # type: ignore[arg-type]
        return
    if entry is None or not entry.attention:
        return
    if current != "eager" and current not in AttentionInterface._global_mapping:
        raise HkdError(f"{type(model).__name__}: attention implementation {current!r} cannot run under the hkd tap")
    for module in model.modules():
        if hasattr(module, "config"):
            _remember_inner(module.config, current)
    for index, module in _attention_modules(model).items():
        module._hkd_tap_layer = index  # type: ignore[assignment]
        module._hkd_inner_attention = current  # type: ignore[assignment]
    model.set_attn_implementation(TAP_IMPLEMENTATION)


def forward_with_taps(model: PreTrainedModel, batch: dict[str, Tensor], request: TapRequest) -> ModelView:
    """Run the model body once and expose exactly what ``request`` names.

    The body (without LM head) runs so that the fused logits loss can use the final hidden
    state and LM-head weight without ever materialising ``[B, S, V]`` logits. The view's
    ``logit_softcap`` is the model's final-logit soft-cap: logits are
    ``c * tanh(final_hidden @ W.T / c)`` when it is set (full ``logits`` here already are).
    """
    if request.attention:
        check_supported(model, attention=True)
        if model.config._attn_implementation != TAP_IMPLEMENTATION:
            raise HkdError(f"{type(model).__name__}: attention maps need enable_taps(model) first")
    head = output_head(model)
    if request.logits or (request.final_hidden and head is not None) or (
        request.final_hidden and support(model) is None and model.get_output_embeddings() is not None
    ):
        check_supported(model, logits=True)
    attention_modules = _attention_modules(model) if request.attention else {}
    store: dict[int, QKV] = {}
    for idx in request.attention:
        attention_modules[idx]._hkd_tap_store = store  # type: ignore[assignment]
    # a packed batch (data.packing) carries per-example position ids; without a 2-D mask,
    # transformers builds the block-diagonal mask from them
    packed = "position_ids" in batch
    if packed:
        entry = support(model)
        if entry is None or not entry.packing:
            raise HkdError(f"{type(model).__name__} (model_type {model.config.model_type!r}): packed sequences "
                           "(data.packing) would attend across examples; verified model types: "
                           f"{', '.join(name for name, e in SUPPORT.items() if e.packing)} (hkd/models/architectures.py)")
    try:
        body = decoder_body(model)
        positions = {"position_ids": batch["position_ids"]} if packed else {}  # DistilBERT takes none
        outputs = body(
            input_ids=batch["input_ids"],
            attention_mask=None if packed else batch["attention_mask"],
            output_hidden_states=bool(request.hidden),
            use_cache=False,
            **positions,
        )
    finally:
        for idx in request.attention:
            attention_modules[idx]._hkd_tap_store = None  # type: ignore[assignment]
    final_hidden = outputs.last_hidden_state
    softcap = logit_softcap(model)
    logits = apply_logit_softcap(head(final_hidden), softcap) if request.logits and head is not None else None
    return ModelView(
        hidden_states=outputs.hidden_states if request.hidden else None,
        attention=store,
        logits=logits,
        final_hidden=final_hidden if request.final_hidden else None,
        lm_head=head,
        logit_softcap=softcap,
    )
