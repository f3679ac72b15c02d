"""Quality benchmark: which parts of the pipeline buy held-out accuracy, over several seeds.

    python bench/quality.py                      # 3 seeds, every arm (about 15 min on 2 cores)
    python bench/quality.py --seeds 0 1 --arms answer_only progressive_rl
    python bench/quality.py --quick              # plumbing check with the demo's quick settings

Same task (synthetic 2-digit addition, :mod:`hkd.commands.demo`'s splits), same student architecture
and the same number of optimizer steps for every arm:

* ``answer_only``    SFT on the training problems' final answers (no teacher at all)
* ``sft_distilled``  SFT on the teacher's verified worked solutions (data distillation only)
* ``logits_only``    logits KD (+ hard labels) on the distilled data
* ``hidden_logits``  feature -> decision phases
* ``progressive``    structure -> feature -> decision
* ``progressive_rl`` the same with the last ``rl_steps`` steps spent on RL correction
* ``progressive_overlap`` the progressive phases with the logits loss on from the first step

One teacher (trained once, cached in the work directory) and one distilled data set serve
every arm and seed; the seed changes the student's initialisation and the batch order.
Reported: held-out greedy pass@1 per arm (mean, sample std, min, max over seeds), the
student's size relative to the teacher, and for ``progressive_rl`` the pass@1 of the
checkpoint the RL phase starts from. The JSON (command, date, machine, settings, every
number) goes to ``bench/results/quality/quality-DATE.json``; the goals are evaluated from the
measured numbers, never asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import default_path, header  # noqa: E402
from hkd.commands.demo import ARMS, DemoSettings, arm_config, count_params, pass_at_1, prepare, train_student, write_json

def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def add_common_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The options every demo-task benchmark takes: seeds, work directory, threads, output, --set."""
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", default=f"runs/bench-{name}", help="run directory (teachers are cached here)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", help=f"JSON path (default bench/results/{name}/{name}-DATE.json)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a DemoSettings field, e.g. --set student_steps=400 (repeatable)")


def settings_from(args: argparse.Namespace, parser: argparse.ArgumentParser, base: DemoSettings) -> DemoSettings:
    """``base`` with every ``--set`` applied; also sets the torch thread count."""
    torch.set_num_threads(args.threads)  # 1: OpenMP threads spinning against other jobs cost more than they give
    settings = base
    for item in args.set:
        settings = override_setting(settings, item, parser)
    return settings


