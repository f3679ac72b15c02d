"""Weights & Biases logger: step metrics and the run config, online or offline.

Active only when ``wandb`` is in ``logging.backends``; then the ``wandb`` package must be
installed. Options live in ``logging.wandb`` (project, mode, entity, name). The default
mode ``offline`` needs no account or network: the run is written under ``RUN_DIR/wandb``
and can be uploaded later with ``wandb sync RUN_DIR/wandb/offline-run-*``. The W&B run id
is kept in ``RUN_DIR/wandb-run-id`` so ``--resume`` continues the same W&B run.
"""

from __future__ import annotations

import secrets
import string
from pathlib import Path
from typing import Any

from hkd import Config
from hkd import HkdError
from hkd import hookimpl

ID_FILE = "wandb-run-id"
_run: Any = None  # the active wandb run, None when not chosen


def start_run(config: Config, run_dir: Path, start_step: int) -> Any:
    """Start (or, on resume, continue) the W&B run for this run directory."""
    try:
        import wandb
    except ImportError as exc:
        raise HkdError(
            "logging.backends: 'wandb' needs the wandb package; install it with `pip install wandb` "
            "or remove it from logging.backends"
        ) from exc
    id_path = run_dir / ID_FILE
    if start_step and id_path.is_file():
        run_id = id_path.read_text().strip()
    else:
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id shape
        id_path.write_text(run_id + "\n")
    options = config.logging.wandb
    return wandb.init(
        project=options.project, entity=options.entity, name=options.name or run_dir.name, mode=options.mode,
        dir=str(run_dir), config=config.to_dict(), id=run_id, resume="allow",
    )


@hookimpl
def hkd_on_train_start(config: Config, run_dir: Path, start_step: int) -> None:
    global _run
    if _run is not None:  # a previous run in this process ended without train_end (crash)
        _run.finish(exit_code=1)
    _run = start_run(config, run_dir, start_step) if "wandb" in config.logging.backends else None


@hookimpl
def hkd_after_step(step: int, metrics: dict[str, Any]) -> None:
    if _run is not None:
        _run.log({k: v for k, v in metrics.items() if k != "step"}, step=step)


@hookimpl
def hkd_on_train_end() -> None:
    global _run
    if _run is not None:
        _run.finish()
        _run = None
