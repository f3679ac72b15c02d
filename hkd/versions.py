"""Which releases of its dependencies hkd supports, and errors that say so when one breaks an import.

The supported ranges are read from hkd's installed metadata (``importlib.metadata.requires("hkd")``,
i.e. pyproject.toml's dependencies and extras): pyproject.toml is the one place they are written.
:data:`TESTED_UP_TO` records the newest releases the test suite has passed with; it is not an
upper bound, only what a message names as known to work.

When an upstream release breaks hkd's imports (a renamed function, a new required package), the
error names the package, its installed version and the range that works::

    transformers 5.99.0 is installed, but importing it failed (ModuleNotFoundError: No module named
    'kernels'). hkd 0.1.0 supports transformers>=5.21 and was last tested with transformers 5.25.0:
    pip install 'transformers>=5.21,<=5.25.0'

``python -m hkd.versions`` prints every dependency's range, installed version and tested version.
The lowest layer of hkd: the standard library and :mod:`hkd.errors` only, and nothing on the hot
path (each package is checked once per process).
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import os
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from types import ModuleType

from hkd.errors import HkdError

# The newest releases the whole test suite passed with (CI installs the newest releases; after a
# green run on newer ones, raise these: `python -m hkd.versions` marks them "newer than tested").
TESTED_UP_TO = {
    "torch": "2.13.0",
    "transformers": "5.25.0",
    "tokenizers": "0.23.3",
    "safetensors": "0.8.0",
    "numpy": "2.4.6",
    "pluggy": "1.6.0",
    "einops": "0.8.2",
    "pyyaml": "6.0.3",
    "tqdm": "4.70.1",
    "triton": "3.9.0",
    "matplotlib": "3.11.2",
    "datasets": "5.2.0",
}
RUNTIME_EXTRAS = ("triton", "plot", "data")  # the extras hkd's own code imports (the others are tools)

_CHECKED: set[str] = set()
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*\(?([^;()]*)\)?\s*(?:;(.*))?$")
_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")
_CLAUSE = re.compile(r"^\s*(~=|===|==|!=|<=|>=|<|>)\s*(\S+?)\s*$")


def canonical(name: str) -> str:
    """A distribution name as pip compares them: ``PyYAML`` and ``pyyaml``, ``a_b`` and ``a-b`` agree."""
    return re.sub(r"[-_.]+", "-", name).lower()


@lru_cache(maxsize=None)
def requirements() -> dict[str, tuple[str, str | None]]:
    """``{name: (specifier, extra or None)}`` for hkd's own requirements; empty when hkd is not installed."""
    try:
        lines = metadata.requires("hkd") or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return {}
    found: dict[str, tuple[str, str | None]] = {}
    for line in lines:
        match = _REQUIREMENT.match(line)
        if match is None:
            continue
        name, spec, marker = canonical(match.group(1)), match.group(2).strip(), match.group(3) or ""
        extra = _EXTRA.search(marker)
        if name != "hkd" and name not in found:  # the test extra names hkd's own extras: skip the self-reference
            found[name] = (spec, extra.group(1) if extra else None)
    return found


