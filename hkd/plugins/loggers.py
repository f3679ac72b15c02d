"""The default logger: one JSON object per optimizer step in ``RUN_DIR/metrics.jsonl``.

Each line is flushed as it is written, so a crash loses at most the step in flight. On
``--resume`` lines past the restored checkpoint are dropped, because those steps run again.
Active while ``jsonl`` is in ``logging.backends`` (the default); ``hkd report`` reads this file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hkd import Config
from hkd import hookimpl

FILENAME = "metrics.jsonl"
_enabled = True  # set per run from logging.backends


@hookimpl
def hkd_on_train_start(config: Config, run_dir: Path, start_step: int) -> None:
    global _enabled
    _enabled = "jsonl" in config.logging.backends
    path = run_dir / FILENAME
    if not _enabled or not path.exists():
        return
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a crash
            continue
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step <= start_step:
            kept.append(line)  # steps that run again are dropped; lines hkd report cannot place it skips itself
    path.write_text("".join(f"{line}\n" for line in kept))


@hookimpl
def hkd_after_step(step: int, metrics: dict[str, Any], run_dir: Path) -> None:
    if not _enabled:
        return
    with (run_dir / FILENAME).open("a") as handle:
        handle.write(json.dumps(metrics) + "\n")
        handle.flush()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / FILENAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
