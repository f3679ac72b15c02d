"""RL correction stage: advantages and loss gradients against hand-computed values, the
stage building its prompts/verifier, and a few RL steps raising the reward on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from hkd.config import Config, ConfigError, from_dict
from hkd.train.loop import distill
from hkd.models.loading import load_model
from hkd.plugins.loggers import read_metrics
from hkd.plugins.rl import RlStage, RlStageConfig, group_advantages, policy_gradient_loss, reverse_kl
from hkd.sampling.hf_sampler import sample
from tests.conftest import BASE_CONFIG, STUDENT
from hkd.sampling.verify import VerifierConfig
from hkd.models.loading import char_tokenizer
from hkd.plugin.stage import StageContext
from tests.plugins.helpers import models


def test_group_advantages_are_relative_to_each_prompt():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    centred = group_advantages(rewards, 4, normalize_std=False)
    assert torch.allclose(centred, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    scaled = group_advantages(rewards, 4, normalize_std=True)
    std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std(unbiased=False)
    assert torch.allclose(scaled[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-6))
    assert torch.equal(scaled[4:], torch.zeros(4))  # a group that all agree teaches nothing


def test_policy_gradient_pushes_up_rewarded_tokens_and_down_the_others():
    token_logp = torch.log(torch.tensor([[0.5, 0.5, 0.9], [0.2, 0.4, 0.9]])).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages = torch.tensor([1.0, -1.0])
    loss = policy_gradient_loss(token_logp, mask, advantages)
    expected = -(torch.log(torch.tensor(0.25)) - torch.log(torch.tensor(0.2 * 0.4 * 0.9))) / 5
    assert torch.allclose(loss, expected)
    loss.backward()
    # descent raises log pi of the rewarded sample's tokens and lowers the other's; padding gets nothing
    assert torch.allclose(token_logp.grad, torch.tensor([[-0.2, -0.2, 0.0], [0.2, 0.2, 0.2]]))


def test_reverse_kl_is_zero_for_equal_models_and_positive_otherwise():
    logits = torch.randn(2, 3, 7)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert reverse_kl(logits, logits, mask).abs() < 1e-6
    other = torch.randn(2, 3, 7)
    p, q = logits.log_softmax(-1), other.log_softmax(-1)
    per_token = (p.exp() * (p - q)).sum(-1)
    assert torch.allclose(reverse_kl(logits, other, mask), (per_token * mask).sum() / 3)


def test_bad_rl_config_names_the_key(tmp_path):
    teacher, student = models()
    ctx = StageContext("rl", teacher, student, {}, "stages.rl", tokenizer=char_tokenizer())
    with pytest.raises(ConfigError, match=r"stages.rl.samples_per_prompt"):
        RlStage(RlStageConfig(samples_per_prompt=1), ctx)
    with pytest.raises(ConfigError, match=r"stages.rl.prompts: file .*missing.jsonl"):
        RlStage(RlStageConfig(prompts=str(tmp_path / "missing.jsonl")), ctx)
    with pytest.raises(ConfigError, match=r"stages.rl.verifier: unknown verifier 'nope'"):
        RlStage(RlStageConfig(verifier=VerifierConfig("nope")), ctx)
    assert len(RlStage(RlStageConfig(num_prompts=5), ctx).records) == 5  # synthetic prompts by default
    with torch.device("meta"):  # what training from teacher_cache passes: the teacher's skeleton
        skeleton = type(teacher)(teacher.config)
    offline = StageContext("rl", skeleton, student, {}, "stages.rl", tokenizer=char_tokenizer(),
                           teacher_live=False)
    with pytest.raises(ConfigError, match=r"stages.rl.kl_weight: .*needs a live teacher \(not teacher_cache\)"):
        RlStage(RlStageConfig(kl_weight=0.1), offline)
    assert RlStage(RlStageConfig(kl_weight=0.0), offline).config.kl_weight == 0.0


def digit_first_rate(model, tokenizer, prompts) -> float:
    """Share of completions (16 per prompt, fixed seed) that start with a digit."""
    out = sample(model, tokenizer, prompts, n=16, max_new_tokens=2, temperature=1.0, seed=123)
    return sum(t[:1].isdigit() for t in out.texts) / len(out.texts)


@pytest.mark.slow
def test_rl_steps_raise_the_reward(tmp_path):
    """Reward: the completion starts with a digit (~10% for a random model). 12 RL steps raise it a lot."""
    prompts = tmp_path / "prompts.jsonl"
    problems = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(10, 26)]
    prompts.write_text("".join(json.dumps(p) + "\n" for p in problems))
    raw = json.loads(json.dumps(BASE_CONFIG))
    raw["schedule"] = {"phases": [{"name": "rl", "steps": 12, "stages": {"rl": 1.0}}]}
    raw["stages"] = {"rl": {
        "prompts": str(prompts), "prompts_per_step": 4, "samples_per_prompt": 8, "max_new_tokens": 2,
        "kl_weight": 0.01, "verifier": {"name": "regex_format", "options": {"pattern": r"\d.*"}},
    }}
    raw["optim"] = {"lr": 2e-2, "grad_accum": 2}
    config = from_dict(Config, raw)
    result = distill(config, tmp_path / "run")
    before, tokenizer = load_model(config.student, "student", tmp_path / "run")
    after, _ = load_model(from_dict(type(config.student), {"path": str(result.final_dir)}), "student")
    texts = [p["prompt"] for p in problems[:8]]
    rate_before, rate_after = digit_first_rate(before, tokenizer, texts), digit_first_rate(after, tokenizer, texts)
    assert rate_before < 0.3
    assert rate_after > rate_before + 0.3, (rate_before, rate_after)
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 12 and all("metric/reward" in m and m["metric/rl_kl"] >= 0 for m in metrics)
    assert sum(m["metric/reward"] for m in metrics[-4:]) > sum(m["metric/reward"] for m in metrics[:4])


def rl_metrics(tmp_path, grad_accum: int, batch_size: int) -> list[dict]:
    raw = json.loads(json.dumps(BASE_CONFIG))
    raw["schedule"] = {"phases": [{"name": "rl", "steps": 2, "stages": {"rl": 1.0}}]}
    raw["stages"] = {"rl": {"num_prompts": 8, "prompts_per_step": 2, "samples_per_prompt": 3, "max_new_tokens": 3,
                            "kl_weight": 0.1, "verifier": {"name": "regex_format", "options": {"pattern": r"\d.*"}}}}
    raw["optim"] = {"lr": 1e-2, "grad_accum": grad_accum}
    raw["data"]["batch_size"] = batch_size
    distill(from_dict(Config, raw), tmp_path / f"accum{grad_accum}")
    return read_metrics(tmp_path / f"accum{grad_accum}")


def test_rl_metrics_do_not_depend_on_gradient_accumulation(tmp_path):
    # catches: metrics reported on micro-batch 0 only being averaged over every micro-batch's tokens
    # (the logged reward was about 1/grad_accum of its value), or a gradient that changes with it
    one, four = rl_metrics(tmp_path, 1, 8), rl_metrics(tmp_path, 4, 2)
    assert any(m["metric/reward"] > 0 for m in one)  # the comparison sees real rewards
    for a, b in zip(one, four):
        for key in ("metric/reward", "metric/rl_kl", "loss/rl"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