def runtime_requirements() -> dict[str, str]:
    """The dependencies hkd's code imports: ``[project] dependencies`` and :data:`RUNTIME_EXTRAS`."""
    return {name: spec for name, (spec, extra) in requirements().items() if extra is None or extra in RUNTIME_EXTRAS}


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version: ``2.13.0+cpu`` -> (2, 13, 0); ``5.0.0rc1`` -> (5, 0, 0).

    Pre-release and local parts are ignored: the check is lenient at the edges, never wrong by a whole release.
    """
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def _padded(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)), b + (0,) * (width - len(b))


def satisfies(version: str, specifier: str) -> bool:
    """Whether ``version`` meets every clause of ``specifier`` (``>=5.21,<6``); unknown clauses pass."""
    have = release(version)
    for clause in filter(None, (c.strip() for c in specifier.split(","))):
        match = _CLAUSE.match(clause)
        if match is None:
            continue
        op, bound = match.groups()
        if bound.endswith(".*") and op in ("==", "!="):
            prefix = release(bound[:-2])
            if (have[: len(prefix)] == prefix) != (op == "=="):
                return False
            continue
        a, b = _padded(have, release(bound))
        ok = {
            ">=": a >= b, ">": a > b, "<=": a <= b, "<": a < b, "==": a == b, "===": a == b, "!=": a != b,
            "~=": a >= b and a[: len(release(bound)) - 1] == b[: len(release(bound)) - 1],
        }[op]
        if not ok:
            return False
    return True


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _hkd_version() -> str:
    return installed("hkd") or "(not installed)"


def working_range(name: str) -> str:
    """What to install: the declared range, capped at the newest tested release when one is recorded."""
    spec = requirements().get(name, ("", None))[0]
    tested = TESTED_UP_TO.get(name)
    if tested and satisfies(tested, spec):
        return f"{name}{spec},<={tested}" if spec else f"{name}<={tested}"
    return f"{name}{spec}"


def _supported(name: str) -> str:
    spec = requirements()[name][0]
    tested = TESTED_UP_TO.get(name)
    said = f"hkd {_hkd_version()} supports {name}{spec or ' (any version)'}"
    return said + (f" and was last tested with {name} {tested}" if tested else "")


def check(*names: str) -> None:
    """Refuse a dependency below hkd's declared range (pip allows it with --no-deps, conda mixes...).

    Each name is checked once per process; names hkd does not declare, or hkd without metadata, pass.
    """
    for name in map(canonical, names):
        if name in _CHECKED or name not in requirements():
            continue
        version = installed(name)
        if version is None:
            raise HkdError(f"{name} is not installed; {_supported(name)}: pip install '{working_range(name)}'")
        if not satisfies(version, requirements()[name][0]):
            raise HkdError(f"{name} {version} is installed; {_supported(name)}: pip install '{working_range(name)}'")
        _CHECKED.add(name)


@contextmanager
def importing(*names: str) -> Iterator[None]:
    """Check ``names`` (:func:`check`), then run the block's imports; an ImportError or AttributeError
    from a dependency becomes an :class:`HkdError` naming the package, its version and the working range."""
    check(*names)
    try:
        yield
    except (ImportError, AttributeError) as exc:
        message = explain(exc, default=names[0] if names else None)
        if message is None:
            raise
        raise HkdError(message) from exc


def explain(exc: BaseException, default: str | None = None) -> str | None:
    """The message for an import that failed inside one of hkd's dependencies, else None.

    An ImportError anywhere, or an AttributeError raised while a module was being imported, is blamed
    on the outermost dependency in its traceback (the package hkd imported, not the one it pulled in),
    else on the module the error names, else on ``default``. Never raises: it runs inside handlers.
    """
    try:
        if not isinstance(exc, ImportError) and not (isinstance(exc, AttributeError) and _during_import(exc)):
            return None
        name = _blame(exc) or (canonical(default) if default else None)
        if name is None or name not in requirements():
            return None
        version = installed(name)
        detail = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        if version is None:
            return f"{name} is not installed ({detail}). {_supported(name)}: pip install '{working_range(name)}'"
        return (f"{name} {version} is installed, but importing it failed ({detail}). {_supported(name)}: "
                f"pip install '{working_range(name)}'")
    except Exception:  # pragma: no cover - a diagnosis must never hide the error it diagnoses
        return None


def _during_import(exc: BaseException) -> bool:
    return any(frame.f_code.co_name == "<module>" for frame, _ in traceback.walk_tb(exc.__traceback__))


def _blame(exc: BaseException) -> str | None:
    places = _dependency_places()
    for frame, _ in traceback.walk_tb(exc.__traceback__):  # outermost first
        filename = os.path.abspath(frame.f_code.co_filename)
        for place, name in places:
            if filename == place or filename.startswith(place + os.sep):
                return name
    module = getattr(exc, "name", None) if isinstance(exc, ImportError) else None
    if module is None and isinstance(exc, AttributeError) and isinstance(getattr(exc, "obj", None), ModuleType):
        module = exc.obj.__name__  # type: ignore[attr-defined]
    return _module_owners().get(module.partition(".")[0]) if module else None


def _module_owners() -> dict[str, str]:
    """Top-level module -> the declared dependency that installs it (``yaml`` -> ``pyyaml``)."""
    declared = requirements()
    owners = {}
    for module, dists in metadata.packages_distributions().items():
        for dist in dists:
            if canonical(dist) in declared:
                owners[module] = canonical(dist)
    return owners


def _dependency_places() -> list[tuple[str, str]]:
    """(directory or file, dependency) for each declared dependency's top-level modules, found without importing them."""
    places = []
    for module, name in _module_owners().items():
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        for location in spec.submodule_search_locations or ([spec.origin] if spec.origin else []):
            places.append((os.path.abspath(location), name))
    return places


def report() -> list[tuple[str, str, str, str, str]]:
    """(package, required, installed, tested up to, note) for each runtime dependency."""
    rows = []
    for name, spec in runtime_requirements().items():
        version = installed(name)
        tested = TESTED_UP_TO.get(name, "")
        if version is None:
            note = "not installed"
        elif not satisfies(version, spec):
            note = "OUTSIDE THE RANGE"
        elif tested and release(version) > release(tested):
            note = "newer than tested"
        else:
            note = "ok"
        rows.append((name, spec or "any", version or "-", tested or "-", note))
    return rows


def main() -> int:
    rows = [("package", "required", "installed", "tested up to", ""), *report()]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if any(row[4] == "newer than tested" for row in rows[1:]):
        print("newer than tested: after a green run, raise TESTED_UP_TO in hkd/versions.py to these releases")
    return 1 if any(row[4] == "OUTSIDE THE RANGE" for row in rows[1:]) else 0


if __name__ == "__main__":
    sys.exit(main())
