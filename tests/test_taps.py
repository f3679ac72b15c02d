import pytest
import torch

from hkd.models.loading import build_preset
from hkd import TapRequest
from hkd.models.taps import enable_taps, forward_with_taps


@pytest.mark.parametrize("preset,kv_heads", [("tiny-llama", 2), ("tiny-qwen2", 1), ("tiny-llama", 4)])
def test_attention_maps_from_sdpa_taps_match_eager_attention(preset, kv_heads):
    """Maps computed from captured q/k under SDPA equal the eager implementation's probabilities."""
    model = build_preset(preset, {"num_key_value_heads": kv_heads, "num_hidden_layers": 2}, seed=0).eval()
    ids = torch.randint(4, 99, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding in row 1
    enable_taps(model)
    assert model.config._attn_implementation == "hkd_tap"
    view = forward_with_taps(model, {"input_ids": ids, "attention_mask": mask}, TapRequest(attention={1, 2}, hidden={0, 2}))
    model.set_attn_implementation("eager")
    eager = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    for layer in (1, 2):
        probs = view.attention[layer].attention_logprobs().exp()
        real = mask.bool()
        torch.testing.assert_close(probs[0], eager.attentions[layer - 1][0], atol=1e-5, rtol=1e-4)
        # padded query rows differ by convention; compare the real ones
        torch.testing.assert_close(probs[1][:, real[1]], eager.attentions[layer - 1][1][:, real[1]], atol=1e-5, rtol=1e-4)
    assert len(view.hidden_states) == 3 and view.logits is None


def test_taps_keep_the_model_output_unchanged():
    model = build_preset("tiny-llama", {"num_hidden_layers": 2}, seed=0).eval()
    ids = torch.randint(4, 99, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    before = model(**batch).logits
    enable_taps(model)
    view = forward_with_taps(model, batch, TapRequest(attention={1}, logits=True))
    torch.testing.assert_close(view.logits, before)
    assert set(view.attention) == {1}


def test_student_attention_carries_gradients():
    model = build_preset("tiny-llama", {"num_hidden_layers": 1}, seed=0)
    enable_taps(model)
    ids = torch.randint(4, 99, (1, 5))
    view = forward_with_taps(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, TapRequest(attention={1}))
    view.attention[1].attention_logprobs().exp()[..., 0].sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_taps_keep_a_model_on_its_own_eager_attention():
    """Catches: the tap swapping an eager model's attention for SDPA (for Gemma 2 and gpt-oss that silently
    drops soft-capping and sinks); eager must get its own additive mask, never SDPA's skipped one (None)."""
    model = build_preset("tiny-llama", {"num_hidden_layers": 2}, seed=0).eval()
    model.set_attn_implementation("eager")
    ids = torch.randint(4, 99, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        before = model(**batch, output_attentions=True)
        enable_taps(model)
        view = forward_with_taps(model, batch, TapRequest(attention={1, 2}, logits=True))
    torch.testing.assert_close(view.logits, before.logits)
    assert view.attention[1].mask is not None and view.attention[1].mask.dtype == torch.float32  # eager's own format
    torch.testing.assert_close(view.attention[2].attention_logprobs().exp(), before.attentions[1], atol=1e-5, rtol=1e-4)


def test_allowed_rebuilds_window_and_padding_from_flags():
    """Catches: a 2-D padding mask or no mask (flash kernels take the pattern from flags) read as a
    4-D mask, or the sliding window lost when the mask carries no pattern."""
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    from hkd.models.taps import QKV

    batch, seq, window = 2, 9, 3
    padding = torch.ones(batch, seq, dtype=torch.bool)
    padding[1, 6:] = False
    full = sdpa_mask(batch_size=batch, q_length=seq, kv_length=seq, attention_mask=padding,
                     mask_function=sliding_window_causal_mask_function(window), allow_is_causal_skip=False)
    q = torch.randn(batch, 2, seq, 4)
    as_4d = QKV(q, q, q, full, scaling=0.5, causal=True, sliding_window=window)
    as_2d = QKV(q, q, q, padding, scaling=0.5, causal=True, sliding_window=window)
    real = padding[:, None, :, None]  # compare real query rows (fully masked rows are opened on purpose)
    assert torch.equal(as_4d.allowed() & real, as_2d.allowed() & real)
    assert not as_2d.allowed()[0, 0, 8, :6].any()  # the window


def test_a_copy_of_a_tapped_model_keeps_its_own_attention():
    """Catches: a deep copy (new config objects) of a tapped eager model falling back to SDPA, which for
    gpt-oss silently drops the sinks; the copy either refuses or, after enable_taps, matches."""
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM

    from hkd.errors import HkdError

    config = AutoConfig.for_model("gpt_oss", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2,
                                  num_experts_per_tok=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 4.0)
    ids = torch.randint(3, 99, (1, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        before = model(**batch).logits
        enable_taps(model)
        twin = copy.deepcopy(model)
        with pytest.raises(HkdError, match="enable_taps"):
            forward_with_taps(twin, batch, TapRequest(logits=True))
        enable_taps(twin)
        torch.testing.assert_close(forward_with_taps(twin, batch, TapRequest(logits=True)).logits, before)
