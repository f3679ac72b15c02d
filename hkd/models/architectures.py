"""Which architectures hkd's taps reproduce exactly, and the per-model facts the taps need.

hkd computes attention maps from the q/k/v a model hands to its attention function, and the
fused logits loss computes logits as ``final_hidden @ head.weight`` without calling the
model's head. Both are only right if they redo the model's own maths: attention soft-capping
(Gemma 2), sliding windows (Mistral, Gemma 2/3, Qwen, gpt-oss, ModernBERT), attention sinks
(gpt-oss), final-logit soft-capping (Gemma 2). :data:`SUPPORT` lists the model types for
which ``tests/test_architectures.py`` checks, on tiny random configs at realistic logit
scale, that tapped attention maps equal eager ``output_attentions``, tapped hidden states
equal ``output_hidden_states`` and fused logits equal the model's own logits. A model type
missing from the table, or a capability the table marks unsupported, is refused by name
(:func:`check_supported`) instead of approximated. The support table of docs/stages.md is
:func:`support_table`'s output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hkd.errors import HkdError

if TYPE_CHECKING:  # an annotation only: importing transformers costs seconds at start-up
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class Support:
    """What hkd reproduces for one ``config.model_type``."""

    attention: bool  # attention maps from tapped q/k/v equal the model's own
    hidden: bool  # hidden states and the final hidden state (LM-head input)
    fused_logits: bool  # ``final_hidden @ head.weight (+ bias)``, soft-capped as the model does, equals its logits
    notes: str = ""
    packing: bool = False  # data.packing: the model's mask honours per-example position ids (block-diagonal)


ENCODER_HEAD = "encoder: the MLM head transforms the hidden state before its projection, so no logits stages"

# Verified by tests/test_architectures.py (one tiny config per entry); keep the two in step.
SUPPORT: dict[str, Support] = {
    "llama": Support(True, True, True, "GQA", packing=True),
    "mistral": Support(True, True, True, "sliding window on every layer", packing=True),
    "qwen2": Support(True, True, True, "sliding-window layers (layer_types)", packing=True),
    "qwen3": Support(True, True, True, "q/k RMSNorm per head (recorded after the norm); sliding-window layers", packing=True),
    "gemma2": Support(True, True, True, "attention logit soft-capping, final-logit soft-capping, "
                                         "query_pre_attn_scalar, alternating sliding window; runs eager (no SDPA)", packing=True),
    "gemma3_text": Support(True, True, True, "q/k norm, query_pre_attn_scalar, sliding-window layers; "
                                              "final-logit soft-capping when configured", packing=True),
    "phi3": Support(True, True, True, "fused qkv projection; sliding window", packing=True),
    "olmo": Support(True, True, True, "q/k/v clipping (clip_qkv, recorded after it)", packing=True),
    "olmo2": Support(True, True, True, "q/k RMSNorm over all heads (recorded after the norm)", packing=True),
    "gpt_oss": Support(True, True, True, "attention sinks (in the softmax denominator; maps over keys sum to "
                                          "1 - p(sink)); sliding-window layers; runs eager (no SDPA); no packing "
                                          "(its mask ignores position ids in transformers 5.24)"),
    "gpt_neox": Support(True, True, True, "partial rotary, fused qkv; output head is `embed_out`", packing=True),
    "bert": Support(True, True, False, ENCODER_HEAD),
    "roberta": Support(True, True, False, ENCODER_HEAD),
    "distilbert": Support(True, True, False, ENCODER_HEAD),
    "modernbert": Support(True, True, False, "local (sliding, bidirectional) attention layers; " + ENCODER_HEAD),
}

# config keys that change a model's logits after its head and that hkd does not apply
_UNHANDLED_LOGIT_KEYS = ("logit_scale", "logits_scaling", "output_multiplier_scale", "logits_soft_cap")


def model_type(model: PreTrainedModel) -> str:
    return str(getattr(model.config, "model_type", "") or type(model).__name__)


def support(model: PreTrainedModel) -> Support | None:
    return SUPPORT.get(model_type(model))


def _refuse(model: PreTrainedModel, what: str) -> HkdError:
    verified = sorted(name for name, entry in SUPPORT.items() if getattr(entry, what))
    entry = support(model)
    reason = entry.notes if entry is not None else "this model type is not in hkd's verified table"
    return HkdError(
        f"{type(model).__name__} (model_type {model_type(model)!r}): hkd cannot reproduce its {what.replace('_', ' ')} "
        f"exactly ({reason}); verified model types: {', '.join(verified)} (hkd/models/architectures.py)"
    )


def check_supported(model: PreTrainedModel, *, attention: bool = False, logits: bool = False) -> None:
    """Raise :class:`HkdError` naming the architecture if hkd cannot reproduce what is asked."""
    entry = support(model)
    if attention and (entry is None or not entry.attention):
        raise _refuse(model, "attention")
    if logits:
        if entry is None or not entry.fused_logits:
            raise _refuse(model, "fused_logits")
        for key in _UNHANDLED_LOGIT_KEYS:
            if getattr(model.config, key, None) not in (None, 1, 1.0):
                raise HkdError(f"{type(model).__name__}: config.{key} rescales the logits and hkd does not apply it")


def logit_softcap(model: PreTrainedModel) -> float | None:
    """The model's final-logit soft-cap ``c`` (logits = c * tanh(logits / c)), or ``None``."""
    value = getattr(model.config, "final_logit_softcapping", None)
    return float(value) if value else None


def apply_logit_softcap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``c * tanh(logits / c)`` as Gemma 2 computes it; identity when ``softcap`` is ``None``."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def output_head(model: PreTrainedModel) -> torch.nn.Module | None:
    """The projection from the final hidden state to logits (``lm_head``, GPT-NeoX's ``embed_out``).

    ``None`` for bare encoders and for heads that transform the hidden state first (MLM heads):
    there ``final_hidden @ weight`` would not be the model's logits.
    """
    entry = support(model)
    if entry is not None and not entry.fused_logits:
        return None
    head = getattr(model, "lm_head", None)
    if head is None and entry is not None:
        head = model.get_output_embeddings()
    return head if isinstance(head, torch.nn.Linear) else None


def support_table() -> str:
    """The architecture table of docs/stages.md (markdown), from :data:`SUPPORT`."""
    mark = {True: "yes", False: "no"}
    rows = ["| architecture (`model_type`) | attention taps | hidden | fused logits | packing | notes |",
            "|---|---|---|---|---|---|"]
    for name, entry in SUPPORT.items():
        rows.append(f"| `{name}` | {mark[entry.attention]} | {mark[entry.hidden]} | {mark[entry.fused_logits]} "
                    f"| {mark[entry.packing]} | {entry.notes} |")
    return "\n".join(rows)
