"""Logging backends: JSONL, TensorBoard and W&B (offline), chosen by ``logging.backends``.

The TensorBoard and W&B tests are skipped when their package is not installed
(``pip install tensorboard wandb``); the missing-package messages are tested either way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from hkd.config import Config, ConfigError, from_dict
from hkd.errors import HkdError
from hkd.train.loop import distill
from hkd.plugin.manager import build_manager
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


def wandb_records(path: Path) -> list[dict]:
    """The records of an offline ``.wandb`` transaction log, read by W&B's own reader: what
    ``wandb leet inspect --json PATH`` prints, run through wandb-core directly (the CLI's Python
    start-up alone takes two seconds; the arguments are the ones ``wandb/cli/leet.py`` passes).
    wandb 0.31 has no Python reader any more (``wandb.sdk.internal.datastore`` is gone)."""
    from wandb.util import get_core_path

    done = subprocess.run([get_core_path(), "leet", "inspect", "--no-observability", "--json", "--run-file", str(path),
                           str(path.parent.parent)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def wandb_history(path: Path, key: str) -> dict[int, float]:
    return {int(r["history"]["item"]["_step"]): r["history"]["item"][key] for r in wandb_records(path)
            if r["type"] == "history"}


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


# catches: a resumed run that starts a new W&B run id (or writes no records for its steps), a step
# logged under the wrong W&B step, a value changed on the way, the run config not sent, and a run
# that is not finished (no exit record: finish() is what flushes the log, so nothing is polled)
def test_wandb_offline_keeps_the_run_id_across_resume(raw_config, tmp_path):
    pytest.importorskip("wandb")
    config = config_with(raw_config, ["wandb"])
    run_hooks(config, tmp_path / "run", STEPS[:2])
    run_id = (tmp_path / "run" / "wandb-run-id").read_text().strip()
    # W&B names an offline segment by its start second: a resume within that second would reuse
    # the directory (in practice a resume takes longer; wandb.init alone takes a second or more)
    first = next((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))
    started = datetime.strptime(first.name.split("-")[2], "%Y%m%d_%H%M%S").timestamp()
    time.sleep(max(0.0, started + 1.05 - time.time()))
    run_hooks(config, tmp_path / "run", STEPS[2:], start_step=2)
    assert (tmp_path / "run" / "wandb-run-id").read_text().strip() == run_id
    files = sorted((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # one offline segment per process start, one W&B run id
    segments = [wandb_records(path) for path in files]
    for records, steps in zip(segments, (STEPS[:2], STEPS[2:])):
        run = next(r["run"] for r in records if r["type"] == "run")
        assert run["run_id"] == run_id and run["project"] == "hkd-test"
        assert run["config"]["update"]["optim"]["lr"] == config.optim.lr
        assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [0]
        history = [r["history"]["item"] for r in records if r["type"] == "history"]
        assert [{k: row[k] for k in steps[0] if k != "step"} | {"step": row["_step"]} for row in history] == steps


def test_one_run_logs_to_all_three_backends(raw_config, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    raw_config["schedule"]["phases"] = [{"name": "feature", "steps": 2, "stages": {"hidden": 1.0}}]
    distill(config_with(raw_config, ["jsonl", "tensorboard", "wandb"]), tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard", "loss/hidden")
    assert scalars == pytest.approx({line["step"]: line["loss/hidden"] for line in lines})
    (wandb_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    assert wandb_history(wandb_file, "loss/hidden") == pytest.approx({line["step"]: line["loss/hidden"] for line in lines})
    assert tensorboard_logger._writer is None and wandb_logger._run is None  # closed at train end
