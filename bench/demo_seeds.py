"""What ``hkd demo`` gives across seeds: the README's demo table as mean, spread and range.

    python bench/demo_seeds.py --seeds 0 1 2            # full demo per seed, one after another
    python bench/demo_seeds.py --seeds 0 1 2 --quick

Each seed is one ``hkd demo --seed S --no-progress`` in a subprocess, run one after another
(never in parallel: on a shared 2-core machine that changes the timings it records); the
seed changes the teacher's and the students' initialisation, the problem splits and the
batch order. Writes ``bench/results/demo-seeds/demo-seeds-DATE.json``: command, machine, each run's
``results.json`` rows and wall time, and per model mean, sample std, min and max of pass@1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import folder, header  # noqa: E402


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "load_avg_at_start": os.getloadavg()}


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="hkd demo --quick per seed")
    parser.add_argument("--work", default="runs/demo-seeds", help="run directories go here (one per seed)")
    parser.add_argument("--out", help="JSON file (default bench/results/demo-seeds/demo-seeds[-quick]-DATE.json)")
    args = parser.parse_args(argv)
    machine_info = machine()
    runs = []
    for seed in args.seeds:
        out = Path(args.work) / f"seed-{seed}"
        command = [sys.executable, "-m", "hkd.cli", "demo", "--seed", str(seed), "--out", str(out), "--no-progress"]
        if args.quick:
            command.append("--quick")
        print("$ hkd", " ".join(command[3:]), flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - started
        results = json.loads((out / "results.json").read_text())
        runs.append({"seed": seed, "wall_s": round(wall, 1), "demo_seconds": results["seconds"],
                     "rows": {row["model"]: row["pass@1"] for row in results["rows"]}})
    models = list(runs[0]["rows"])
    table = {m: summary([run["rows"][m] for run in runs if m in run["rows"]]) for m in models}
    content = {
        **header("demo_seeds.py", argv, f"cpu: {machine_info['cpu']}, {machine_info['cores']} cores"),
        "machine": machine_info,
        "quick": args.quick,
        "runs": runs,
        "pass@1": table,
        "wall_s": summary([run["wall_s"] for run in runs]),
    }
    name = f"demo-seeds{'-quick' if args.quick else ''}-{dt.date.today().isoformat()}.json"
    target = Path(args.out) if args.out else folder("demo-seeds") / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(content, indent=1))
    width = max(len(m) for m in models)
    print(f"{'model'.ljust(width)}  pass@1 mean ± std  min - max")
    for m, s in table.items():
        print(f"{m.ljust(width)}  {s['mean']:.3f} ± {s['std']:.3f}      {s['min']:.3f} - {s['max']:.3f}")
    print(f"wall time per run: {content['wall_s']['mean']:.0f} s (min {content['wall_s']['min']:.0f}, "
          f"max {content['wall_s']['max']:.0f}); written to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
