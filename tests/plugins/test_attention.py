import math
from types import SimpleNamespace

import pytest
import torch

from hkd.config import ConfigError
from hkd.models.layermap import LayerMapConfig
from hkd.kernels.divergence import kl_divergence
from hkd import QKV, ModelView, StageContext, StepState
from hkd.plugins.attention import AttentionStage, AttentionStageConfig

from .helpers import batch, context, models, run_stage


@pytest.mark.parametrize("mode", ["maps", "relations"])
def test_identical_models_have_zero_loss(mode):
    teacher, student = models(same=True)
    stage = AttentionStage(AttentionStageConfig(mode=mode, value_relation=True, relation_heads=2), context(teacher, student))
    loss = run_stage(stage, teacher, student, batch())["attention"]
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_head_mismatch_is_averaged_and_trains_the_student():
    teacher, student = models({"num_attention_heads": 4, "num_key_value_heads": 2}, {"num_attention_heads": 2, "num_key_value_heads": 1})
    stage = AttentionStage(AttentionStageConfig(mode="maps"), context(teacher, student))
    assert not stage.per_head and stage.layer_map == [(1, 2), (2, 4)]
    b = batch()
    loss = run_stage(stage, teacher, student, b)["attention"]
    # catches: per-head KL or log-probabilities (not probabilities) averaged over heads, a pair of
    # the map skipped, the wrong normalisation (the old check was loss > 0)
    teacher.set_attn_implementation("eager")
    student.set_attn_implementation("eager")
    with torch.no_grad():
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "output_attentions": True}
        t_maps, s_maps = teacher(**inputs).attentions, student(**inputs).attentions
    expected = 0.0
    for s, t in [(1, 2), (2, 4)]:
        pt, ps = t_maps[t - 1].double().mean(1), s_maps[s - 1].double().mean(1)  # [B, S, S], heads averaged
        kl = torch.where(pt > 0, pt * (pt.log() - ps.clamp_min(1e-300).log()), 0.0).sum(-1)
        expected += float((kl * b["loss_mask"]).sum())
    # fp32 maps against an fp64 reference on a KL of ~2e-4: rel 1e-3 (every bug above is off by far more)
    assert loss.item() == pytest.approx(expected / (2 * int(b["loss_mask"].sum())), rel=1e-3)
    assert expected > 1e-3
    loss.backward()
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert teacher.model.layers[0].self_attn.q_proj.weight.grad is None


def fake_model(layers: int, heads: int, kv_heads: int, head_dim: int) -> SimpleNamespace:
    """Just the config fields the stage reads when it is built (the loss sees only the views)."""
    return SimpleNamespace(config=SimpleNamespace(num_hidden_layers=layers, num_attention_heads=heads,
                                                  num_key_value_heads=kv_heads, head_dim=head_dim,
                                                  hidden_size=heads * head_dim))


def random_qkv(gen: torch.Generator, heads: int, kv_heads: int, head_dim: int, padding: torch.Tensor) -> QKV:
    def rand(h: int) -> torch.Tensor:
        return torch.randn(padding.shape[0], h, padding.shape[1], head_dim, generator=gen, dtype=torch.float64).float()

    return QKV(rand(heads), rand(kv_heads), rand(kv_heads), mask=padding, scaling=head_dim**-0.5, causal=True)


def relation_logp64(x: torch.Tensor, relation_heads: int, padding: torch.Tensor) -> torch.Tensor:
    """MiniLMv2 self-relation by hand: heads concatenated, cut into ``relation_heads`` equal slices,
    ``log softmax(x_r x_r^T / sqrt(d_r))`` over the keys a causal query may see."""
    concat = torch.cat(list(x.double().unbind(1)), dim=-1)  # [B, S, H*d], head after head
    parts = torch.stack(concat.chunk(relation_heads, dim=-1), dim=1)  # [B, R, S, d_r]
    scores = torch.einsum("brie,brje->brij", parts, parts) / math.sqrt(parts.shape[-1])
    seq = x.shape[2]
    allowed = torch.ones(seq, seq).tril().bool() & padding.bool()[:, None, None, :]
    return scores.masked_fill(~allowed, float("-inf")).log_softmax(-1)


