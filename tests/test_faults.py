"""Crashes and signals: a killed run resumes to the same student; SIGTERM stops cleanly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hkd.train import checkpoint as ckpt
from hkd.errors import HkdError


def start(config_path: Path, out: Path, env, resume=False):
    cmd = [sys.executable, "-m", "hkd.cli", "distill", str(config_path), "--out", str(out), "--no-progress"]
    return subprocess.Popen(cmd + (["--resume"] if resume else []), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(out: Path, proc, min_step: int, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = ckpt.list_checkpoints(out / "checkpoints")
        if found and int(found[-1].name.split("-")[1]) >= min_step:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before checkpoint {min_step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    pytest.fail("timed out waiting for a checkpoint")


def final_params(out: Path):
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.fixture
def long_config(raw_config, tmp_path):
    for phase in raw_config["schedule"]["phases"]:
        phase["steps"] = 6
    raw_config["train"]["checkpoint_every"] = 3
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(raw_config))
    return path


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(long_config, tmp_path, subprocess_env):
    victim = start(long_config, tmp_path / "killed", subprocess_env)
    wait_for_checkpoint(tmp_path / "killed", victim, 6)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "final").exists()
    resumed = start(long_config, tmp_path / "killed", subprocess_env, resume=True)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    from hkd.config import load_config
    from hkd.train.loop import distill

    distill(load_config(long_config), tmp_path / "ref")  # the uninterrupted run, in this process
    a, b = final_params(tmp_path / "ref"), final_params(tmp_path / "killed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_exits_130(long_config, tmp_path, subprocess_env):
    proc = start(long_config, tmp_path / "run", subprocess_env)
    wait_for_checkpoint(tmp_path / "run", proc, 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    err = proc.stderr.read()
    assert "checkpoint saved, continue with --resume" in err and "Traceback" not in err
    last = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    step = int(last.name.split("-")[1])
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == step  # the checkpoint holds exactly the steps that were logged


def test_half_written_checkpoints_are_never_picked(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-00000004").mkdir(parents=True)
    for name in ckpt.FILES:
        (root / "step-00000004" / name).write_text("x")
    (root / "step-00000008.tmp").mkdir()  # a save interrupted before its rename
    (root / "step-00000006").mkdir()  # bug caught: an incomplete step-N was listed, and --resume picked and refused it
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000004"]


def test_truncated_checkpoint_is_a_clear_error(raw_config, tmp_path):
    from hkd.config import Config, from_dict
    from hkd.train.loop import distill

    raw_config["train"]["checkpoint_every"] = 2
    distill(from_dict(Config, raw_config), tmp_path / "run")
    last = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    data = (last / "optimizer.safetensors").read_bytes()
    (last / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(HkdError, match=r"checkpoint '.*step-00000006' is corrupted"):
        distill(from_dict(Config, raw_config), tmp_path / "run", resume=True)
    (last / "trainer.json").unlink()  # now incomplete: --resume skips it for the newest complete one
    assert ckpt.resume_checkpoint(tmp_path / "run" / "checkpoints").name == "step-00000004"
    with pytest.raises(HkdError, match=r"is incomplete: missing \['trainer.json'\]"):
        ckpt.load_checkpoint(last, None, None)  # type: ignore[arg-type]


def test_nothing_unpickles_by_default(raw_config, tmp_path, monkeypatch):
    """Loading models, data and checkpoints never calls pickle (or torch.load, which unpickles)."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    from hkd.config import Config, from_dict
    from hkd.train.loop import distill

    raw_config["train"]["checkpoint_every"] = 3
    distill(from_dict(Config, raw_config), tmp_path / "run")
    distill(from_dict(Config, raw_config), tmp_path / "run", resume=True)
