"""A refusal after the run directory was touched loses nothing: the replaced run comes back whenever the
new one fails before it has trained a step, and a refused fresh run leaves no config.yaml behind.
Issue "Nothing silently wrong, on the whole surface", class 2."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from hkd.cli import main
from hkd.config import Config, from_dict
from hkd.errors import HkdError
from hkd.train import loop
from hkd.train.rundir import ASIDE, prepare_run_dir
from tests.test_output_paths import snapshot


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    from tests.conftest import BASE_CONFIG

    root = tmp_path_factory.mktemp("restore")
    raw = copy.deepcopy(BASE_CONFIG)
    for phase in raw["schedule"]["phases"]:
        phase["steps"] = 1
    raw["train"]["checkpoint_every"] = 1
    (root / "cfg.yaml").write_text(yaml.safe_dump(raw))
    assert main(["distill", str(root / "cfg.yaml"), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "cfg.yaml", root / "run"


def failing_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """train_step raises, like a check that runs inside a step, on its ``call``-th call (1-based)."""
    real, calls = loop.train_step, []

    def step(run: Any, index: int) -> dict[str, float]:
        calls.append(index)
        if len(calls) == call:
            raise HkdError("stages.x: refused inside the step")
        return real(run, index)

    monkeypatch.setattr(loop, "train_step", step)


def one_line(capsys: pytest.CaptureFixture[str], code: int) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and line.startswith("hkd:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("hkd: error: "), lines
    return lines[0]


def test_overwrite_refused_at_step_one_gives_the_finished_run_back(finished, tmp_path, monkeypatch, capsys):
    # catches: --overwrite whose config was refused at step 1 deleted the finished run's checkpoints,
    # final/ and metrics, leaving only the new config.yaml
    config, original = finished
    run = tmp_path / "run"
    shutil.copytree(original, run)
    before = snapshot(run)
    failing_at(monkeypatch, 1)
    code = main(["distill", str(config), "--out", str(run), "--overwrite", "--no-progress", "--optim.lr=0.002"])
    assert "refused inside the step" in one_line(capsys, code)
    assert snapshot(run) == before and not (run / ASIDE).exists()


def test_a_fresh_run_refused_at_step_one_leaves_nothing(finished, tmp_path, monkeypatch, capsys):
    # catches: a refused fresh run left config.yaml (and presets) behind, so the next attempt was
    # refused with "already holds a run"; a directory the user had keeps only the user's files
    config, _ = finished
    failing_at(monkeypatch, 1)
    one_line(capsys, main(["distill", str(config), "--out", str(tmp_path / "new"), "--no-progress"]))
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "report").mkdir()  # a name hkd also writes, but the user's: it was there before
    failing_at(monkeypatch, 1)
    one_line(capsys, main(["distill", str(config), "--out", str(mine), "--no-progress"]))
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "report"]
    monkeypatch.undo()
    assert main(["distill", str(config), "--out", str(mine), "--no-progress"]) == 0  # not "already holds a run"


def test_a_run_that_trained_a_step_keeps_its_outputs_and_replaces_the_old(finished, tmp_path, monkeypatch, capsys):
    # catches: the old run restored over a new one that had already trained (its metrics lost), also
    # when the new run writes no metrics.jsonl (logging.backends without jsonl): the step is what counts
    config, original = finished
    for backends in ("[jsonl]", "[]"):
        run = tmp_path / f"run{len(backends)}"
        shutil.copytree(original, run)
        failing_at(monkeypatch, 2)
        code = main(["distill", str(config), "--out", str(run), "--overwrite", "--no-progress",
                     f"--logging.backends={backends}"])
        one_line(capsys, code)
        monkeypatch.undo()
        assert not (run / ASIDE).exists() and not (run / "final").exists()
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001"]  # the new run's own
        assert (run / "metrics.jsonl").exists() == (backends == "[jsonl]")


def test_an_overwrite_killed_before_its_first_step_is_undone_by_the_next_command(finished, tmp_path, capsys):
    # catches: the next --overwrite deleting the run a killed process had moved aside (it never started)
    config_path, original = finished
    config = from_dict(Config, yaml.safe_load(config_path.read_text()))
    run = tmp_path / "run"
    shutil.copytree(original, run)
    before = snapshot(run)
    prepare_run_dir(run, config, overwrite=True)
    (run / "config.yaml").write_text("the killed run's")
    (run / "models").mkdir()
    # the process dies here: no settle()
    with pytest.raises(HkdError, match="already holds a run"):
        prepare_run_dir(run, config)
    assert "the replaced run is back in place" in capsys.readouterr().err
    assert snapshot(run) == before


@pytest.mark.parametrize("stage,options", [("sentence", {}), ("onpolicy", {"lmbda": 1.0})])
def test_stages_that_cannot_train_on_packed_rows_refuse_before_the_first_step(stage, options, tmp_path, raw_config,
                                                                            capsys, monkeypatch):
    # catches: a check that ran inside the step (packed rows have no one sentence or prompt) instead of
    # when the stage is built, so the run directory had been written before the refusal
    raw_config["data"]["packing"] = True
    raw_config["schedule"]["phases"] = [{"name": "p", "steps": 1, "stages": {stage: 1.0}}]
    raw_config["stages"] = {stage: options}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw_config))
    monkeypatch.setattr(loop, "train_step", lambda run, step: pytest.fail("reached the first step"))
    line = one_line(capsys, main(["distill", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]))
    assert f"stages.{stage}" in line and "data.packing" in line
    assert not (tmp_path / "run").exists()
