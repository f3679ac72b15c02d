"""Budget curves on the harder task: held-out pass@1 against optimizer steps, per arm, over seeds.

    python bench/hard_task.py                                   # 5 seeds, the default arms
    python bench/hard_task.py --seeds 0 1 --arms answer_only progressive --points 100 200
    python bench/hard_task.py --set student_steps=300 --seeds 0  # a smaller budget

Task: :meth:`hkd.commands.demo.DemoSettings.hard` -- sums of three 3-digit numbers with worked
column-by-column solutions (:mod:`hkd.tasks.chain`). One teacher (trained once on worked
solutions, cached in ``--work``) and one verified distilled data set serve every arm and seed;
the arms are :func:`hkd.commands.demo.arm_config`'s (the same as ``bench/quality.py``'s). Every
arm trains ``student_steps`` steps; the student is saved at each of ``--points`` steps *within
that one run* (the LR schedule and the phase boundaries are the full run's, so an early point
of a phased arm is the student mid-schedule, not a student trained for that budget), and each
saved student is scored by greedy pass@1 on the held-out problems.

Writes ``bench/results/hard-task/hard-task-DATE.json`` (command, machine, settings, seeds, every
point of every run, mean/std/min/max per arm and step) and a PNG with one line per arm
(mean) and a band (mean +- std over seeds); the teacher's pass@1 is the dashed line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import add_common_arguments, print_arms, run_header, settings_from, summary, write_result  # noqa: E402

from hkd.config import Config  # noqa: E402
from hkd.plugin.hookspecs import hookimpl  # noqa: E402
from hkd.train.loop import distill  # noqa: E402
from hkd.plugin.manager import build_manager  # noqa: E402
from hkd.models.loading import load_tokenizer  # noqa: E402
from hkd.tasks.chain import make_chain_problems  # noqa: E402
from hkd.commands.demo import ARMS, DemoSettings, arm_config, count_params, pass_at_1, prepare  # noqa: E402

# progressive is left out by default: progressive_rl runs exactly its phases until the RL phase's start (the
# 570-step point), then 30 RL steps
DEFAULT_ARMS = ("answer_only", "sft_distilled", "logits_only", "hidden_logits", "progressive_overlap",
                "progressive_rl")
PLOTS = Path(__file__).resolve().parent / "results"


class StepSnapshots:
    """Saves the student (with its tokenizer) after each of the given optimizer steps."""

    def __init__(self, out: Path, steps: list[int]) -> None:
        self.out = out
        self.steps = set(steps)
        self.student: Any = None
        self.tokenizer_dir: Path | None = None
        self.saved: dict[int, Path] = {}

    @hookimpl
    def hkd_on_train_start(self, config: Config, run_dir: Path, student: torch.nn.Module) -> None:
        self.student = student
        self.tokenizer_dir = Path(config.student.path) if config.student.path else run_dir / "models" / "student"

    @hookimpl
    def hkd_after_step(self, step: int) -> None:
        if step not in self.steps:
            return
        target = self.out / f"step-{step}"
        self.student.save_pretrained(target, safe_serialization=True)
        assert self.tokenizer_dir is not None
        tokenizer = load_tokenizer(self.tokenizer_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(target)
        self.saved[step] = target


def budget_points(total: int, points: list[int] | None) -> list[int]:
    """The steps to score: ``points`` (each within 1..total), or six evenly spaced ones ending at ``total``."""
    if points is None:
        return sorted({max(1, round(total * i / 6)) for i in range(1, 7)})
    bad = [p for p in points if not 1 <= p <= total]
    if bad:
        raise ValueError(f"--points {bad}: every point must be a step between 1 and student_steps={total}")
    return sorted(set(points) | {total})


def curve_summary(runs: list[dict[str, Any]], steps: list[int]) -> dict[str, dict[str, float]]:
    """Per step: mean, sample std, min and max of pass@1 over the runs (seeds)."""
    return {str(step): summary([run["curve"][str(step)] for run in runs]) for step in steps}


def plot_curves(report: dict[str, Any], target: Path) -> str:
    """One line (mean) and band (mean +- std) per arm; the teacher's pass@1 dashed. Returns a note."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'hkd[plot]')"
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for arm, entry in report["arms"].items():
        steps = [int(s) for s in entry["curve"]]
        mean = [entry["curve"][str(s)]["mean"] for s in steps]
        std = [entry["curve"][str(s)]["std"] for s in steps]
        (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=arm)
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.15)
    ax.axhline(report["teacher"]["pass@1"], color="black", linestyle="--", linewidth=1, label="teacher")
    ax.set_xlabel("student optimizer steps (points within one run per arm and seed)")
    ax.set_ylabel("held-out greedy pass@1")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"hard task ({report['settings']['operands']} x {report['settings']['digits']}-digit sums): "
                 f"mean +- std over {len(report['seeds'])} seeds", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return f"plot: {target}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "hard-task")
    parser.set_defaults(seeds=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(DEFAULT_ARMS))
    parser.add_argument("--points", type=int, nargs="+", help="steps to score (default: six evenly spaced)")
    parser.add_argument("--plot", help="PNG path (default: the JSON path with .png)")
    parser.add_argument("--progress", action="store_true", help="progress bars for every sub-run")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    settings = settings_from(args, parser, DemoSettings.hard())
    try:
        steps = budget_points(settings.student_steps, args.points)
    except ValueError as exc:
        parser.error(str(exc))
    work = Path(args.work)
    try:
        make_chain_problems(1, settings.digits, settings.operands, seed=0)  # refuse bad --set values before any work
    except ValueError as exc:
        parser.error(f"--set digits/operands: {exc}")
    data, teacher, distilled = prepare(settings, work, args.progress)
    teacher_pass = pass_at_1(teacher, data.heldout, settings)
    teacher_params = count_params(teacher)
    print(f"teacher pass@1 {teacher_pass:.3f} ({teacher_params:,} params); scoring steps {steps}", flush=True)

    per_arm: dict[str, dict[str, Any]] = {arm: {"runs": []} for arm in args.arms}
    student_params = 0
    for seed in args.seeds:  # seed-major: an interrupted run still has every arm for the seeds it finished
        for arm in args.arms:
            t0 = time.perf_counter()
            config = arm_config(arm, settings, data, teacher, distilled, seed, args.progress)
            run_dir = work / "students" / f"{arm}-seed{seed}"
            snapshots = StepSnapshots(run_dir / "at", steps)
            distill(config, run_dir, pm=build_manager(extra_plugins=[("hard-task-steps", snapshots)]))
            trained = time.perf_counter() - t0
            curve = {str(step): pass_at_1(snapshots.saved[step], data.heldout, settings) for step in steps}
            student_params = count_params(snapshots.saved[steps[-1]])
            per_arm[arm]["runs"].append({"seed": seed, "curve": curve, "train_seconds": round(trained, 1),
                                         "seconds": round(time.perf_counter() - t0, 1)})
            print(f"seed {seed} {arm:15s} " + " ".join(f"{s}:{curve[str(s)]:.3f}" for s in steps)
                  + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
    for entry in per_arm.values():
        entry["curve"] = curve_summary(entry["runs"], steps)
        entry["pass@1"] = entry["curve"][str(steps[-1])]  # the final budget

    report = {
        **run_header("hard_task.py", argv),
        "settings": settings.__dict__,
        "seeds": args.seeds,
        "steps": steps,
        "teacher": {"pass@1": teacher_pass, "params": teacher_params},
        "student_params": student_params,
        "distilled_examples": sum(1 for _ in distilled.open()),
        "arms": per_arm,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = write_result(args, "hard-task", report)
    note = plot_curves(report, Path(args.plot) if args.plot else out.with_suffix(".png"))
    print(f"\nteacher pass@1 {teacher_pass:.3f}; student {student_params:,} params "
          f"({student_params / teacher_params:.2f} of the teacher); {len(args.seeds)} seeds; "
          f"pass@1 at {steps[-1]} steps:")
    print_arms(per_arm, 16)
    print(note)
    print(f"written to {out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
