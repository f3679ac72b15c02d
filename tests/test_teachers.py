"""Several teachers: the logits stage's mixture and sum against per-teacher references."""

from __future__ import annotations

import copy

import pytest
import torch

from hkd.config import Config, from_dict
from hkd.errors import ConfigError
from hkd.train.loop import build_run, distill, train_step

OTHER_TEACHER = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2}


def two_teachers(raw, mode="mixture", weights=(1.0, 3.0), temperature=2.0):
    raw = copy.deepcopy(raw)
    raw["teachers"] = [{"preset": "tiny-llama", "preset_overrides": OTHER_TEACHER, "seed": 7, "weight": weights[1]}]
    raw["teacher_weight"] = weights[0]
    raw["schedule"] = {"phases": [{"name": "p", "steps": 1, "stages": {"logits": 1.0}}],
                       "temperature": {"kind": "constant", "start": temperature, "end": temperature}}
    raw["stages"] = {"logits": {"teachers": mode, "alpha": 0.0}}
    raw["data"]["batch_size"] = 2
    raw["optim"]["grad_accum"] = 1
    return from_dict(Config, raw)


def direct_losses(run):
    """fp64 per-teacher tempered distributions and the student's, over the first batch's targets."""
    batch = run.batches.batch(0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    keep = batch["labels"][:, 1:] != -100
    t = 2.0
    with torch.no_grad():
        student = (run.student(**inputs).logits[:, :-1][keep].double() / t).log_softmax(-1)
        teachers = [(source.model(**inputs).logits[:, :-1][keep].double() / t).log_softmax(-1)
                    for source in run.teachers]
    return student, teachers, int(keep.sum())


def kl(p_logp, q_logp):
    return (p_logp.exp() * (p_logp - q_logp)).sum()


def test_mixture_is_the_kl_to_the_weighted_mixture_of_teacher_distributions(raw_config, tmp_path):
    # catches: mixing logits instead of probabilities, unnormalised weights, temperature applied twice
    run = build_run(two_teachers(raw_config), tmp_path / "run")
    student, teachers, tokens = direct_losses(run)
    mixture = (0.25 * teachers[0].exp() + 0.75 * teachers[1].exp()).log()
    expected = 4.0 * kl(mixture, student) / tokens  # T^2 scaling
    assert train_step(run, 0)["loss/logits"] == pytest.approx(expected.item(), rel=1e-4)


def test_sum_is_the_weighted_sum_of_per_teacher_kls(raw_config, tmp_path):
    # catches: 'sum' computing the mixture, or weights not applied per teacher
    run = build_run(two_teachers(raw_config, mode="sum"), tmp_path / "run")
    student, teachers, tokens = direct_losses(run)
    expected = 4.0 * (0.25 * kl(teachers[0], student) + 0.75 * kl(teachers[1], student)) / tokens
    assert train_step(run, 0)["loss/logits"] == pytest.approx(expected.item(), rel=1e-4)


def test_two_identical_teachers_equal_one(raw_config, tmp_path):
    # catches: a mixture that is not a proper average (two copies of one teacher must change nothing)
    raw = copy.deepcopy(raw_config)
    raw["schedule"] = {"phases": [{"name": "p", "steps": 2, "stages": {"logits": 1.0}}]}
    single = distill(from_dict(Config, raw), tmp_path / "one")
    raw["teachers"] = [dict(raw["teacher"], weight=2.0)]
    double = distill(from_dict(Config, raw), tmp_path / "two")
    assert double.last_metrics["loss/logits"] == pytest.approx(single.last_metrics["loss/logits"], rel=1e-5)
    assert (tmp_path / "two" / "models" / "teacher1" / "config.json").is_file()


def test_several_teachers_refuse_what_cannot_be_mixed(raw_config, tmp_path):
    raw = copy.deepcopy(raw_config)
    raw["teachers"] = [{"preset": "tiny-llama", "preset_overrides": OTHER_TEACHER}]
    raw["schedule"] = {"phases": [{"name": "p", "steps": 1, "stages": {"logits": 1.0}}]}
    raw["stages"] = {"logits": {"fused": True}}
    with pytest.raises(ConfigError, match=r"stages.logits.fused: several teachers are mixed"):
        build_run(from_dict(Config, raw), tmp_path / "run")
    raw["teachers"][0]["weight"] = 0.0
    with pytest.raises(ConfigError, match=r"teachers\[0\].weight"):
        from_dict(Config, raw)
