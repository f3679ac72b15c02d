"""Where a benchmark's result goes, and what every result file records about how it was made.

``bench/results/`` holds one folder per benchmark (``bench/results/<benchmark>/``). Every
result file there starts with

* ``command``: the command line that wrote it (``python bench/<script>.py ...``);
* ``date``: when, in UTC (ISO 8601);
* ``device``: what it ran on (the GPU's name, or the CPU model and core count);
* ``versions``: Python, torch, transformers, triton and hkd (with the git commit of the checkout,
  ``+dirty`` when it had uncommitted changes); ``unrecorded`` where a file predates this record.

``docs/gen_benchmarks.py`` renders the documentation's benchmark tables from these files and
cites each one with its command, device, date and versions. This module imports nothing heavy
(``bench/startup.py`` times interpreter start-up with it loaded).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
UNRECORDED = "unrecorded"


def folder(benchmark: str) -> Path:
    """``bench/results/<benchmark>/``, created if missing."""
    path = RESULTS / benchmark
    path.mkdir(parents=True, exist_ok=True)
    return path


def dated_name(benchmark: str, suffix: str = "", ext: str = ".json") -> str:
    """``<benchmark><suffix>-YYYY-MM-DD.json``: the default file name of a run made today."""
    return f"{benchmark}{suffix}-{dt.date.today().isoformat()}{ext}"


def default_path(benchmark: str, suffix: str = "") -> Path:
    """``bench/results/<benchmark>/<benchmark><suffix>-DATE.json``."""
    return folder(benchmark) / dated_name(benchmark, suffix)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "hkd"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return UNRECORDED
    return f"{head}+dirty" if dirty else head


def versions() -> dict[str, str]:
    """Python and the packages a measurement depends on; hkd as ``VERSION (git COMMIT)``."""
    return {"python": platform.python_version(), "torch": _version("torch"),
            "transformers": _version("transformers"), "triton": _version("triton"),
            "hkd": f"{_version('hkd')} (git {_commit()})"}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device() -> str:
    """The GPU that torch uses when it has one (only if torch is already imported), else the CPU."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {cpu_name()}, {os.cpu_count()} cores"


def header(script: str, argv: list[str] | None, device_name: str | None = None) -> dict[str, Any]:
    """``command``, ``date``, ``device`` and ``versions``: the first keys of every result file."""
    args = argv if argv is not None else sys.argv[1:]
    return {
        "command": " ".join(["python", f"bench/{script}", *args]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name or device(),
        "versions": versions(),
    }
