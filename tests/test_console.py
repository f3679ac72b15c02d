"""The console plugin: what a person watching ``hkd distill`` reads (hkd/plugins/console.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from hkd.cli import main
from hkd.config import Config, from_dict
from hkd.plugins import console


def test_without_a_terminal_progress_is_plain_lines_never_carriage_returns(raw_config, tmp_path, capsys,
                                                                            monkeypatch):
    # bug: without a TTY the tqdm bar wrote hundreds of KB of carriage returns into log files
    monkeypatch.setenv("HKD_PROGRESS_SECONDS", "0")  # a line every step, to see them all
    config = from_dict(Config, raw_config)
    config.train.progress = True
    run_dir = tmp_path / "student-a"
    console.hkd_on_train_start(config=config, run_dir=run_dir, start_step=0, total_steps=6, resumed_from=None)
    console.hkd_on_phase_start(phase_name="structure", step=0)
    for step in (1, 2):
        console.hkd_after_step(step=step, metrics={"loss": 0.5, "loss/attention": 0.5 * step, "tokens": 10})
    console.hkd_on_phase_start(phase_name="feature", step=2)
    console.hkd_after_step(step=3, metrics={"loss": 0.25, "loss/hidden": 0.25, "tokens": 10})
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    # the model's name on every line: the demo trains several models one after another
    assert lines[0].startswith("student-a: step 1/6 (17%), phase structure, loss 0.5")
    assert "student-a: phase structure done (steps 1-2): mean loss attention 0.75" in lines
    assert lines[-1].startswith("student-a: step 3/6")


def test_no_progress_prints_no_step_lines(raw_config, tmp_path, capsys):
    # bug this catches: --no-progress must silence the periodic lines, not only a tqdm bar
    config = from_dict(Config, raw_config)
    console.hkd_on_train_start(config=config, run_dir=tmp_path / "run", start_step=0, total_steps=6,
                               resumed_from=None)
    console.hkd_on_phase_start(phase_name="structure", step=0)
    console.hkd_after_step(step=6, metrics={"loss": 0.5, "loss/attention": 0.5, "tokens": 10})
    assert "step 6/6" not in capsys.readouterr().err


@pytest.mark.slow
def test_distill_resume_phase_and_summary_lines(raw_config, tmp_path, capsys, monkeypatch):
    # bugs: no line said a run resumed (or from where), none gave a finished phase's losses,
    # and the end said nothing about time, speed or where the metrics are
    monkeypatch.chdir(tmp_path)
    raw_config["train"].update(checkpoint_every=2, keep_checkpoints=0, progress=True)
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(yaml.safe_dump(raw_config))
    monkeypatch.setenv("HKD_PROGRESS_SECONDS", "0")
    assert main(["distill", str(config_file), "--out", "run"]) == 0  # progress on, stderr is not a terminal
    err = capsys.readouterr().err
    assert "\r" not in err and "run: step 6/6 (100%), phase decision" in err  # plain lines, from the whole run
    assert "run: phase structure done (steps 1-2): mean loss attention " in err
    assert "run: phase feature done (steps 3-4): mean loss attention " in err and ", hidden " in err
    summary = [line for line in err.splitlines() if line.startswith("run: done, 6 steps in ")]
    assert summary and "trained tokens/s; final model run/final, metrics run/metrics.jsonl" in summary[0]

    # as if stopped after step 4: the newest checkpoint is step 4, no final model yet
    shutil.rmtree(tmp_path / "run" / "final")
    for late in sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[2:]:
        shutil.rmtree(late)
    assert main(["distill", str(config_file), "--out", "run", "--no-progress", "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"run: resuming from step 4 of 6, checkpoint {Path('run', 'checkpoints', 'step-00000004')}" in err
    assert "run: done, 2 steps (resumed at 4) in " in err
