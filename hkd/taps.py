"""Capture what the active stages ask for from one forward pass.

Hidden states come from ``output_hidden_states``. Attention maps are *computed* from the
query/key/value tensors each attention layer hands to its attention function: hkd registers
an attention implementation ``hkd_tap`` with transformers' ``AttentionInterface`` that
records q/k/v (after RoPE, before grouped-query expansion) for the requested layers and
then runs the model's original implementation (SDPA by default). So models keep their fast
attention, GQA and differing head counts work, and the maps carry gradients for the student.
The mask the model built (causal, padding, sliding window) is recorded too and reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hkd.models import decoder_body
from hkd.view import ModelView, TapRequest

TAP_IMPLEMENTATION = "hkd_tap"


@dataclass
class QKV:
    """One layer's attention inputs: q ``[B, Hq, S, d]``, k and v ``[B, Hkv, S, d]``."""

    query: Tensor
    key: Tensor
    value: Tensor
    mask: Tensor | None  # as the model built it: bool (True = attend) or additive float, [B, 1, S, S]
    scaling: float
    causal: bool

    def allowed(self) -> Tensor:
        """Boolean ``[B, 1, S, S]``: which key positions each query may attend to."""
        batch, _, seq, _ = self.query.shape
        if self.mask is None:
            full = torch.ones(seq, seq, dtype=torch.bool, device=self.query.device)
            allowed = torch.tril(full) if self.causal else full
            return allowed.expand(batch, 1, seq, seq)
        mask = self.mask[..., -seq:, -seq:]
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        # a query row with no allowed key (left padding) would give NaN: let it see every key;
        # such rows are padding and every stage masks them out
        return allowed | ~allowed.any(dim=-1, keepdim=True)

    def attention_logprobs(self) -> Tensor:
        """Per-head attention log-probabilities ``[B, Hq, S, S]`` (fp32), as the model computed them."""
        groups = self.query.shape[1] // self.key.shape[1]
        key = self.key.repeat_interleave(groups, dim=1) if groups > 1 else self.key
        scores = torch.matmul(self.query.float(), key.float().transpose(-1, -2)) * self.scaling
        return scores.masked_fill(~self.allowed(), float("-inf")).log_softmax(dim=-1)


def _tap_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kwargs: Any):
    store = getattr(module, "_hkd_tap_store", None)
    if store is not None:
        store[int(module.layer_idx) + 1] = QKV(  # type: ignore[arg-type]
            query, key, value, attention_mask, float(kwargs.get("scaling") or query.shape[-1] ** -0.5),
            bool(getattr(module, "is_causal", True)),
        )
    inner: Any = AttentionInterface._global_mapping[getattr(module, "_hkd_inner_attention", "sdpa")]
    return inner(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(TAP_IMPLEMENTATION, _tap_attention)
AttentionMaskInterface.register(TAP_IMPLEMENTATION, sdpa_mask)


def _attention_modules(model: PreTrainedModel) -> dict[int, torch.nn.Module]:
    """Attention modules by 1-based block index (the modules that call the attention interface)."""
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and hasattr(module, "config") and any(
            hasattr(module, name) for name in ("q_proj", "query", "qkv_proj", "c_attn")
        ):
            found[idx + 1] = module
    return found


def enable_taps(model: PreTrainedModel) -> None:
    """Route the model's attention through ``hkd_tap`` (once; the original implementation still runs)."""
    current = model.config._attn_implementation
    if current == TAP_IMPLEMENTATION:
        return
    inner = current if current in AttentionInterface._global_mapping else "sdpa"
    for module in _attention_modules(model).values():
        module._hkd_inner_attention = inner  # type: ignore[assignment]
    model.set_attn_implementation(TAP_IMPLEMENTATION)


def forward_with_taps(model: PreTrainedModel, batch: dict[str, Tensor], request: TapRequest) -> ModelView:
    """Run the model body once and expose exactly what ``request`` names.

    The body (without LM head) runs so that the fused logits loss can use the final hidden
    state and LM-head weight without ever materialising ``[B, S, V]`` logits.
    """
    attention_modules = _attention_modules(model) if request.attention else {}
    store: dict[int, QKV] = {}
    for idx in request.attention:
        attention_modules[idx]._hkd_tap_store = store  # type: ignore[assignment]
    try:
        body = decoder_body(model)
        outputs = body(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=bool(request.hidden),
            use_cache=False,
        )
    finally:
        for idx in request.attention:
            attention_modules[idx]._hkd_tap_store = None  # type: ignore[assignment]
    final_hidden = outputs.last_hidden_state
    lm_head = getattr(model, "lm_head", None)
    logits = lm_head(final_hidden) if request.logits and lm_head is not None else None
    return ModelView(
        hidden_states=outputs.hidden_states if request.hidden else None,
        attention=store,
        logits=logits,
        final_hidden=final_hidden if request.final_hidden else None,
        lm_head=lm_head,
    )
