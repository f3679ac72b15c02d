"""Atomic, pickle-free checkpoints.

A checkpoint is a directory ``checkpoints/step-00000100/`` holding:

* ``student.safetensors`` (loadable as the model's own weights) and ``stages.safetensors``
  (stage projectors and state),
* ``optimizer.safetensors`` (AdamW moments by parameter name) and ``rng.safetensors``,
* ``trainer.json`` (step, optimizer param groups, Python RNG state, config).

State dicts are taken with ``torch.distributed.checkpoint.state_dict`` as *full* state dicts,
so the same code serves one process, data-parallel ranks and FSDP2-sharded models: every
rank takes part in gathering, rank 0 writes, and every rank loads the full files back.

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
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from hkd.errors import HkdError

PREFIX = "step-"
FILES = ("student.safetensors", "stages.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json")


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
LOAD = StateDictOptions(full_state_dict=True)
# parameters whose stage has not been active yet have no AdamW state: that is expected
LOAD_OPTIMIZER = StateDictOptions(full_state_dict=True, strict=False)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state keyed by parameter name -> ``{"<param>:<key>": tensor}`` + JSON rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{name}:{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for flat_name, value in tensors.items():
        name, key = flat_name.rsplit(":", 1)
        state.setdefault(name, {})[key] = value
    for name, entries in meta["scalars"].items():
        state.setdefault(name, {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def _split(state: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    """Entries under ``prefix.``, prefix removed; tied weights become separate copies for safetensors."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        if key.startswith(prefix + "."):
            tensor = value.detach().contiguous()
            pointer = tensor.data_ptr()
            out[key[len(prefix) + 1:]] = tensor.clone() if pointer in seen else tensor
            seen.add(pointer)
    return out


def full_model_state(module: torch.nn.Module) -> dict[str, Any]:
    """The complete state dict on rank 0 (empty elsewhere); a collective under FSDP."""
    return get_model_state_dict(module, options=FULL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    trainable: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    keep: int = 2,
    write: bool = True,
) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``.

    ``trainable`` has children ``student`` and ``stages``. Every rank must call this (the
    gather is collective); only the one with ``write=True`` touches the disk.
    """
    model_state = get_model_state_dict(trainable, options=FULL)
    optim_state = get_optimizer_state_dict(trainable, optimizer, options=FULL)
    final = ckpt_root / f"{PREFIX}{step:08d}"
    if not write:
        return final
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f"{PREFIX}{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_split(model_state, "student"), str(tmp / "student.safetensors"))
    save_file(_split(model_state, "stages"), str(tmp / "stages.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(optim_state)
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


def load_checkpoint(path: Path, trainable: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote; returns the trainer metadata (with ``step``)."""
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise HkdError(f"checkpoint {str(path)!r} is incomplete: missing {missing}")
    try:
        trainer = json.loads((path / "trainer.json").read_text())
        state: dict[str, Any] = {f"student.{k}": v for k, v in load_file(str(path / "student.safetensors")).items()}
        state.update({f"stages.{k}": v for k, v in load_file(str(path / "stages.safetensors")).items()})
        optim_state = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), trainer["optimizer"])
        rng = load_file(str(path / "rng.safetensors"))
    except (SafetensorError, json.JSONDecodeError, KeyError, ValueError, OSError) as exc:
        raise HkdError(f"checkpoint {str(path)!r} is corrupted or from another setup: {exc}") from exc
    expected = set(trainable.state_dict())  # names only; FSDP2 keeps the original names
    if set(state) != expected:
        raise HkdError(
            f"checkpoint {str(path)!r} does not match this setup: missing {sorted(expected - set(state))[:3]}, "
            f"unexpected {sorted(set(state) - expected)[:3]} (written for a different student or stages?)"
        )
    set_model_state_dict(trainable, state, options=LOAD)
    set_optimizer_state_dict(trainable, optimizer, optim_state, options=LOAD_OPTIMIZER)
    # loading initialises state for every parameter; parameters that had none (stage not yet
    # active) must have none again, or AdamW's bias correction would differ from the first run
    for name, param in trainable.named_parameters():
        if name not in optim_state["state"]:
            optimizer.state.pop(param, None)
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    random.setstate(_tupled(trainer["python_rng"]))
    return trainer
