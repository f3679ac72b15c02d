"""The default logger: one JSON object per optimizer step in ``RUN_DIR/metrics.jsonl``.

Each line is flushed as it is written, so a crash loses at most the step in flight. On
``--resume`` lines past the restored checkpoint are dropped, because those steps run again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hkd.hookspecs import hookimpl

FILENAME = "metrics.jsonl"


@hookimpl
def hkd_on_train_start(run_dir: Path, start_step: int) -> None:
    path = run_dir / FILENAME
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= start_step:
                kept.append(line)
        except json.JSONDecodeError:  # a line torn by a crash
            continue
    path.write_text("".join(f"{line}\n" for line in kept))


@hookimpl
def hkd_after_step(step: int, metrics: dict[str, Any], run_dir: Path) -> None:
    with (run_dir / FILENAME).open("a") as handle:
        handle.write(json.dumps(metrics) + "\n")
        handle.flush()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / FILENAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
