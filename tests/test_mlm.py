"""Masked-LM logit distillation (hkd/plugins/mlm.py) on tiny BertForMaskedLM models made here (no downloads)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import BertConfig, BertForMaskedLM

from hkd.config import ModelConfig, load_config
from hkd.data.encoding import collate, encode
from hkd.errors import ConfigError, HkdError
from hkd.train.loop import build_run, distill
from hkd.models.loading import build_preset, load_model, wordpiece_tokenizer
from hkd.plugins.mlm import MLMStage, MLMStageConfig, mask_generator, mask_tokens
from hkd.plugin.stage import StageContext, StepState

TEXTS = ["the teacher model encodes each sentence into hidden states",
         "a smaller student learns",
         "knowledge distillation transfers what a large network has learned into a compact one"]


def masked_lm(width: int, layers: int, seed: int) -> BertForMaskedLM:
    tok = wordpiece_tokenizer()
    config = BertConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                        num_attention_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return BertForMaskedLM(config).eval()  # eval: no dropout, so the fp64 reference sees the same function


@pytest.fixture(scope="module")
def pair():
    return masked_lm(48, 2, seed=1), masked_lm(32, 1, seed=2)


def mlm_context(teacher, student, **extra):
    return StageContext("mlm", teacher, student, {}, "stages.mlm", tokenizer=wordpiece_tokenizer(), teachers=[teacher],
                        **extra)


def bert_batch(texts=TEXTS):
    tok = wordpiece_tokenizer()
    return collate([encode(tok, "", text, 48) for text in texts], tok.pad_token_id, causal=False)


# --------------------------------------------------------------------------- masking


def synthetic_ids(rows=64, width=256):
    tok = wordpiece_tokenizer()
    specials = torch.tensor(tok.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tok)) if i not in set(tok.all_special_ids)])
    ids = ordinary[torch.randint(len(ordinary), (rows, width), generator=torch.Generator().manual_seed(5))]
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    attention = torch.ones_like(ids)
    attention[: rows // 2, width // 2:] = 0  # half the rows padded after the middle
    ids[attention == 0] = tok.pad_token_id
    return ids, attention, specials, tok


def corrupt(ids, attention, specials, tok, seed=0, step=0, micro=0, rate=0.15):
    return mask_tokens(ids, attention, specials, mask_id=tok.mask_token_id, vocab_size=len(tok), rate=rate,
                       mask_token=0.8, random_token=0.1, generator=mask_generator(seed, step, micro, 0))


def test_masks_follow_bert_80_10_10_and_skip_special_and_padding():
    """Catches: masking [CLS]/[SEP]/padding, a wrong split of the chosen tokens (e.g. all [MASK]), a wrong rate."""
    ids, attention, specials, tok = synthetic_ids()
    masked, chosen = corrupt(ids, attention, specials, tok)
    candidates = attention.bool() & ~torch.isin(ids, specials)
    assert not (chosen & ~candidates).any()
    assert torch.equal(masked[~chosen], ids[~chosen])  # nothing outside the targets changes
    n = int(chosen.sum())
    assert abs(n / int(candidates.sum()) - 0.15) < 0.01  # ~12k candidates: 3 sigma ~ 0.01
    as_mask = int((masked[chosen] == tok.mask_token_id).sum()) / n
    kept = int((masked[chosen] == ids[chosen]).sum()) / n
    other = 1 - as_mask - kept
    assert abs(as_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.025 and abs(other - 0.1) < 0.025


def test_masks_are_reproducible_per_seed_step_and_micro_batch():
    """Catches: masks drawn from the global RNG (a resumed run would mask differently) or the same mask every step."""
    ids, attention, specials, tok = synthetic_ids(8, 64)
    first = corrupt(ids, attention, specials, tok, seed=3, step=7, micro=1)
    torch.manual_seed(123)  # the global RNG must not matter
    again = corrupt(ids, attention, specials, tok, seed=3, step=7, micro=1)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    for other in ({"seed": 4, "step": 7, "micro": 1}, {"seed": 3, "step": 8, "micro": 1}, {"seed": 3, "step": 7, "micro": 0}):
        assert not torch.equal(corrupt(ids, attention, specials, tok, **other)[1], first[1]), other


# --------------------------------------------------------------------------- the loss


def reference_loss(models64, masked_ids, chosen, batch, temperature, alpha, rate, tokens):
    """fp64 by hand: log-softmax at T over the masked positions, KL(teacher || student) * T^2, CE at T = 1."""
    t_logits, s_logits = (model(input_ids=masked_ids, attention_mask=batch["attention_mask"]).logits[chosen]
                          for model in models64)
    p_t = (t_logits / temperature).log_softmax(-1)
    p_s = (s_logits / temperature).log_softmax(-1)
    kl = (p_t.exp() * (p_t - p_s)).sum(-1) * temperature ** 2
    ce = -s_logits.log_softmax(-1).gather(-1, batch["input_ids"][chosen][:, None])[:, 0]
    return ((1 - alpha) * kl + alpha * ce).sum() / (rate * tokens)


def test_loss_and_gradient_match_an_fp64_reference(pair):
    """Catches: KL in the wrong direction, the temperature or its T^2 missing, unmasked positions counted, the hard
    loss against the corrupted instead of the original token, the wrong normaliser, a detached student."""
    config = MLMStageConfig(mask_rate=0.3, alpha=0.25, seed=1)
    stage = MLMStage(config, mlm_context(*pair))
    batch = bert_batch()
    state = StepState(step=2, temperature=2.0, tokens=int(batch["loss_mask"].sum()) * 2, micro_batch=1, micro_batches=2)
    masked_ids, chosen = stage.masked(batch, state)
    assert int(chosen.sum()) >= 3 and (masked_ids != batch["input_ids"]).any()
    got = stage.loss(batch, None, None, state)["mlm"]
    got.backward()
    bias = pair[1].cls.predictions.bias
    got_grad = bias.grad.clone()
    pair[1].zero_grad(set_to_none=True)
    models64 = [copy.deepcopy(model).double() for model in pair]
    want = reference_loss(models64, masked_ids, chosen, batch, 2.0, 0.25, 0.3, state.tokens)
    want.backward()
    want_grad = models64[1].cls.predictions.bias.grad
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert got_grad.abs().sum() > 0
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-4, atol=1e-7)


def test_the_student_learns_the_teacher_on_masked_positions(pair):
    """Catches: a loss whose minimum is not the teacher (a student equal to the teacher must score 0 at alpha 0)."""
    teacher = pair[0]
    stage = MLMStage(MLMStageConfig(), mlm_context(teacher, teacher))
    batch = bert_batch()
    loss = stage.loss(batch, None, None, StepState(step=0, temperature=3.0, tokens=int(batch["loss_mask"].sum())))
    assert abs(float(loss["mlm"].detach())) < 1e-5


# --------------------------------------------------------------------------- refusals and the run


def test_a_teacher_without_an_mlm_head_is_refused_by_name(pair):
    """Catches: a bare BertModel teacher (all-MiniLM-L6-v2) reaching the forward and failing on `.logits`."""
    bare = build_preset("tiny-bert", {"num_hidden_layers": 1}, seed=1)
    with pytest.raises(ConfigError, match=r"stages\.mlm: the teacher \(BertModel, .*\) has no masked-LM head"):
        MLMStage(MLMStageConfig(), mlm_context(bare, pair[1]))
    with pytest.raises(ConfigError, match=r"stages\.mlm: the student \(BertModel"):
        MLMStage(MLMStageConfig(), mlm_context(pair[0], bare))
    with pytest.raises(ConfigError, match=r"stages\.mlm: the teacher comes from an offline teacher_cache"):
        MLMStage(MLMStageConfig(), mlm_context(*pair, teacher_live=False))
    for bad, key in (({"mask_rate": 0.0}, "mask_rate"), ({"mask_token": 0.9, "random_token": 0.2}, "random_token"),
                     ({"alpha": 1.5}, "alpha")):
        with pytest.raises(ConfigError, match=rf"stages\.mlm.*{key}"):
            MLMStage(MLMStageConfig(**bad), mlm_context(*pair))


@pytest.fixture(scope="module")
def mlm_dirs(tmp_path_factory, pair) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mlm")
    dirs = {}
    for role, model in zip(("teacher", "student"), pair):
        model.save_pretrained(root / role, safe_serialization=True)
        wordpiece_tokenizer().save_pretrained(root / role)
        dirs[role] = root / role
    data = root / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 4))
    dirs["data"] = data
    return dirs


def test_a_masked_lm_checkpoint_loads_with_its_head(mlm_dirs):
    """Catches: a *ForMaskedLM checkpoint loaded bare (AutoModel), its head's tensors refused as unexpected."""
    model, _ = load_model(ModelConfig(path=str(mlm_dirs["teacher"]), encoder=True), "teacher")
    assert type(model).__name__ == "BertForMaskedLM"


