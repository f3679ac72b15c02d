"""Start-up cost of the ``hkd`` command: wall time and peak memory before any real work.

    python bench/startup.py                 # 5 runs of each command, median and max
    python bench/startup.py --reps 10

Each command runs in a fresh interpreter (``python -m hkd.cli ...``), one after another, so
nothing is cached in-process; the operating system's file cache is warm after the first
run, as it is for a user typing commands. Peak resident memory comes from ``wait4``'s
rusage of each child. The targets (issue 18): ``--version`` and ``--help`` well under a
second, ``stages`` and ``plugins`` under two. ``python -X importtime -m hkd.cli CMD`` shows
which import costs what. Writes ``bench/results/startup/startup-DATE.json`` (command, machine, runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import default_path, header  # noqa: E402

COMMANDS = {"--version": 1.0, "--help": 1.0, "stages": 2.0, "plugins": 2.0}  # command -> target seconds


def run_once(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of ``python -m hkd.cli ARGS``."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "hkd.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"hkd {' '.join(args)} failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", help="JSON file (default bench/results/startup/startup-DATE.json)")
    args = parser.parse_args(argv)
    results = {}
    print(f"{'command':12} {'median s':>9} {'max s':>7} {'peak MiB':>9}  target")
    for command, target in COMMANDS.items():
        runs = [run_once(command.split()) for _ in range(args.reps)]
        walls = [w for w, _ in runs]
        results[command] = {"wall_s": walls, "median_s": statistics.median(walls), "max_s": max(walls),
                            "peak_rss_mib": max(m for _, m in runs), "target_s": target}
        r = results[command]
        verdict = "ok" if r["median_s"] < target else "OVER"
        print(f"{command:12} {r['median_s']:9.2f} {r['max_s']:7.2f} {r['peak_rss_mib']:9.0f}  < {target:.0f} s {verdict}")
    content = {
        **header("startup.py", argv),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_avg": os.getloadavg()},
        "results": results,
    }
    target_file = Path(args.out) if args.out else default_path("startup")
    target_file.parent.mkdir(parents=True, exist_ok=True)
    target_file.write_text(json.dumps(content, indent=1))
    print(f"written to {target_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
