"""One registry of loss-kernel backends, keyed by op and backend name.

``auto`` picks the highest-priority backend that is available here and whose ``supports``
accepts the given tensors (e.g. Triton only for CUDA tensors) and falls back quietly. A backend
requested by name must be available (else ``RuntimeError`` naming it and why); ``supports`` is
not consulted then, so the backend itself raises for inputs it cannot run (this lets
``backend="triton"`` run CPU tensors under ``TRITON_INTERPRET=1`` while ``auto`` never picks
the slow interpreter). Plugins add backends through the
``hkd_add_kernel_backends`` hook; the plugin manager calls :func:`register_backend`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


def always() -> tuple[bool, str]:
    return True, ""


@dataclass(frozen=True)
class KernelBackend:
    op: str  # "distill_loss" | "fused_linear_distill_loss"
    name: str  # "torch" | "chunked" | "triton" | a plugin's name
    fn: Callable[..., torch.Tensor]  # the op's signature without ``backend``
    priority: int = 0  # auto prefers higher
    is_available: Callable[[], tuple[bool, str]] = always  # (ok, reason when not)
    supports: Callable[..., bool] | None = None  # auto's per-call check on the input tensors


_BACKENDS: dict[str, dict[str, KernelBackend]] = {}


def register_backend(backend: KernelBackend, *, replace: bool = False) -> None:
    table = _BACKENDS.setdefault(backend.op, {})
    if backend.name in table and not replace:
        raise ValueError(f"a backend named {backend.name!r} is already registered for op {backend.op!r}")
    table[backend.name] = backend


def _table(op: str) -> dict[str, KernelBackend]:
    if op not in _BACKENDS:
        raise ValueError(f"unknown kernel op {op!r}; known ops: {sorted(_BACKENDS)}")
    return _BACKENDS[op]


def get_backend(op: str, name: str) -> KernelBackend:
    table = _table(op)
    if name not in table:
        raise ValueError(f"unknown backend {name!r} for {op}; registered: {sorted(table)} (or 'auto')")
    return table[name]


def resolve(op: str, name: str, *tensors: Any) -> KernelBackend:
    """The backend to run: ``name`` itself (checked), or the best one for ``auto``."""
    if name != "auto":
        backend = get_backend(op, name)
        ok, reason = backend.is_available()
        if not ok:
            raise RuntimeError(f"kernel backend {name!r} for {op} cannot run here: {reason}")
        return backend  # ``supports`` is auto's preference; a named backend raises its own clear error
    for backend in sorted(_table(op).values(), key=lambda b: -b.priority):
        if backend.is_available()[0] and (backend.supports is None or backend.supports(*tensors)):
            return backend
    raise RuntimeError(f"no available backend for {op}")  # pragma: no cover - torch is always there


def backends(op: str, *example: Any) -> list[dict[str, Any]]:
    """Every backend of ``op`` with availability, and which one ``auto`` picks (for CPU tensors by default)."""
    probe = example or (torch.empty(0),)
    chosen = resolve(op, "auto", *probe).name
    rows = []
    for backend in sorted(_table(op).values(), key=lambda b: -b.priority):
        ok, reason = backend.is_available()
        rows.append({"name": backend.name, "available": ok, "reason": reason, "auto": backend.name == chosen,
                     "priority": backend.priority})
    return rows
