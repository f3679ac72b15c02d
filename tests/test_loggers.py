"""Logging backends: JSONL, TensorBoard and W&B (offline), chosen by ``logging.backends``.

The TensorBoard and W&B tests are skipped when their package is not installed
(``pip install tensorboard wandb``); the missing-package messages are tested either way.
"""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from hkd.config import Config, ConfigError, from_dict
from hkd.errors import HkdError
from hkd.loop import distill
from hkd.manager import build_manager
from hkd.plugins import tensorboard_logger, wandb_logger

STEPS = [{"step": s, "phase": 0, "loss": 1.0 / s, "loss/hidden": 2.0 / s, "lr": 1e-3, "tokens": 64} for s in (1, 2, 3, 4)]


def config_with(raw_config: dict, backends: list[str]) -> Config:
    raw_config["logging"] = {"backends": backends, "wandb": {"mode": "offline", "project": "hkd-test"}}
    return from_dict(Config, raw_config)


def run_hooks(config: Config, run_dir: Path, steps: list[dict], start_step: int = 0) -> None:
    """Drive the logger hooks as the loop does, through the plugin manager."""
    pm = build_manager()
    run_dir.mkdir(parents=True, exist_ok=True)
    pm.call("hkd_on_train_start", config=config, run_dir=run_dir, student=None, teacher=None, start_step=start_step,
            total_steps=steps[-1]["step"], resumed_from=None)
    pm.call("hkd_on_phase_start", phase_name="a", phase_index=0, step=start_step, active_stages=["hidden"])
    for metrics in steps:
        pm.call("hkd_after_step", step=metrics["step"], metrics=metrics, run_dir=run_dir)
    pm.call("hkd_on_train_end", step=steps[-1]["step"], run_dir=run_dir, final_dir=run_dir / "final", metrics=steps[-1])


def tensorboard_scalars(log_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def wandb_history(path: Path) -> list[dict[str, str]]:
    """History rows of an offline ``.wandb`` file: a LevelDB-style log of protobuf records.

    Layout: a 7-byte ``:W&B`` header, then 32 KiB blocks of chunks ``crc u32, length u16,
    type u8, data`` (type 1 = a whole record, 2/3/4 = first/middle/last part).
    """
    from wandb.proto import wandb_internal_pb2

    data, pos, pending, rows = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer: too short for a chunk header
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def test_unknown_backend_is_named_with_its_config_path(raw_config):
    with pytest.raises(ConfigError, match=r"logging\.backends\[1\]: str 'tb' is not one of \['jsonl', 'tensorboard', 'wandb'\]"):
        config_with(raw_config, ["jsonl", "tb"])


def test_backends_not_chosen_do_nothing_even_when_their_package_is_missing(raw_config, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it now raises ImportError
    monkeypatch.setitem(sys.modules, "wandb", None)
    run_hooks(config_with(raw_config, ["jsonl"]), tmp_path / "run", STEPS)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == STEPS
    run_hooks(config_with(raw_config, []), tmp_path / "quiet", STEPS)  # jsonl left out: no file at all
    assert list((tmp_path / "quiet").iterdir()) == []


@pytest.mark.parametrize("backend, module, package", [("tensorboard", "torch.utils.tensorboard", "tensorboard"),
                                                      ("wandb", "wandb", "wandb")])
def test_a_chosen_backend_without_its_package_names_the_pip_package(raw_config, tmp_path, monkeypatch, backend,
                                                                    module, package):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(HkdError, match=rf"'{backend}' needs the {package} package; install it with `pip install {package}`"):
        run_hooks(config_with(raw_config, [backend]), tmp_path / "run", STEPS)


def test_tensorboard_writes_every_metric_and_purges_steps_a_resume_repeats(raw_config, tmp_path):
    pytest.importorskip("tensorboard")
    config = config_with(raw_config, ["tensorboard"])
    run_hooks(config, tmp_path / "run", STEPS)
    log_dir = tmp_path / "run" / "tensorboard"
    assert tensorboard_scalars(log_dir, "loss/hidden") == pytest.approx({s["step"]: s["loss/hidden"] for s in STEPS})
    assert set(tensorboard_scalars(log_dir, "tokens")) == {1, 2, 3, 4}
    # resume from a step-2 checkpoint: steps 3 and 4 run again with new values
    rerun = [dict(s, loss=10.0 * s["step"]) for s in STEPS[2:]]
    run_hooks(config, tmp_path / "run", rerun, start_step=2)
    assert tensorboard_scalars(log_dir, "loss") == pytest.approx({1: 1.0, 2: 0.5, 3: 30.0, 4: 40.0})


def test_wandb_offline_keeps_the_run_id_across_resume(raw_config, tmp_path):
    pytest.importorskip("wandb")
    config = config_with(raw_config, ["wandb"])
    run_hooks(config, tmp_path / "run", STEPS[:2])
    run_id = (tmp_path / "run" / "wandb-run-id").read_text().strip()
    time.sleep(1.1)  # W&B names offline segments by the second: a resume within it would reuse the directory
    run_hooks(config, tmp_path / "run", STEPS[2:], start_step=2)
    assert (tmp_path / "run" / "wandb-run-id").read_text().strip() == run_id
    files = sorted((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # one offline segment per process start, one W&B run id
    expected = {s["step"]: s["loss/hidden"] for s in STEPS}
    deadline = time.monotonic() + 15
    while True:  # finish() returns before the wandb-core service has written the last records
        rows = [row for path in files for row in wandb_history(path)]
        logged = {int(r["_step"]): float(r["loss/hidden"]) for r in rows}
        if logged == expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert logged == expected


def test_one_run_logs_to_all_three_backends(raw_config, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    raw_config["schedule"]["phases"] = [{"name": "feature", "steps": 2, "stages": {"hidden": 1.0}}]
    distill(config_with(raw_config, ["jsonl", "tensorboard", "wandb"]), tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard", "loss/hidden")
    assert scalars == pytest.approx({line["step"]: line["loss/hidden"] for line in lines})
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert tensorboard_logger._writer is None and wandb_logger._run is None  # closed at train end
