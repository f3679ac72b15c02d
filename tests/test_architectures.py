"""Coverage of the architectures people distil: taps and fused logits equal each model's own maths.

One tiny random config per model type in :data:`hkd.models.architectures.SUPPORT` (2 layers, width
32, vocab 100), with query/key and output-head weights scaled up so attention scores and
logits reach realistic magnitudes (tens to hundreds) where soft-capping changes the result.
The reference is the same model under eager attention with ``output_attentions``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel

from hkd.models.architectures import SUPPORT, apply_logit_softcap, output_head, support_table
from hkd.errors import HkdError
from hkd.models.taps import QKV, TapRequest, enable_taps, forward_with_taps

_COMMON = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(_COMMON, num_key_value_heads=2, max_position_embeddings=64)
WINDOW = 4  # shorter than the sequence, so sliding-window layers differ from full ones

CONFIGS: dict[str, dict[str, Any]] = {
    "llama": _DECODER,
    "mistral": dict(_DECODER, sliding_window=WINDOW),
    "qwen2": dict(_DECODER, use_sliding_window=True, sliding_window=WINDOW,
                  layer_types=["sliding_attention", "full_attention"]),
    "qwen3": dict(_DECODER, head_dim=16, use_sliding_window=True, sliding_window=WINDOW,
                  layer_types=["sliding_attention", "full_attention"]),
    "gemma2": dict(_DECODER, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(_DECODER, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
                        layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0),
    "phi3": dict(_DECODER, sliding_window=WINDOW),
    "olmo": dict(_DECODER, clip_qkv=8.0),
    "olmo2": _DECODER,
    "gpt_oss": dict(_DECODER, head_dim=16, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
                    layer_types=["sliding_attention", "full_attention"]),
    "gpt_neox": dict(_COMMON, rotary_pct=0.5),
    "bert": _COMMON,
    "roberta": dict(_COMMON, pad_token_id=1, max_position_embeddings=64),
    "distilbert": dict(vocab_size=100, dim=32, hidden_dim=64, n_layers=2, n_heads=4, pad_token_id=0),
    "modernbert": dict(_COMMON, global_attn_every_n_layers=2, local_attention=WINDOW, cls_token_id=1,
                       sep_token_id=2),
}
ENCODERS = {"bert", "roberta", "distilbert", "modernbert"}
_QK_WEIGHTS = ("q_proj.", "k_proj.", "query.", "key.", "q_lin.", "k_lin.", "Wqkv.", "query_key_value.", "qkv_proj.")


def tiny_model(model_type: str, seed: int = 0) -> PreTrainedModel:
    """A tiny random model at realistic scale: attention scores and logits in the tens to hundreds."""
    config = AutoConfig.for_model(model_type, **CONFIGS[model_type])
    torch.manual_seed(seed)
    model = (AutoModel if model_type in ENCODERS else AutoModelForCausalLM).from_config(config).eval()
    gemma = model_type.startswith("gemma")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in _QK_WEIGHTS) and name.endswith("weight"):
                param.mul_(50.0 if model_type == "gemma2" else 12.0)  # Gemma 2 caps scores at 50: go past it
            elif ("q_norm" in name or "k_norm" in name) and name.endswith("weight"):
                param.fill_(3.0) if gemma else param.mul_(4.0)  # Gemma's norms scale by (1 + weight)
            elif name.endswith("sinks"):
                param.normal_(0.0, 4.0)  # sinks that take a real share of each row
        head = output_head(model)
        if head is not None:
            head.weight.mul_(2000.0)  # logits of a few hundred: Gemma's cap of 30 bites
    return model


def batch_for(seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding in row 1
    return {"input_ids": ids, "attention_mask": mask}


def assert_maps_equal(tapped: torch.Tensor, eager: torch.Tensor, mask: torch.Tensor) -> None:
    # padded query rows differ by convention (every stage masks them out); compare the real ones
    for row in range(mask.shape[0]):
        real = mask[row].bool()
        tapped_row, eager_row = tapped[row][:, real], eager[row][:, real].float()
        torch.testing.assert_close(tapped_row, eager_row, atol=2e-5, rtol=1e-4)
        # and in nats where the model gives a key non-negligible mass (soft-capping errors are tens of nats)
        kept = eager_row > 1e-6
        torch.testing.assert_close(tapped_row[kept].log(), eager_row[kept].log(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("model_type", list(SUPPORT))
def test_taps_and_fused_logits_reproduce_the_model(model_type: str) -> None:
    """Catches: soft-capping ignored in maps or logits (Gemma 2), sliding windows dropped, sinks left out of
    the softmax (gpt-oss), q/k recorded before q/k norms (Qwen3, OLMo 2), the tap swapping a model's eager
    attention for SDPA (changes Gemma 2 / gpt-oss outputs), and a head other than ``lm_head`` (GPT-NeoX)."""
    entry = SUPPORT[model_type]
    model = tiny_model(model_type)
    batch = batch_for()
    enable_taps(model)
    assert model.config._attn_implementation == "hkd_tap"
    request = TapRequest(attention={1, 2}, hidden={0, 1, 2}, final_hidden=True, logits=entry.fused_logits)
    with torch.no_grad():
        view = forward_with_taps(model, batch, request)
        model.set_attn_implementation("eager")
        eager = model(**batch, output_attentions=True, output_hidden_states=True)

    for layer in (1, 2):
        assert_maps_equal(view.attention[layer].attention_logprobs().exp(), eager.attentions[layer - 1], batch["attention_mask"])
    assert view.hidden_states is not None
    assert len(view.hidden_states) == len(eager.hidden_states) == 3
    # padding positions whose every key is masked (ModernBERT's local layers) differ between the model's own
    # SDPA and eager runs; compare real tokens
    real = batch["attention_mask"].bool()
    for tapped, own in zip(view.hidden_states, eager.hidden_states):
        torch.testing.assert_close(tapped[real], own[real], atol=1e-4, rtol=1e-4)
    assert view.final_hidden is not None
    torch.testing.assert_close(view.final_hidden[real], eager.hidden_states[-1][real], atol=1e-4, rtol=1e-4)

    if not entry.fused_logits:
        assert view.lm_head is None  # an MLM head transforms first: W @ h would not be the logits
        with pytest.raises(HkdError, match=type(model).__name__):
            forward_with_taps(model, batch, TapRequest(logits=True))
        return
    assert view.lm_head is not None
    fused = apply_logit_softcap(torch.nn.functional.linear(view.final_hidden, view.lm_head.weight, view.lm_head.bias),
                                view.logit_softcap)
    scale = eager.logits.abs().max()
    assert scale > 20  # realistic scale, else a missing soft-cap would hide inside the tolerance
    torch.testing.assert_close(fused, eager.logits, atol=1e-5 * float(scale), rtol=1e-4)
    torch.testing.assert_close(view.logits, eager.logits, atol=1e-5 * float(scale), rtol=1e-4)


def _without(qkv: QKV, **changes: Any) -> torch.Tensor:
    fields = {name: getattr(qkv, name) for name in qkv.__dataclass_fields__}
    return QKV(**{**fields, **changes}).attention_logprobs().exp()


@pytest.mark.parametrize("model_type,layer,feature", [
    ("gemma2", 1, "softcap"), ("gemma2", 2, "softcap"), ("gpt_oss", 1, "sinks"), ("gpt_oss", 2, "sinks"),
    ("mistral", 1, "window"), ("qwen2", 1, "window"), ("gemma3_text", 1, "window"), ("modernbert", 2, "window"),
])
def test_the_coverage_test_is_sensitive_to_each_feature(model_type: str, layer: int, feature: str) -> None:
    """Guards the test above: at these scales, leaving a feature out moves the maps far beyond its tolerance."""
    model = tiny_model(model_type)
    enable_taps(model)
    with torch.no_grad():
        qkv = forward_with_taps(model, batch_for(), TapRequest(attention={layer})).attention[layer]
    full = qkv.attention_logprobs().exp()
    if feature == "window":
        assert qkv.mask is not None
        unwindowed = torch.ones_like(qkv.allowed())
        if qkv.causal:
            unwindowed = unwindowed.tril()
        assert (qkv.allowed() != unwindowed).any()  # the recorded mask carries the window
        return
    changed = _without(qkv, softcap=None) if feature == "softcap" else _without(qkv, sinks=None)
    kept = full > 1e-6
    assert (full[kept].log() - changed[kept].log()).abs().max() > 1.0  # nats; the coverage test allows 1e-3


def test_gemma2_logits_are_soft_capped() -> None:
    """Catches: full logits as ``lm_head(final_hidden)`` without Gemma 2's final soft-cap (hundreds vs <= 30)."""
    model = tiny_model("gemma2")
    enable_taps(model)
    with torch.no_grad():
        view = forward_with_taps(model, batch_for(), TapRequest(logits=True, final_hidden=True))
    assert view.logit_softcap == 30.0 and view.logits is not None and view.final_hidden is not None
    assert view.logits.abs().max() <= 30.0
    assert view.lm_head is not None and (view.final_hidden @ view.lm_head.weight.T).abs().max() > 60.0


