"""One registry of loss-kernel backends, keyed by op and backend name.

``auto`` picks the highest-priority backend that is available here, whose ``supports``
accepts the given tensors (e.g. Triton only for CUDA tensors) and that can serve the call
(below), and falls back quietly. A backend requested by name must be available (else
``RuntimeError`` naming it and why); ``supports`` is not consulted then, so the backend itself
raises for inputs it cannot run (this lets ``backend="triton"`` run CPU tensors under
``TRITON_INTERPRET=1`` while ``auto`` never picks the slow interpreter).

Two layers: the built-in backends (and any a program adds with :func:`register_backend`), and
over them the backends of the plugin manager in use (``hkd_add_kernel_backends``), which
:func:`set_plugin_backends` replaces as a whole: building a manager installs exactly its
plugins' backends, and a run activates its own manager's, so a backend one run's plugins added
is gone in the next run whose plugins do not provide it.

Ops grow options (``skew`` arrived after the first plugins were written), so a backend gets
only what it declares, as pluggy does for hook implementations: its function's signature is
read once, when the backend is made, and each call passes it only the keyword options it
names (all of them to a ``**kwargs`` function). An option it does not name is dropped only
when its value cannot change the result (``skew`` outside the skew divergences, ``alpha=0``,
``temperature=1``: :class:`Option`); a request that needs it, or a divergence outside the
backend's ``divergences``, is one the backend cannot serve: ``auto`` passes it by, a named
backend raises naming itself, the op and the argument, and stages ask
:func:`check_request` when they are built, so a run is refused at start-up, not at step 1.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hkd.errors import ConfigError


def always() -> tuple[bool, str]:
    return True, ""


@dataclass(frozen=True)
class KernelBackend:
    op: str  # "distill_loss" | "fused_linear_distill_loss" | "sparse_distill_loss"
    name: str  # "torch" | "chunked" | "triton" | a plugin's name
    fn: Callable[..., torch.Tensor]  # the op's positional tensors, then the keyword options it declares
    priority: int = 0  # auto prefers higher
    is_available: Callable[[], tuple[bool, str]] = always  # (ok, reason when not)
    supports: Callable[..., bool] | None = None  # auto's per-call check on the input tensors
    divergences: Collection[str] | None = None  # the divergences fn computes; None: every one of the op
    # the keyword names fn declares, read once from its signature; None: it takes any (**kwargs)
    takes: frozenset[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.divergences is not None:
            names = (self.divergences,) if isinstance(self.divergences, str) else self.divergences
            object.__setattr__(self, "divergences", frozenset(names))
        object.__setattr__(self, "takes", declared_keywords(self.fn))

    def call(self, *tensors: Any, **options: Any) -> torch.Tensor:
        """``fn`` with the keyword options it declares (after :func:`resolve` said it can serve them)."""
        if self.takes is not None:
            options = {key: value for key, value in options.items() if key in self.takes}
        return self.fn(*tensors, **options)


def declared_keywords(fn: Callable[..., Any]) -> frozenset[str] | None:
    """The argument names ``fn`` accepts by keyword; ``None`` when it takes any (``**kwargs``) or
    its signature cannot be read (then it gets every option, as before signatures were read)."""
    try:
        signature = inspect.signature(fn)  # follows __wrapped__ (functools.wraps)
    except (TypeError, ValueError):
        return None
    names = set()
    for parameter in signature.parameters.values():
        if parameter.kind is parameter.VAR_KEYWORD:
            return None
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            names.add(parameter.name)
    return frozenset(names)


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Any = _Unknown()  # an option's value not known yet (set by the schedule, varying per step)


def maybe(value: Any, *choices: Any) -> bool:
    """``value`` is one of ``choices``, or not known yet (so it may be)."""
    return value is UNKNOWN or value in choices


def differs(value: Any, neutral: Any) -> bool:
    """``value`` is not ``neutral``, or not known yet (so it may not be)."""
    return value is UNKNOWN or value != neutral


@dataclass(frozen=True)
class Option:
    """A keyword option an op passes its backends.

    ``needs(request)`` names the request's settings under which a backend that does not take
    this option would compute something else (``()``: the option cannot change the result, so
    such a backend may serve the request). A value not known yet is :data:`UNKNOWN`: write
    ``needs`` with :func:`maybe` / :func:`differs`, which count it as mattering.
    """

    default: Any
    needs: Callable[[Mapping[str, Any]], tuple[str, ...]]


@dataclass(frozen=True)
class OpSpec:
    name: str
    positional: int  # tensors every backend receives positionally, in the op's order
    divergences: tuple[str, ...]  # what a backend's ``divergences`` may list
    options: Mapping[str, Option]  # by keyword, in the op's order


_OPS: dict[str, OpSpec] = {}
_BACKENDS: dict[str, dict[str, KernelBackend]] = {}
# the backends of the plugin manager in use, over _BACKENDS; replaced whole by set_plugin_backends
_PLUGIN_BACKENDS: dict[str, dict[str, KernelBackend]] = {}


def define_op(op: str, *, positional: int, divergences: tuple[str, ...], options: Mapping[str, Option]) -> None:
    """Declare what ``op`` passes its backends (:mod:`hkd.kernels.ops` does, for each public op)."""
    _OPS[op] = OpSpec(op, positional, divergences, dict(options))


def _signature_problem(backend: KernelBackend, spec: OpSpec) -> str | None:
    """Why ``backend.fn`` can never be called as ``spec`` calls backends, or None."""
    try:
        parameters = list(inspect.signature(backend.fn).parameters.values())
    except (TypeError, ValueError):
        return None
    kinds = {p.kind for p in parameters}
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if inspect.Parameter.VAR_POSITIONAL not in kinds and len(positional) < spec.positional:
        return f"its function takes {len(positional)} positional arguments, but {spec.name} passes {spec.positional}"
    for parameter in positional[spec.positional:] + [p for p in parameters if p.kind is p.KEYWORD_ONLY]:
        if parameter.default is parameter.empty and parameter.name not in spec.options:
            return (f"its function requires {parameter.name!r}, which {spec.name} never passes "
                    f"(it passes {', '.join(spec.options)})")
    return None


def check_backend(backend: KernelBackend) -> None:
    """``ValueError`` unless ``backend`` fits its op: known divergences, a signature the op can call."""
    spec = _OPS.get(backend.op)
    if spec is not None:
        if backend.divergences is not None:
            unknown = sorted(set(backend.divergences) - set(spec.divergences))
            if unknown or not backend.divergences:
                raise ValueError(f"backend {backend.name!r} for {backend.op}: divergences {unknown or '(none)'} are not "
                                 f"divergences of the op; use some of {list(spec.divergences)} (or None for all)")
        problem = _signature_problem(backend, spec)
        if problem:
            raise ValueError(f"backend {backend.name!r} for {backend.op}: {problem}")


def register_backend(backend: KernelBackend, *, replace: bool = False) -> None:
    """Add ``backend`` to the built-in layer, for the life of the process (plugins: the hook instead)."""
    check_backend(backend)
    table = _BACKENDS.setdefault(backend.op, {})
    if backend.name in table and not replace:
        raise ValueError(f"a backend named {backend.name!r} is already registered for op {backend.op!r}")
    table[backend.name] = backend


def set_plugin_backends(backends: Collection[KernelBackend]) -> None:
    """Make ``backends`` the plugin layer, replacing the previous one whole (one name per op: the last wins)."""
    layer: dict[str, dict[str, KernelBackend]] = {}
    for backend in backends:
        check_backend(backend)
        layer.setdefault(backend.op, {})[backend.name] = backend
    _PLUGIN_BACKENDS.clear()
    _PLUGIN_BACKENDS.update(layer)


def _table(op: str) -> dict[str, KernelBackend]:
    if op not in _BACKENDS and op not in _PLUGIN_BACKENDS:
        raise ValueError(f"unknown kernel op {op!r}; known ops: {sorted(_BACKENDS.keys() | _PLUGIN_BACKENDS.keys())}")
    return {**_BACKENDS.get(op, {}), **_PLUGIN_BACKENDS.get(op, {})}


def get_backend(op: str, name: str) -> KernelBackend:
    table = _table(op)
    if name not in table:
        raise ValueError(f"unknown backend {name!r} for {op}; registered: {sorted(table)} (or 'auto')")
    return table[name]


@dataclass(frozen=True)
class Refusal:
    """Why a backend cannot serve a request: the settings that ask for it, and what it lacks."""

    settings: tuple[str, ...]  # request keys, the one to change first
    why: str

    def describe(self, request: Mapping[str, Any], keys: Mapping[str, str] | None = None) -> str:
        keys = keys or {}
        shown = []
        for key in self.settings:
            value = request[key]
            if value is UNKNOWN:
                shown.append(f"{keys.get(key, key)} (known only at run time)")
            elif isinstance(value, torch.Tensor):
                shown.append(f"{keys.get(key, key)} (a tensor)")
            else:
                shown.append(f"{keys.get(key, key)}={value!r}")
        return ", ".join(shown)


def _full(spec: OpSpec, request: Mapping[str, Any]) -> dict[str, Any]:
    extra = sorted(set(request) - set(spec.options))
    if extra:
        raise TypeError(f"{spec.name} has no option(s) {extra}; its options are {list(spec.options)}")
    return {**{key: option.default for key, option in spec.options.items()}, **request}


def refusal(backend: KernelBackend, request: Mapping[str, Any]) -> Refusal | None:
    """None when ``backend`` can serve ``request`` (keyword options; missing ones at the op's
    defaults, :data:`UNKNOWN` for values not known yet), else why not."""
    spec = _OPS.get(backend.op)
    if spec is None:  # an op hkd does not define: every option goes through, as before
        return None
    full = _full(spec, request)
    divergence = full.get("divergence")
    if backend.divergences is not None and "divergence" in spec.options and divergence not in backend.divergences:
        return Refusal(("divergence",), f"it computes only {sorted(backend.divergences)}")
    if backend.takes is None:
        return None
    for key, option in spec.options.items():
        if key in backend.takes:
            continue
        if key == "divergence" and backend.divergences is not None and len(backend.divergences) == 1:
            continue  # it computes one divergence, and the check above made sure it is this one
        settings = option.needs(full)
        if settings:
            return Refusal(settings, f"its function takes no {key!r} argument")
    return None


def _capable(op: str, request: Mapping[str, Any]) -> list[str]:
    return sorted(b.name for b in _table(op).values() if b.is_available()[0] and refusal(b, request) is None)


def resolve(op: str, name: str, *tensors: Any, request: Mapping[str, Any] | None = None) -> KernelBackend:
    """The backend to run: ``name`` itself (checked), or the best one for ``auto``.

    ``request``: the keyword options of this call; a backend that cannot serve them is passed
    over by ``auto`` and refused by name (``ValueError`` naming the backend, op and argument)."""
    if name != "auto":
        backend = get_backend(op, name)
        ok, reason = backend.is_available()
        if not ok:
            raise RuntimeError(f"kernel backend {name!r} for {op} cannot run here: {reason}")
        why = None if request is None else refusal(backend, request)
        if why is not None:
            assert request is not None
            raise ValueError(f"kernel backend {name!r} for {op} cannot serve {why.describe(_full(_OPS[op], request))}: "
                             f"{why.why}; backends that can: {', '.join(_capable(op, request))} (or backend='auto')")
        return backend  # ``supports`` is auto's preference; a named backend raises its own clear error
    for backend in sorted(_table(op).values(), key=lambda b: -b.priority):
        if (backend.is_available()[0] and (backend.supports is None or backend.supports(*tensors))
                and (request is None or refusal(backend, request) is None)):
            return backend
    raise RuntimeError(f"no available backend for {op}")  # pragma: no cover - torch is always there


def check_request(op: str, name: str, *, chosen_by: str, where: str, elsewhere: Mapping[str, str] | None = None,
                  **request: Any) -> None:
    """Refuse at build time, as a :class:`ConfigError`, what would otherwise fail at the first step:
    an unknown backend name, one that cannot run here, or one that cannot serve the request.

    ``chosen_by``: the config key that named the backend (``stages.logits.backend``,
    ``kernels.distill_loss``). ``request``: the options the caller will pass, by the op's names;
    missing ones are taken at the op's defaults. ``where``: the config path the request's
    settings live under (``stages.logits``: the message names ``stages.logits.divergence``).
    ``elsewhere``: options set outside it, by their config key (``{"temperature":
    "schedule.temperature"}``); one of them not in ``request`` is not known yet, so the backend
    must take it. ``auto`` always passes (the reference backend serves every request)."""
    elsewhere = dict(elsewhere or {})
    spec = _OPS[op]
    full = _full(spec, {**{key: UNKNOWN for key in elsewhere if key not in request}, **request})
    if name == "auto":
        return
    table = _table(op)
    if name not in table:
        raise ConfigError(f"{chosen_by}: unknown kernel backend {name!r} for {op}; registered: {sorted(table)} "
                          "(or 'auto')")
    backend = table[name]
    ok, reason = backend.is_available()
    if not ok:
        raise ConfigError(f"{chosen_by}: kernel backend {name!r} for {op} cannot run here: {reason}")
    why = refusal(backend, full)
    if why is None:
        return
    keys = {key: elsewhere.get(key, f"{where}.{key}") for key in full}
    raise ConfigError(f"{keys[why.settings[0]]}: kernel backend {name!r} for {op} (chosen by {chosen_by}) cannot serve "
                      f"{why.describe(full, keys)}: {why.why}; backends that can: {', '.join(_capable(op, full))} "
                      "(or 'auto')")


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
