"""The eval: block: held-out metrics in the step's metrics, best/ by a metric, early stopping, resume."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hkd.config import Config, from_dict
from hkd.errors import ConfigError
from hkd.train.loop import distill


def configure(raw, **eval_options):
    raw["schedule"] = {"phases": [{"name": "p", "steps": 6, "stages": {"hidden": 1.0, "logits": 1.0}}]}
    raw["eval"] = {"every": 2, "num_examples": 8, "max_batches": 2} | eval_options
    return from_dict(Config, raw)


def test_held_out_metrics_are_logged_and_best_is_the_best_by_the_metric(raw_config, tmp_path):
    # catches: eval metrics that never reach the logs, best/ holding the last student instead of the best
    result = distill(configure(raw_config, metric="kl"), tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [line for line in lines if "eval/kl" in line]
    assert [line["step"] for line in evaluated] == [2, 4, 6]
    for line in evaluated:
        assert 0 <= line["eval/top1_agreement"] <= 1 and line["eval/kl"] >= 0
        assert {"eval/loss/hidden", "eval/loss/logits", "eval/student_nll"} <= set(line)
        # catches: eval/loss (eval.metric: loss) not the step's weighted sum of the held-out stage losses
        weights = {k.removeprefix("weight/"): v for k, v in line.items() if k.startswith("weight/")}
        assert line["eval/loss"] == pytest.approx(sum(w * line.get(f"eval/loss/{k}", 0.0) for k, w in weights.items()))
    best_line = min(evaluated, key=lambda line: line["eval/kl"])
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["step"] == best_line["step"] and best["value"] == pytest.approx(best_line["eval/kl"])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "best") is not None
    if best["step"] != 6:  # best/ is not simply the final student
        final = AutoModelForCausalLM.from_pretrained(result.final_dir)
        kept = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "best")
        assert not torch.equal(final.lm_head.weight, kept.lm_head.weight)


def test_held_out_kl_matches_a_direct_computation(raw_config, tmp_path):
    # catches: a KL over the wrong positions (prompt/padding) or with the wrong normalisation
    from hkd.train.loop import build_run
    from hkd.train.validation import evaluate

    run = build_run(configure(raw_config, max_batches=1), tmp_path / "run")
    metrics = evaluate(run, 0, {})
    batch = run.eval_batches.batch(0)
    with torch.no_grad():
        t = run.teachers[0].model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s = run.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["labels"][:, 1:] != -100
    t_logp, s_logp = t[:, :-1][keep].double().log_softmax(-1), s[:, :-1][keep].double().log_softmax(-1)
    expected = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    assert metrics["eval/kl"] == pytest.approx(expected.item(), rel=1e-4)
    assert metrics["eval/top1_agreement"] == pytest.approx((t_logp.argmax(-1) == s_logp.argmax(-1)).double().mean().item())


def test_early_stopping_stops_after_patience_evaluations_without_improvement(raw_config, tmp_path):
    # catches: patience ignored (the run trains all 6 steps) or counted in steps instead of evaluations
    config = configure(raw_config, every=1, patience=2, min_delta=1e9)  # nothing can improve by 1e9
    result = distill(config, tmp_path / "run")
    assert result.steps == 3  # step 1 sets the best; steps 2 and 3 fail to beat it by min_delta
    assert json.loads((tmp_path / "run" / "best.json").read_text())["since_best"] == 2


def test_eval_needs_held_out_data_and_a_live_teacher(raw_config, tmp_path):
    raw_config["data"] = {"kind": "jsonl", "path": str(tmp_path / "d.jsonl"), "prompt_field": "prompt"}
    (tmp_path / "d.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n' * 8)
    with pytest.raises(ConfigError, match=r"eval.path: required for data.kind 'jsonl'"):
        distill(configure(raw_config), tmp_path / "run")


def test_ranks_share_the_held_out_batches_and_together_report_what_one_process_does(raw_config, tmp_path,
                                                                                   monkeypatch):
    # catches: every rank evaluating the whole held-out set (N times the work), a batch scored twice
    # or never, stage losses divided by the world size, or a rank that runs fewer forwards than another
    # (FSDP's gathers would hang)
    import dataclasses

    import hkd.train.validation as validation
    from hkd.train.distributed import DistInfo
    from hkd.train.loop import build_run

    run = build_run(configure(raw_config, num_examples=20, max_batches=5), tmp_path / "run")  # 5 batches of 4
    single = validation.evaluate(run, 2, {"hidden": "hidden", "logits": "logits"})
    seen: list[tuple[int, int]] = []
    real_batch = run.eval_batches.batch
    monkeypatch.setattr(run.eval_batches, "batch", lambda i: seen.append((rank, i)) or real_batch(i))
    shares = []
    monkeypatch.setattr(validation, "all_reduce_tensor", lambda sums, info: shares.append(sums.clone()) or sums)
    for rank in (0, 1):
        run.info = DistInfo(rank=rank, world_size=2)
        validation.evaluate(run, 2, {"hidden": "hidden", "logits": "logits"})
    assert seen == [(0, 0), (0, 2), (0, 4), (1, 1), (1, 3), (1, 0)]  # 3 forwards each; rank 1's third is a pad
    run.info = dataclasses.replace(run.info, rank=0, world_size=2)
    monkeypatch.setattr(validation, "all_reduce_tensor", lambda sums, info: shares[0] + shares[1])
    together = validation.evaluate(run, 2, {"hidden": "hidden", "logits": "logits"})
    assert together.keys() == single.keys()
    for key, value in single.items():
        assert together[key] == pytest.approx(value, rel=1e-5), key
