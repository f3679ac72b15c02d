"""Issue 12, run directories and checkpoints: no run directory or checkpoint is lost or silently reused.
Each test names the bug it catches."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from hkd.train import checkpoint as ckpt
from hkd.cli import main
from hkd.config import Config, from_dict
from hkd.errors import HkdError
from hkd.train.rundir import prepare_run_dir


def one_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("hkd: error: "), lines
    return lines[0]


def snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``run_dir``: content and mtime (to prove nothing was rewritten)."""
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def fake_checkpoint(root: Path, step: int) -> Path:
    path = root / "checkpoints" / f"step-{step:08d}"
    path.mkdir(parents=True)
    for name in ckpt.FILES:
        (path / name).write_text("x")
    return path


# --------------------------------------------------------------------------- 5. the guard, unit level


@pytest.fixture
def config(raw_config: dict[str, Any]) -> Config:
    return from_dict(Config, raw_config)


def saved_run(tmp_path: Path, config: Config) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    (run / "metrics.jsonl").write_text("{}\n")
    fake_checkpoint(run, 4)
    return run


def test_fresh_run_into_a_run_directory_is_refused(tmp_path, config):
    # bug caught: a second run silently overwrote metrics, checkpoints and the final model
    run = saved_run(tmp_path, config)
    before = snapshot(run)
    with pytest.raises(HkdError, match=r"--out: '.*run' already holds a run \(config\.yaml, metrics\.jsonl, "
                                       r"checkpoints\); continue it with --resume, replace it with --overwrite"):
        prepare_run_dir(run, config)
    assert snapshot(run) == before
    prepare_run_dir(tmp_path / "new", config)  # a new or empty directory is fine
    assert not (tmp_path / "new").exists()  # and the guard itself writes nothing


def test_overwrite_replaces_the_runs_outputs_and_nothing_else(tmp_path, config):
    run = saved_run(tmp_path, config)
    (run / "notes.txt").write_text("mine")
    (run / "config.resume-1.yaml").write_text("{}")
    plan = prepare_run_dir(run, config, overwrite=True)
    # bug caught: old checkpoints mixed into the new run
    assert sorted(p.name for p in run.iterdir()) == [".hkd-overwritten", "notes.txt"]
    (run / "config.yaml").write_text("new run started")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')  # and finished its first step
    plan.settle()
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.jsonl", "notes.txt"]
    with pytest.raises(HkdError, match="--resume and --overwrite contradict"):
        prepare_run_dir(run, config, resume=True, overwrite=True)


def test_overwrite_with_a_refused_config_keeps_the_old_run(tmp_path, config):
    # bug caught: --overwrite deleted the old run, then the new config was refused: both lost
    run = saved_run(tmp_path, config)
    before = snapshot(run)
    plan = prepare_run_dir(run, config, overwrite=True)
    (run / "models").mkdir()  # what a refused run may have left
    plan.settle()  # no config.yaml written: the new run never started
    assert snapshot(run) == before and sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml",
                                                                                  "metrics.jsonl"]


def test_resume_refuses_run_altering_changes_with_the_keys(tmp_path, config):
    # bug caught: --resume after changing the config silently continued (or tracebacked) and overwrote config.yaml
    run = saved_run(tmp_path, config)
    before = snapshot(run)
    changed = copy.deepcopy(config)
    changed.optim.lr = 0.5
    changed.student.preset_overrides["hidden_size"] = 48
    changed.schedule.phases[0].steps = 7
    changed.data.max_length = 20
    with pytest.raises(HkdError) as info:
        prepare_run_dir(run, changed, resume=True)
    message = str(info.value)
    assert "differs from the run's saved" in message and "4 key(s) that change the run" in message
    for key in ("data.max_length: 48 -> 20", "optim.lr: 0.001 -> 0.5", "schedule.phases[0].steps: 2 -> 7",
                "student.preset_overrides.hidden_size: 32 -> 48"):
        assert key in message, message
    assert "--allow-config-change" in message
    assert snapshot(run) == before


