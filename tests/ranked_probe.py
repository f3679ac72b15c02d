"""``hkd.cli`` under torchrun, watched: which weight files each rank opens, whether the students' teacher
is weightless, and (on request) a teacher rank that dies or a student rank that is signalled mid-run.

Run from the repository root as ``python -m torch.distributed.run ... -m tests.ranked_probe distill CONFIG --out DIR``. It writes
``$HKD_PROBE_DIR/rank<R>.json``. ``HKD_PROBE_DIE_AT=N``: the teacher rank exits (``os._exit(1)``) at its
N-th forward. ``HKD_PROBE_STOP_AFTER=N``: student rank 0 gets SIGTERM after step N (as from the
scheduler), so the run stops there and every rank must agree.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
from pathlib import Path

import safetensors
import safetensors.torch

RANK = int(os.environ.get("RANK", "0"))
RECORD: dict[str, object] = {"rank": RANK, "opened": [], "teacher_weightless": None, "forwards": 0}
_safe_open = safetensors.safe_open
_load_file = safetensors.torch.load_file


def _watched_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
    RECORD["opened"].append(str(Path(path).resolve()))  # type: ignore[union-attr]
    return _safe_open(path, *args, **kwargs)


def _watched_load(path, *args, **kwargs):  # type: ignore[no-untyped-def]
    RECORD["opened"].append(str(Path(path).resolve()))  # type: ignore[union-attr]
    return _load_file(path, *args, **kwargs)


safetensors.safe_open = _watched_open  # before transformers imports it by name
safetensors.torch.load_file = _watched_load


def _write() -> None:
    out = os.environ.get("HKD_PROBE_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"rank{RANK}.json").write_text(json.dumps(RECORD))


atexit.register(_write)

import hkd.teachers.ranked as ranked  # noqa: E402
import hkd.train.loop as loop  # noqa: E402  (distill hands its train() to the placement)

_forward = ranked.forward_with_taps
_train = loop.train
DIE_AT = int(os.environ.get("HKD_PROBE_DIE_AT", "0"))
STOP_AFTER = int(os.environ.get("HKD_PROBE_STOP_AFTER", "0"))


def _counted_forward(*args, **kwargs):  # type: ignore[no-untyped-def]
    RECORD["forwards"] = int(RECORD["forwards"]) + 1  # type: ignore[call-overload]
    if DIE_AT and RECORD["forwards"] == DIE_AT:
        _write()
        os._exit(1)  # a crash: no cleanup, no message to anyone
    return _forward(*args, **kwargs)


def _watched_train(run):  # type: ignore[no-untyped-def]
    RECORD["teacher_weightless"] = all(p.is_meta for source in run.teachers for p in source.model.parameters())
    if STOP_AFTER and RANK == 0:
        step_fn = _train.__globals__["train_step"]

        def stepping(run, step):  # type: ignore[no-untyped-def]
            metrics = step_fn(run, step)
            if step + 1 == STOP_AFTER:
                os.kill(os.getpid(), signal.SIGTERM)
            return metrics

        _train.__globals__["train_step"] = stepping
    return _train(run)


ranked.forward_with_taps = _counted_forward
loop.train = _watched_train

if __name__ == "__main__":
    from hkd.cli import main

    sys.exit(main(sys.argv[1:]))
