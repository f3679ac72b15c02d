"""Atomic, pickle-free checkpoints.

A checkpoint is a directory ``checkpoints/step-00000100/`` holding:

* ``student.safetensors`` and ``stages.safetensors`` (stage projectors and state),
* ``optimizer.safetensors`` (AdamW moments) and ``rng.safetensors`` (torch RNG states),
* ``trainer.json`` (step, optimizer param groups, Python RNG state, config).

It is written into ``step-00000100.tmp`` and renamed into place only when complete, so a
crash leaves either the old set of checkpoints or the new one, never a half-written one.
Nothing here unpickles: tensors go through safetensors and everything else through JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from hkd.errors import HkdError

PREFIX = "step-"
FILES = ("student.safetensors", "stages.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json")


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    student: torch.nn.Module,
    stages: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{PREFIX}{step:08d}"
    tmp = ckpt_root / f"{PREFIX}{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(student, str(tmp / "student.safetensors"))
    save_model(stages, str(tmp / "stages.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    trainer = {"step": step, "optimizer": opt_meta, "python_rng": _jsonable(random.getstate()), **extra}
    (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
    for name in FILES:
        with open(tmp / name, "rb+") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. final after periodic): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (``.tmp`` directories are ignored)."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def load_checkpoint(
    path: Path, student: torch.nn.Module, stages: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote; returns the trainer metadata (with ``step``)."""
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise HkdError(f"checkpoint {str(path)!r} is incomplete: missing {missing}")
    try:
        trainer = json.loads((path / "trainer.json").read_text())
        _load_strict(student, path / "student.safetensors")
        _load_strict(stages, path / "stages.safetensors")
        optimizer.load_state_dict(
            _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), trainer["optimizer"])
        )
        rng = load_file(str(path / "rng.safetensors"))
    except (SafetensorError, json.JSONDecodeError, KeyError, ValueError, OSError) as exc:
        raise HkdError(f"checkpoint {str(path)!r} is corrupted or from another setup: {exc}") from exc
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    random.setstate(_tupled(trainer["python_rng"]))
    return trainer


def _load_strict(module: torch.nn.Module, file: Path) -> None:
    missing, unexpected = load_model(module, str(file), strict=False)
    if missing or unexpected:
        raise HkdError(
            f"checkpoint file {str(file)!r} does not match the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]} (was it written for a different student or stage setup?)"
        )
