"""The harder task (hkd.tasks.chain, DemoSettings.hard) and bench/hard_task.py's helpers."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest

from hkd.tasks.arith import extract_answer, make_problems
from hkd.tasks.chain import ChainProblem, make_chain_problems
from hkd.commands.demo import DemoSettings, prepare_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import hard_task  # noqa: E402

COLUMN = re.compile(r"^((?:\d\+)+)(\d+)=(\d+) c(\d+);$")


def test_two_operands_are_the_demos_addition_problems():
    # bug caught: the demo's data (and so its published numbers) changing when it moved onto the chain generator
    pairs = make_problems(300, 2, seed=7, exclude={(10, 11)})
    chains = make_chain_problems(300, 2, 2, seed=7, exclude={(10, 11)})
    assert [(p.a, p.b) for p in pairs] == [c.operands for c in chains]
    for p, c in zip(pairs, chains):
        assert (c.prompt, c.answer, c.worked_solution(), c.answer_only()) == (
            p.prompt, p.answer, p.worked_solution(), p.answer_only())


def check_columns(problem: ChainProblem) -> None:
    """Recompute every column of the worked solution from the operands: digits, carry in, total, carry out."""
    text = problem.worked_solution()
    body, answer = text.split(" => ")
    columns = body.split("; ")
    columns = [c if c.endswith(";") else c + ";" for c in columns]
    width = max(len(str(x)) for x in problem.operands)
    assert len(columns) == width
    carry, digits = 0, []
    for i, column in enumerate(columns):
        m = COLUMN.match(column)
        assert m, column
        shown = [int(d) for d in m.group(1).rstrip("+").split("+")]
        assert shown == [x // 10**i % 10 for x in problem.operands]
        assert int(m.group(2)) == carry
        total = sum(shown) + carry
        assert int(m.group(3)) == total and int(m.group(4)) == total // 10
        digits.append(total % 10)
        carry = total // 10
    value = int("".join(str(d) for d in reversed(digits)))  # the digits written, most significant first
    assert answer == problem.answer == str(sum(problem.operands)) == str(value + carry * 10**width)
    assert extract_answer(text) == problem.answer


def test_worked_solutions_are_correct_arithmetic_with_carries_above_one():
    # bug caught: a column that drops the carry or caps it at 1 (three 9s plus a carry give c2)
    check_columns(ChainProblem((999, 999, 999)))
    assert "9+9+9+2=29 c2;" in ChainProblem((999, 999, 999)).worked_solution()
    for problem in make_chain_problems(200, 3, 3, seed=1) + make_chain_problems(50, 2, 5, seed=2):
        check_columns(problem)


def test_mixed_lengths_pad_with_zero():
    check_columns(ChainProblem((5, 123, 40)))
    assert ChainProblem((5, 123, 40)).worked_solution().startswith("5+3+0+0=8 c0; 0+2+4+0=6 c0; 0+1+0+0=1 c0;")


def test_problem_sets_are_distinct_and_respect_exclude():
    first = make_chain_problems(500, 2, 3, seed=3)
    assert len({p.operands for p in first}) == 500
    assert all(len(p.operands) == 3 and all(10 <= x <= 99 for x in p.operands) for p in first)
    second = make_chain_problems(500, 2, 3, seed=3, exclude={p.operands for p in first})
    assert not {p.operands for p in first} & {p.operands for p in second}


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 5, "digits": 1, "operands": 1}, "operands must be between 2"),
    ({"n": 5, "digits": 1, "operands": 10}, "operands must be between 2"),
    ({"n": 5, "digits": 0, "operands": 2}, "digits must be at least 1"),
    ({"n": 101, "digits": 1, "operands": 2}, "only 100 distinct problems"),  # never loops forever
])
def test_impossible_requests_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_chain_problems(seed=0, **kwargs)


@pytest.mark.parametrize("operands", [2, 3])
def test_hard_settings_prepare_disjoint_splits_that_fit(tmp_path, operands):
    # bug caught: splits that overlap (held-out problems seen in training), or worked solutions longer than
    # max_length / max_new_tokens (truncated training targets, unfinished answers at evaluation)
    settings = dataclasses.replace(DemoSettings.hard(), teacher_problems=300, student_problems=200,
                                   heldout_problems=100, operands=operands)
    if operands == 3:  # the longer chain needs the longer limits
        settings = dataclasses.replace(settings, max_length=96, max_new_tokens=64)
    data = prepare_data(settings, tmp_path)
    def prompts(path: Path) -> set[str]:
        return {json.loads(line)["prompt"] for line in path.open()}

    teacher, student, heldout = prompts(data.teacher_train), prompts(data.answer_only), prompts(data.heldout)
    assert (len(teacher), len(student), len(heldout)) == (300, 200, 100)
    assert not teacher & heldout and not student & heldout and not teacher & student
    assert all(re.fullmatch(r"\+".join([r"\d{3}"] * operands) + "=", p) for p in teacher | student | heldout)
    # the longest worked solution fits (bos + prompt + completion + eos, one token per character)
    rows = [json.loads(line) for line in data.teacher_train.open()]
    assert max(len(r["prompt"]) + len(r["completion"]) for r in rows) + 2 <= settings.max_length
    assert max(len(r["completion"]) for r in rows) + 1 <= settings.max_new_tokens


def test_budget_points():
    assert hard_task.budget_points(600, None) == [100, 200, 300, 400, 500, 600]
    assert hard_task.budget_points(600, [50, 300]) == [50, 300, 600]  # the full budget is always scored
    with pytest.raises(ValueError, match="between 1 and student_steps=600"):
        hard_task.budget_points(600, [0, 700])


def test_curve_summary_and_plot(tmp_path):
    runs = [{"seed": 0, "curve": {"10": 0.2, "20": 0.5}}, {"seed": 1, "curve": {"10": 0.4, "20": 0.7}}]
    curve = hard_task.curve_summary(runs, [10, 20])
    assert curve["10"]["mean"] == pytest.approx(0.3) and curve["20"]["mean"] == pytest.approx(0.6)
    assert curve["20"]["std"] == pytest.approx(0.1414, abs=1e-4)  # sample std over seeds
    assert (curve["10"]["min"], curve["10"]["max"]) == (0.2, 0.4)
    pytest.importorskip("matplotlib")
    report = {"arms": {"a": {"curve": curve}}, "teacher": {"pass@1": 0.9}, "seeds": [0, 1],
              "settings": {"operands": 3, "digits": 3}}
    assert "plot:" in hard_task.plot_curves(report, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step_snapshots_hold_the_student_of_that_step(tmp_path):
    # bug caught: a snapshot saved at the wrong step (or the final weights under every step's name) would
    # make every budget point score the same student
    import torch
    from safetensors.torch import load_file

    from hkd.config import Config, from_dict
    from hkd.train.loop import distill
    from hkd.plugin.manager import build_manager

    arch = {"preset": "tiny-llama", "seed": 3,
            "preset_overrides": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "num_key_value_heads": 1}}
    config = from_dict(Config, {
        "teacher": arch, "student": arch,
        "data": {"kind": "synthetic", "num_examples": 32, "batch_size": 4, "max_length": 32},
        "schedule": {"phases": [{"name": "sft", "steps": 4, "stages": {"sft": 1.0}}], "ramp_steps": 0},
        "optim": {"lr": 1e-2, "warmup_steps": 0},
        "train": {"seed": 0, "progress": False, "device": "cpu"},
    })
    snapshots = hard_task.StepSnapshots(tmp_path / "at", [2, 4])
    distill(config, tmp_path / "run", pm=build_manager(extra_plugins=[("steps", snapshots)]))
    assert sorted(snapshots.saved) == [2, 4]
    at2, at4 = (load_file(snapshots.saved[s] / "model.safetensors") for s in (2, 4))
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert all(torch.equal(at4[k], final[k]) for k in final)
    assert any(not torch.equal(at2[k], at4[k]) for k in at4)
    assert (snapshots.saved[2] / "tokenizer.json").is_file()  # pass@1 loads the snapshot with its tokenizer


def test_init_config_decoder_recipe_is_the_measured_winner(model_dirs):
    # bug caught: an edit of init-config's decoder recipe that drops the logits loss from the early phases,
    # the schedule bench/hard_task.py measured best among recipes without RL
    import yaml

    from hkd.commands.init_config import starter_config

    text = starter_config(model_dirs["teacher"], model_dirs["student"], None)
    phases = yaml.safe_load(text)["schedule"]["phases"]
    assert [p["name"] for p in phases] == ["structure", "feature", "decision"]
    assert all(p["stages"].get("logits") == 1.0 for p in phases)
    assert "bench/hard_task.py" in text  # the comment names the benchmark that chose it


@pytest.mark.parametrize("argv, message", [
    (["--set", "operands=1"], "--set digits/operands: operands must be between 2"),
    (["--points", "0", "700"], "--points [0, 700]: every point must be a step between 1 and student_steps=600"),
])
def test_bench_refuses_bad_options_before_training(argv, message, capsys, tmp_path):
    # bug caught: a raw traceback (or a teacher trained for minutes first) for a mistyped option
    with pytest.raises(SystemExit) as exit_info:
        hard_task.main([*argv, "--work", str(tmp_path / "w")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