def test_harmless_changes_resume_and_allowed_changes_are_recorded_beside_the_original(tmp_path, config):
    run = saved_run(tmp_path, config)
    original = (run / "config.yaml").read_bytes()
    watched = copy.deepcopy(config)
    watched.train.progress, watched.train.checkpoint_every = True, 5
    plan = prepare_run_dir(run, watched, resume=True)
    assert set(plan.changed) == {"train.progress", "train.checkpoint_every"}
    watched.train.checkpoint_every = config.train.checkpoint_every
    assert prepare_run_dir(run, watched, resume=True).record_config() is None  # a progress bar is not recorded
    changed = copy.deepcopy(config)
    changed.optim.lr = 0.5
    plan = prepare_run_dir(run, changed, resume=True, allow_config_change=True)
    written = plan.record_config()
    assert written == run / "config.resume-1.yaml" and yaml.safe_load(written.read_text())["optim"]["lr"] == 0.5
    assert plan.record_config() == written  # the same resumed config twice: one record
    assert (run / "config.yaml").read_bytes() == original  # bug caught: the original config.yaml was lost


def test_resume_without_a_complete_checkpoint(tmp_path, config):
    run = saved_run(tmp_path, config)
    for name in ckpt.FILES:
        (run / "checkpoints" / "step-00000004" / name).unlink()
    with pytest.raises(HkdError, match=r"--resume: no checkpoint in '.*checkpoints'"):
        prepare_run_dir(run, config, resume=True)


# --------------------------------------------------------------------------- 5. through the CLI, on a real run

