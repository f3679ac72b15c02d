"""bench/quality.py: settings overrides, the goals it evaluates, and every arm's config (no training)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import load_bench_script

from hkd.commands.demo import ARMS, DemoSettings, arm_config



@pytest.fixture(scope="module")
def bench() -> Any:
    return load_bench_script("quality")


def test_set_overrides_a_field_with_its_type_and_names_bad_ones(bench: Any, capsys) -> None:
    parser = argparse.ArgumentParser()
    settings = bench.override_setting(DemoSettings(), "rl_lr_scale=0.25", parser)
    settings = bench.override_setting(settings, "student_steps=400", parser)
    assert settings.rl_lr_scale == 0.25 and settings.student_steps == 400 and isinstance(settings.student_steps, int)
    for bad in ("nope=1", "student_steps", "student_steps=many", "teacher_arch=1"):
        with pytest.raises(SystemExit):
            bench.override_setting(DemoSettings(), bad, parser)
    assert "student_steps" in capsys.readouterr().err


def test_goals_are_computed_from_the_measured_means(bench: Any) -> None:
    def arm(mean: float, start: float | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {"pass@1": {"mean": mean}}
        if start is not None:
            entry["rl_start_pass@1"] = {"mean": start}
        return entry

    arms = {"answer_only": arm(0.4), "hidden_logits": arm(0.95), "progressive_rl": arm(0.9, start=0.85)}
    goals = bench.goals(arms, teacher=1.0, ratio=0.2)
    assert goals["student_at_most_quarter"] and goals["full_at_least_90pct_of_teacher"]
    assert goals["full_minus_answer_only"] == pytest.approx(0.5)
    assert not goals["full_at_least_every_ablation"]  # hidden_logits is higher
    assert goals["rl_gain_over_its_start"] == pytest.approx(0.05)


def test_every_arm_has_the_same_step_budget(tmp_path: Path) -> None:
    from hkd.commands.demo import DemoData

    settings = DemoSettings()
    data = DemoData(*(tmp_path / f"{n}.jsonl" for n in ("teacher", "prompts", "answers", "heldout")))
    for arm in ARMS:
        config = arm_config(arm, settings, data, tmp_path / "teacher", tmp_path / "distilled.jsonl", 0, False)
        assert sum(p.steps for p in config.schedule.phases) == settings.student_steps, arm
    overlap = arm_config("progressive_overlap", settings, data, tmp_path / "t", tmp_path / "d.jsonl", 0, False)
    assert all(p.stages.get("logits") == 1.0 for p in overlap.schedule.phases)
    rl = arm_config("progressive_rl", settings, data, tmp_path / "t", tmp_path / "d.jsonl", 0, False)
    assert rl.schedule.phases[-1].name == "rl" and rl.schedule.phases[-1].lr_scale == settings.rl_lr_scale
