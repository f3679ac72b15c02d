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
Re-saving a step that exists (the final save after a periodic one) moves the old directory
aside to ``step-00000100.old``, renames the new one in, and only then deletes the old one;
a crash between the two renames leaves the ``.old`` one, which :func:`list_checkpoints` uses.
:func:`list_checkpoints` returns complete checkpoints only; :func:`resume_checkpoint` also
says which incomplete ones it skipped.
Nothing here unpickles: tensors go through safetensors and everything else through JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
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
from hkd.models.loading import safetensors_shapes

PREFIX = "step-"
ASIDE = ".old"  # a checkpoint being replaced by a re-save of its step
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
    aside = final.with_name(final.name + ASIDE)
    if final.exists():  # re-saving the same step (e.g. final after periodic): the old one stays until the new is in
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    shutil.rmtree(aside, ignore_errors=True)
    for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def _step_of(path: Path) -> int | None:
    """The step a checkpoint directory holds: ``step-N``, or ``step-N.old`` (moved aside by a re-save)."""
    name = path.name.removesuffix(ASIDE)
    digits = name[len(PREFIX):]
    return int(digits) if name.startswith(PREFIX) and digits.isdigit() else None


def is_complete(path: Path) -> bool:
    """Every file a checkpoint needs is there and not empty."""
    return all((path / name).is_file() and (path / name).stat().st_size > 0 for name in FILES)


def _scan(ckpt_root: Path) -> tuple[dict[int, Path], list[Path]]:
    """(step -> complete checkpoint, incomplete ``step-N`` directories); ``step-N`` wins over ``step-N.old``."""
    complete: dict[int, Path] = {}
    incomplete: list[Path] = []
    if not ckpt_root.is_dir():
        return complete, incomplete
    for path in sorted(ckpt_root.iterdir(), key=lambda p: p.name.endswith(ASIDE)):  # step-N before step-N.old
        step = _step_of(path)
        if step is None or not path.is_dir() or step in complete:
            continue
        if is_complete(path):
            complete[step] = path
        elif not path.name.endswith(ASIDE):
            incomplete.append(path)
    return complete, sorted(incomplete, key=lambda p: _step_of(p) or 0)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (``.tmp`` directories and incomplete ones are ignored)."""
    complete, _ = _scan(ckpt_root)
    return [complete[step] for step in sorted(complete)]


def resume_checkpoint(ckpt_root: Path) -> Path:
    """The newest complete checkpoint for ``--resume``; incomplete ones newer than it are named on stderr."""
    complete, incomplete = _scan(ckpt_root)
    if not complete:
        extra = f" (incomplete: {[p.name for p in incomplete]})" if incomplete else ""
        raise HkdError(f"--resume: no checkpoint in {str(ckpt_root)!r}{extra}")
    newest = max(complete)
    skipped = [p.name for p in incomplete if (_step_of(p) or 0) > newest]
    if skipped:
        print(f"hkd: --resume skips incomplete checkpoint(s) {skipped}; resuming from {complete[newest].name}",
              file=sys.stderr)
    return complete[newest]


def cuda_rng_keys(rng: dict[str, Any]) -> list[str]:
    """``cuda0, cuda1, ...`` in device order: numeric, since as strings "cuda10" sorts before "cuda2"."""
    return sorted((k for k in rng if k.startswith("cuda") and k[len("cuda"):].isdigit()), key=lambda k: int(k[len("cuda"):]))


def check_resume_step(step: Any, total_steps: int, path: Path | None = None) -> int:
    """The step a checkpoint resumes at, if the schedule reaches it; a step beyond it is refused."""
    where = f"checkpoint {str(path)!r}" if path is not None else "checkpoint"
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise HkdError(f"{where}: trainer.json has step {step!r}, not a step number")
    if step > total_steps:
        raise HkdError(f"{where} is at step {step}, beyond the schedule's {total_steps} steps; the schedule was "
                       "shortened or the checkpoint belongs to another run (train longer, or start a fresh run)")
    return step


def load_checkpoint(path: Path, trainable: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote; returns the trainer metadata (with ``step``)."""
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise HkdError(f"checkpoint {str(path)!r} is incomplete: missing {missing}")
    try:
        for name in FILES:
            if name.endswith(".safetensors"):
                safetensors_shapes(path / name)
    except HkdError as exc:
        raise HkdError(f"checkpoint {str(path)!r} is corrupted: {exc}") from None
    try:
        trainer = json.loads((path / "trainer.json").read_text())
        if not isinstance(trainer, dict):
            raise ValueError("trainer.json is not a JSON object")
        step = _step_of(path)
        if step is not None and trainer.get("step") != step:
            raise ValueError(f"trainer.json says step {trainer.get('step')!r}, the directory is step {step}")
        state: dict[str, Any] = {f"student.{k}": v for k, v in load_file(str(path / "student.safetensors")).items()}
        state.update({f"stages.{k}": v for k, v in load_file(str(path / "stages.safetensors")).items()})
        optim_state = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), trainer["optimizer"])
        rng = load_file(str(path / "rng.safetensors"))
    except (SafetensorError, json.JSONDecodeError, KeyError, ValueError, TypeError, OSError) as exc:
        raise HkdError(f"checkpoint {str(path)!r} is corrupted or from another setup: {exc}") from exc
    own = trainable.state_dict()  # names only; FSDP2 keeps the original names
    expected = set(own)
    if set(state) != expected:
        raise HkdError(
            f"checkpoint {str(path)!r} does not match this setup: missing {sorted(expected - set(state))[:3]}, "
            f"unexpected {sorted(set(state) - expected)[:3]} (written for a different student or stages?)"
        )
    # a sharded (DTensor) parameter reports its full shape, as the checkpoint stores it
    wrong = [f"{k}: checkpoint {list(v.shape)}, model {list(own[k].shape)}" for k, v in state.items()
             if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise HkdError(f"checkpoint {str(path)!r} does not match this setup: tensors of another shape "
                       f"({', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}; written for a different student?)")
    try:
        set_model_state_dict(trainable, state, options=LOAD)
        set_optimizer_state_dict(trainable, optimizer, optim_state, options=LOAD_OPTIMIZER)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise HkdError(f"checkpoint {str(path)!r} does not match this setup: {' '.join(str(exc).split())}") from exc
    # loading initialises state for every parameter; parameters that had none (stage not yet
    # active) must have none again, or AdamW's bias correction would differ from the first run
    for name, param in trainable.named_parameters():
        if name not in optim_state["state"]:
            optimizer.state.pop(param, None)
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in cuda_rng_keys(rng)]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    random.setstate(_tupled(trainer["python_rng"]))
    return trainer