def test_an_unverified_architecture_is_refused_by_name() -> None:
    """Catches: silently approximating maps or logits of a model whose maths hkd has not checked."""
    config = AutoConfig.for_model("phi", **dict(_COMMON, max_position_embeddings=64))
    model = AutoModelForCausalLM.from_config(config).eval()
    enable_taps(model)
    assert model.config._attn_implementation != "hkd_tap"  # left untouched
    batch = batch_for()
    for request in (TapRequest(attention={1}), TapRequest(logits=True), TapRequest(final_hidden=True)):
        with pytest.raises(HkdError, match=r"PhiForCausalLM \(model_type 'phi'\)"):
            forward_with_taps(model, batch, request)
    view = forward_with_taps(model, batch, TapRequest(hidden={0, 2}))  # the model's own hidden states still work
    assert view.hidden_states is not None and len(view.hidden_states) == 3


def test_the_docs_have_the_support_table() -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "stages.md").read_text()
    assert support_table() in page, "regenerate the table in docs/stages.md: python -c 'from hkd.models.architectures import support_table; print(support_table())'"


@pytest.mark.parametrize("model_type", list(SUPPORT))
def test_packed_sequences_reproduce_each_example_alone(model_type: str) -> None:
    """Catches: an architecture whose mask ignores per-example position ids (data.packing; gpt-oss in
    transformers 5.24), so one example attends to the previous one: where the table says packing works, the
    packed logits and maps equal each example run alone; elsewhere packed batches are refused by name."""
    model = tiny_model(model_type)
    enable_taps(model)
    lengths = [5, 7, 4]  # longer than the sliding window, so windows and boundaries interact
    ids = torch.randint(3, 100, (1, sum(lengths)), generator=torch.Generator().manual_seed(3))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    packed_batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": positions}
    if not SUPPORT[model_type].packing:
        with pytest.raises(HkdError, match=f"{type(model).__name__}.*packed sequences"):
            forward_with_taps(model, packed_batch, TapRequest(hidden={1}))
        return
    request = TapRequest(attention={1, 2}, logits=True)
    with torch.no_grad():
        packed = forward_with_taps(model, packed_batch, request)
        start = 0
        for n in lengths:
            piece = ids[:, start:start + n]
            alone = forward_with_taps(model, {"input_ids": piece, "attention_mask": torch.ones_like(piece)}, request)
            scale = float(alone.logits.abs().max())
            torch.testing.assert_close(packed.logits[:, start:start + n], alone.logits, atol=1e-5 * scale, rtol=1e-4)
            for layer in (1, 2):
                maps = packed.attention[layer].attention_logprobs().exp()[0, :, start:start + n]
                torch.testing.assert_close(maps[..., start:start + n], alone.attention[layer].attention_logprobs().exp()[0],
                                           atol=2e-5, rtol=1e-4)
                assert maps[..., :start].sum() == 0 and maps[..., start + n:].sum() == 0
            start += n