def test_distill_runs_the_mlm_stage_end_to_end(mlm_dirs, tmp_path):
    """Catches: the stage failing inside the loop (shapes, devices, registration) or its loss not logged."""
    raw = {
        "teacher": {"path": str(mlm_dirs["teacher"]), "encoder": True},
        "student": {"path": str(mlm_dirs["student"]), "encoder": True},
        "data": {"kind": "jsonl", "path": str(mlm_dirs["data"]), "text_field": "text", "batch_size": 4, "max_length": 24},
        "schedule": {"ramp_steps": 0, "phases": [{"name": "mlm", "steps": 2, "stages": {"mlm": 1.0, "hidden": 1.0}}]},
        "stages": {"mlm": {"alpha": 0.5}},
        "train": {"progress": False},
    }
    path = tmp_path / "mlm.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = distill(load_config(path), tmp_path / "run")
    assert result.steps == 2 and result.last_metrics["loss/mlm"] > 0 and result.last_metrics["loss/hidden"] > 0


def test_a_bert_model_teacher_in_a_run_is_refused_before_training(mlm_dirs, tmp_path):
    """Catches: the refusal only at the first step (after the models and data loaded), or an unnamed error."""
    bare = build_preset("tiny-bert", {"num_hidden_layers": 1}, seed=1)
    bare.save_pretrained(tmp_path / "bare", safe_serialization=True)
    wordpiece_tokenizer().save_pretrained(tmp_path / "bare")
    raw = {
        "teacher": {"path": str(tmp_path / "bare"), "encoder": True},
        "student": {"path": str(mlm_dirs["student"]), "encoder": True},
        "data": {"kind": "jsonl", "path": str(mlm_dirs["data"]), "text_field": "text", "batch_size": 2, "max_length": 24},
        "schedule": {"phases": [{"name": "mlm", "steps": 1, "stages": {"mlm": 1.0}}]},
        "train": {"progress": False},
    }
    path = tmp_path / "bare.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(HkdError, match=r"stages\.mlm: the teacher \(BertModel"):
        build_run(load_config(path), tmp_path / "run")
    assert not (tmp_path / "run").exists()