UNUSUAL = [
    "\ufeff" + json.dumps({"text": "1+1=2"}),  # a byte-order mark on the first line
    json.dumps({"text": ""}),  # an empty string
    json.dumps({"text": "9" * 10_000_000}),  # a 10 MB line
    json.dumps({"text": "2+2=4"}),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    """A 3-step run on valid-but-unusual data (BOM, empty string, 10 MB line): it must train."""
    from tests.conftest import BASE_CONFIG

    root = tmp_path_factory.mktemp("cli")
    (root / "d.jsonl").write_text("\n".join(UNUSUAL) + "\n", encoding="utf-8")
    raw = copy.deepcopy(BASE_CONFIG)
    raw["data"] = {"kind": "jsonl", "path": "d.jsonl", "batch_size": 2, "max_length": 24}
    for phase in raw["schedule"]["phases"]:
        phase["steps"] = 1
    (root / "cfg.yaml").write_text(yaml.safe_dump(raw))
    assert main(["distill", str(root / "cfg.yaml"), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "cfg.yaml", root / "run"


def test_unusual_data_trains(finished_run):
    _, run = finished_run
    assert (run / "final").is_dir() and len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_cli_refuses_a_second_fresh_run_and_a_changed_resume(finished_run, capsys):
    config, run = finished_run
    before = snapshot(run)
    line = one_error(capsys, "distill", str(config), "--out", str(run), "--no-progress")
    assert re.search(r"--out: '.*run' already holds a run", line)
    line = one_error(capsys, "distill", str(config), "--out", str(run), "--resume", "--optim.lr=0.5")
    assert "optim.lr: 0.001 -> 0.5" in line
    line = one_error(capsys, "distill", str(config), "--out", str(run), "--overwrite", "--data.path=nope.jsonl")
    assert "does not exist" in line
    assert snapshot(run) == before  # nothing written, nothing lost


# --------------------------------------------------------------------------- 6. checkpoints


def tiny_trainable() -> tuple[torch.nn.ModuleDict, torch.optim.Optimizer]:
    torch.manual_seed(0)
    trainable = torch.nn.ModuleDict({"student": torch.nn.Linear(3, 2), "stages": torch.nn.ModuleDict()})
    optimizer = torch.optim.AdamW(trainable.parameters())
    trainable["student"](torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return trainable, optimizer


def test_resaving_a_step_never_removes_the_good_one_first(tmp_path, monkeypatch):
    # bug caught: the old step-N was deleted before the new one was renamed in; a crash in between
    # left nothing (or an incomplete checkpoint that --resume picked and refused)
    trainable, optimizer = tiny_trainable()
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 4, trainable, optimizer, {})
    real_replace = os.replace

    def crash_on_rename_in(src: Any, dst: Any) -> None:
        if str(src).endswith(".tmp"):
            raise KeyboardInterrupt("killed between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_rename_in)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 4, trainable, optimizer, {})
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    [found] = ckpt.list_checkpoints(root)
    assert found.name == "step-00000004.old" and ckpt.is_complete(found)
    assert ckpt.load_checkpoint(found, *tiny_trainable())["step"] == 4
    ckpt.save_checkpoint(root, 4, trainable, optimizer, {})  # a later save of the step cleans up
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000004"]
    assert not (root / "step-00000004.old").exists()


def test_resume_skips_incomplete_checkpoints_and_says_so(tmp_path, capsys):
    # bug caught: --resume picked the newest directory even when incomplete, then refused it
    good = fake_checkpoint(tmp_path, 4)
    broken = fake_checkpoint(tmp_path, 8)
    (broken / "optimizer.safetensors").unlink()
    assert ckpt.list_checkpoints(tmp_path / "checkpoints") == [good]
    assert ckpt.resume_checkpoint(tmp_path / "checkpoints") == good
    assert "skips incomplete checkpoint(s) ['step-00000008']; resuming from step-00000004" in capsys.readouterr().err


def test_a_step_beyond_the_schedule_is_refused(tmp_path):
    # bug caught: a checkpoint at step 12 of a 6-step schedule "finished" without training
    with pytest.raises(HkdError, match=r"is at step 12, beyond the schedule's 6 steps"):
        ckpt.check_resume_step(12, 6)
    assert ckpt.check_resume_step(6, 6) == 6
    for bogus in (-1, "3", True, None):
        with pytest.raises(HkdError, match="not a step number"):
            ckpt.check_resume_step(bogus, 6)


def test_edited_trainer_step_and_truncated_weights_are_named(tmp_path):
    trainable, optimizer = tiny_trainable()
    path = ckpt.save_checkpoint(tmp_path / "checkpoints", 4, trainable, optimizer, {})
    trainer = json.loads((path / "trainer.json").read_text())
    (path / "trainer.json").write_text(json.dumps({**trainer, "step": 40}))
    with pytest.raises(HkdError, match=r"trainer\.json says step 40, the directory is step 4"):
        ckpt.load_checkpoint(path, *tiny_trainable())
    (path / "trainer.json").write_text(json.dumps(trainer))
    data = (path / "student.safetensors").read_bytes()
    (path / "student.safetensors").write_bytes(data[:-4])
    with pytest.raises(HkdError, match=r"is corrupted: '.*student\.safetensors' is truncated"):
        ckpt.load_checkpoint(path, *tiny_trainable())


def test_a_checkpoint_of_another_shape_is_named(tmp_path):
    # bug caught: a size-mismatch RuntimeError traceback from load_state_dict
    trainable, optimizer = tiny_trainable()
    path = ckpt.save_checkpoint(tmp_path / "checkpoints", 2, trainable, optimizer, {})
    other = torch.nn.ModuleDict({"student": torch.nn.Linear(4, 2), "stages": torch.nn.ModuleDict()})
    with pytest.raises(HkdError, match=r"tensors of another shape \(student\.weight: checkpoint \[2, 3\], model \[2, 4\]"):
        ckpt.load_checkpoint(path, other, torch.optim.AdamW(other.parameters()))


def test_cuda_rng_states_restore_in_device_order():
    # bug caught: string order restored cuda10's RNG state into device 2
    rng = {f"cuda{i}": i for i in range(12)} | {"torch": -1}
    assert ckpt.cuda_rng_keys(rng) == [f"cuda{i}" for i in range(12)]
