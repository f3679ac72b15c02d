"""TensorBoard logger: every numeric step metric as a scalar in ``RUN_DIR/tensorboard``.

Active only when ``tensorboard`` is in ``logging.backends``; then the ``tensorboard``
package must be installed (``torch.utils.tensorboard`` needs it). Events are flushed after
every step, so a crash loses at most the step in flight; on ``--resume`` the writer purges
events past the restored checkpoint, because those steps run again. View with
``tensorboard --logdir RUN_DIR/tensorboard``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hkd import Config
from hkd import HkdError
from hkd import hookimpl

SUBDIR = "tensorboard"
_writer: Any = None  # the open SummaryWriter of the current run, None when not chosen


def open_writer(log_dir: Path, start_step: int) -> Any:
    """A SummaryWriter, or a one-line error naming the package to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise HkdError(
            "logging.backends: 'tensorboard' needs the tensorboard package; install it with "
            "`pip install tensorboard` or remove it from logging.backends"
        ) from exc
    # purge_step drops events a crashed run wrote after its last checkpoint
    return SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)


@hookimpl
def hkd_on_train_start(config: Config, run_dir: Path, start_step: int) -> None:
    global _writer
    if _writer is not None:  # a previous run in this process ended without train_end (crash)
        _writer.close()
    _writer = open_writer(run_dir / SUBDIR, start_step) if "tensorboard" in config.logging.backends else None


@hookimpl
def hkd_on_phase_start(phase_name: str, phase_index: int, step: int) -> None:
    if _writer is not None:
        _writer.add_text("phase", f"phase {phase_index} ({phase_name}) starts after step {step}", step)


@hookimpl
def hkd_after_step(step: int, metrics: dict[str, Any]) -> None:
    if _writer is None:
        return
    for name, value in metrics.items():
        if name != "step" and isinstance(value, (int, float)):
            _writer.add_scalar(name, value, step)
    _writer.flush()


@hookimpl
def hkd_on_train_end() -> None:
    global _writer
    if _writer is not None:
        _writer.close()
        _writer = None