def write_result(args: argparse.Namespace, name: str, report: dict[str, Any]) -> Path:
    """Write ``report`` to ``--out`` or ``bench/results/<name>/<name>-DATE.json``; returns the path."""
    out = Path(args.out) if args.out else default_path(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    return out


def run_header(script: str, argv: list[str] | None) -> dict[str, Any]:
    """What every bench result file starts with: command, date, device, versions (provenance.header), machine."""
    return {
        **header(script, argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
    }


def print_arms(results: dict[str, dict[str, Any]], width: int) -> None:
    """The mean, std, min and max pass@1 of each arm, one line each."""
    print(f"{'arm':{width}s} {'mean':>6s} {'std':>6s} {'min':>6s} {'max':>6s}")
    for name, entry in results.items():
        s = entry["pass@1"]
        print(f"{name:{width}s} {s['mean']:6.3f} {s['std']:6.3f} {s['min']:6.3f} {s['max']:6.3f}")


def goals(arms: dict[str, Any], teacher: float, ratio: float) -> dict[str, Any]:
    """The targets, checked against what was measured (absent arms make a goal unknown)."""
    mean = {name: arm["pass@1"]["mean"] for name, arm in arms.items()}
    full = mean.get("progressive_rl")
    out: dict[str, Any] = {"student_params_vs_teacher": ratio, "student_at_most_quarter": ratio <= 0.25}
    if full is not None:
        out["full_vs_teacher"] = full / teacher if teacher else None
        out["full_at_least_90pct_of_teacher"] = teacher > 0 and full >= 0.9 * teacher
        if "answer_only" in mean:
            out["full_minus_answer_only"] = full - mean["answer_only"]
        out["full_at_least_every_ablation"] = all(full >= value for name, value in mean.items() if name != "progressive_rl")
        start = arms["progressive_rl"]["rl_start_pass@1"]["mean"]
        out["rl_gain_over_its_start"] = full - start
    return out


def override_setting(settings: DemoSettings, item: str, parser: argparse.ArgumentParser) -> DemoSettings:
    """``FIELD=VALUE`` -> a copy of ``settings`` with that scalar field replaced (typed like its default)."""
    name, sep, value = item.partition("=")
    current = getattr(settings, name, None)
    if not sep or not isinstance(current, (int, float)) or isinstance(current, bool):
        scalars = [f.name for f in dataclasses.fields(settings) if isinstance(getattr(settings, f.name), (int, float))]
        parser.error(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(scalars)}")
    try:
        return dataclasses.replace(settings, **{name: type(current)(value)})
    except ValueError:
        parser.error(f"--set {item!r}: {value!r} is not a {type(current).__name__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "quality")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--quick", action="store_true", help="the demo's quick settings (checks plumbing only)")
    parser.add_argument("--progress", action="store_true", help="progress bars for every sub-run")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    settings = settings_from(args, parser, DemoSettings.quick() if args.quick else DemoSettings())
    work = Path(args.work)
    data, teacher, distilled = prepare(settings, work, args.progress)
    teacher_pass = pass_at_1(teacher, data.heldout, settings)
    teacher_params = count_params(teacher)

    per_arm: dict[str, dict[str, Any]] = {arm: {"runs": []} for arm in args.arms}
    student_params = 0
    for seed in args.seeds:
        for arm in args.arms:
            t0 = time.perf_counter()
            config = arm_config(arm, settings, data, teacher, distilled, seed, args.progress)
            phases = train_student(config, work / "students" / f"{arm}-seed{seed}")
            final = phases[config.schedule.phases[-1].name]
            run: dict[str, Any] = {"seed": seed, "pass@1": pass_at_1(final, data.heldout, settings),
                                   "seconds": round(time.perf_counter() - t0, 1)}
            if arm == "progressive_rl":
                run["rl_start_pass@1"] = pass_at_1(phases["decision"], data.heldout, settings)
            student_params = count_params(final)
            per_arm[arm]["runs"].append(run)
            print(f"seed {seed} {arm:15s} pass@1 {run['pass@1']:.3f}"
                  + (f" (RL started from {run['rl_start_pass@1']:.3f})" if "rl_start_pass@1" in run else "")
                  + f"  [{run['seconds']:.0f} s]", flush=True)
    for arm, entry in per_arm.items():
        entry["pass@1"] = summary([r["pass@1"] for r in entry["runs"]])
        if arm == "progressive_rl":
            entry["rl_start_pass@1"] = summary([r["rl_start_pass@1"] for r in entry["runs"]])

    ratio = student_params / teacher_params
    report = {
        **run_header("quality.py", argv),
        "settings": settings.__dict__,
        "seeds": args.seeds,
        "teacher": {"pass@1": teacher_pass, "params": teacher_params},
        "student_params": student_params,
        "distilled_examples": sum(1 for _ in distilled.open()),
        "arms": per_arm,
        "goals": goals(per_arm, teacher_pass, ratio),
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = write_result(args, "quality", report)

    print(f"\nteacher pass@1 {teacher_pass:.3f} ({teacher_params:,} params); student {student_params:,} params "
          f"({ratio:.2f} of the teacher); {len(args.seeds)} seeds")
    print(f"{'arm':16s} {'mean':>6s} {'std':>6s} {'min':>6s} {'max':>6s}  vs teacher")
    for arm, entry in per_arm.items():
        s = entry["pass@1"]
        print(f"{arm:16s} {s['mean']:6.3f} {s['std']:6.3f} {s['min']:6.3f} {s['max']:6.3f}  "
              f"{s['mean'] / teacher_pass if teacher_pass else float('nan'):.2f}")
    if "progressive_rl" in per_arm:
        print(f"RL phase: from {per_arm['progressive_rl']['rl_start_pass@1']['mean']:.3f} "
              f"to {per_arm['progressive_rl']['pass@1']['mean']:.3f} (mean over seeds)")
    print(f"goals: {json.dumps(report['goals'])}")
    print(f"written to {out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