def kl64(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


# catches: heads split into relation slices in the wrong order (interleaved instead of contiguous),
# a missing or wrong 1/sqrt(d_r) scale, relation heads summed instead of averaged, a relation left
# out, the wrong layer of the map read, and normalising by the micro-batch's mask instead of state.tokens
@pytest.mark.parametrize("relation_heads", [2, 4])
@pytest.mark.parametrize("relations", [["qq", "kk", "vv"], ["kk"]])
def test_relations_match_a_hand_computed_minilmv2_loss(relation_heads, relations):
    # GQA on both sides, different head counts and head sizes: teacher 4 q / 2 kv heads of 6, student 2 / 1 of 8
    teacher, student = fake_model(4, 4, 2, 6), fake_model(2, 2, 1, 8)
    cfg = AttentionStageConfig(mode="relations", relation_heads=relation_heads, relations=relations,
                               layer_map=LayerMapConfig("explicit", [[1, 2], [2, 4]]))
    stage = AttentionStage(cfg, StageContext("x", teacher, student, {}, "stages.x"))
    gen = torch.Generator().manual_seed(0)
    padding = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    t_layers = {t: random_qkv(gen, 4, 2, 6, padding) for t in (1, 2, 3, 4)}  # every teacher layer differs
    s_layers = {s: random_qkv(gen, 2, 1, 8, padding) for s in (1, 2)}
    loss_mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    tokens = 9  # the whole step's count (several micro-batches), not this batch's 5
    got = stage.loss({"loss_mask": loss_mask}, ModelView(attention=t_layers), ModelView(attention=s_layers),
                     StepState(step=0, temperature=1.0, tokens=tokens))["attention"]

    expected = torch.zeros((), dtype=torch.float64)
    for s, t in [(1, 2), (2, 4)]:
        for rel in relations:
            pick = {"qq": "query", "kk": "key", "vv": "value"}[rel]
            log_t = relation_logp64(getattr(t_layers[t], pick), relation_heads, padding)
            log_s = relation_logp64(getattr(s_layers[s], pick), relation_heads, padding)
            expected += (kl64(log_t, log_s).mean(1) * loss_mask).sum()
    expected /= 2 * tokens
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() > 1e-2  # the tensors differ: a loss stuck at 0 cannot pass


# catches: relations computed per attention head instead of over the concatenated heads (then the
# same q/k/v split 4 x 4 and 2 x 8 would not match); identical relations must cost nothing
def test_relations_are_zero_when_the_concatenated_qkv_are_identical():
    teacher, student = fake_model(2, 4, 2, 4), fake_model(2, 2, 1, 8)
    stage = AttentionStage(AttentionStageConfig(mode="relations", relation_heads=2),
                           StageContext("x", teacher, student, {}, "stages.x"))
    gen = torch.Generator().manual_seed(1)
    padding = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    s_layers = {s: random_qkv(gen, 2, 1, 8, padding) for s in (1, 2)}

    def regroup(x: torch.Tensor, heads: int) -> torch.Tensor:  # same concatenation, other head count
        b, h, seq, d = x.shape
        return x.permute(0, 2, 1, 3).reshape(b, seq, heads, h * d // heads).permute(0, 2, 1, 3)

    t_layers = {s: QKV(regroup(v.query, 4), regroup(v.key, 2), regroup(v.value, 2), mask=padding, scaling=0.5,
                       causal=True) for s, v in s_layers.items()}
    loss_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    got = stage.loss({"loss_mask": loss_mask}, ModelView(attention=t_layers), ModelView(attention=s_layers),
                     StepState(step=0, temperature=1.0, tokens=5))["attention"]
    assert abs(got.item()) < 1e-6
    # and the stage does see a difference when the teacher's values change
    t_layers[2] = QKV(t_layers[2].query, t_layers[2].key, -t_layers[2].value.flip(2), mask=padding, scaling=0.5,
                      causal=True)
    changed = stage.loss({"loss_mask": loss_mask}, ModelView(attention=t_layers), ModelView(attention=s_layers),
                         StepState(step=0, temperature=1.0, tokens=5))["attention"]
    assert changed.item() > 1e-3


def test_loss_value_matches_a_hand_computed_kl_on_one_layer():
    teacher, student = models({"num_attention_heads": 4}, {"num_attention_heads": 4, "num_key_value_heads": 2})
    cfg = AttentionStageConfig(layer_map=LayerMapConfig("explicit", [[2, 4]]))
    stage = AttentionStage(cfg, context(teacher, student))
    b = batch()
    loss = run_stage(stage, teacher, student, b)["attention"]
    teacher.set_attn_implementation("eager")
    student.set_attn_implementation("eager")
    pt = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_attentions=True).attentions[3]
    ps = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_attentions=True).attentions[1]
    kl = (pt * (pt.clamp_min(1e-30).log() - ps.clamp_min(1e-30).log())).sum(-1).mean(1)  # [B, S]
    expected = (kl * b["loss_mask"]).sum() / b["loss_mask"].sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_row_kl_ignores_zero_mass_keys():
    t = torch.tensor([[0.5, 0.5, 0.0]]).log()
    s = torch.tensor([[0.25, 0.25, 0.5]]).log()
    assert kl_divergence(t, s).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())


def test_config_errors_name_the_key():
    teacher, student = models({"num_attention_heads": 4}, {"num_attention_heads": 2, "num_key_value_heads": 1})
    with pytest.raises(ConfigError, match=r"stages\.x\.heads: per_head needs equal head counts"):
        AttentionStage(AttentionStageConfig(heads="per_head"), context(teacher, student))
    with pytest.raises(ConfigError, match=r"stages\.x\.layer_map: student layer 3 is out of range"):
        AttentionStage(AttentionStageConfig(layer_map=LayerMapConfig("explicit", [[3, 1]])), context(teacher, student))
    with pytest.raises(ConfigError, match=r"stages\.x\.relation_heads: 3 does not divide"):
        AttentionStage(AttentionStageConfig(mode="relations", relation_heads=3), context(teacher, student))


def test_maps_with_attention_sinks_are_renormalised_over_keys():
    # catches: comparing gpt-oss rows that sum to 1 - p(sink) with a KL that assumes they sum to 1
    # (a student without sinks would then never match a teacher with them)
    from hkd.plugins.attention import key_logprobs
    from hkd.models.taps import QKV

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=gen) for _ in range(3))
    with_sinks = QKV(q, k, v, None, 0.5, True, sinks=torch.tensor([2.0, -1.0]))
    without = QKV(q, k, v, None, 0.5, True)
    assert with_sinks.attention_logprobs().exp().sum(-1).max() < 0.99  # the model's own rows
    torch.testing.assert_close(key_logprobs(with_sinks).exp().sum(-1), torch.ones(1, 2, 5))
    # the same scores without the sink are the same distribution over keys: KL 0
    torch.testing.assert_close(kl_divergence(key_logprobs(with_sinks), key_logprobs(without)),
                               torch.zeros(1, 2, 5), atol=1e-6, rtol=0)
