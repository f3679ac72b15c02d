"""Benchmark: a student distilled from two teachers (their mixture) against each teacher alone.

    python bench/teachers.py                                # 3 seeds, the demo's logits-only arm
    python bench/teachers.py --set student_steps=400 --seeds 0 1 2

The demo's task. Teacher A is the demo's teacher (cached in ``--work``); teacher B is the same
architecture trained on the same worked solutions from another initialisation
(``DemoSettings.seed + 1``). Every arm trains the demo's student for ``student_steps`` steps
with the logits stage (forward KL) on A's distilled data: ``teacher_a``, ``teacher_b``, and
``mixture`` (``teachers:`` A and B at equal weight: the KL to the average of their tempered
distributions). Reported: held-out greedy pass@1 per arm (mean, sample std, min, max over
seeds) and each teacher's own pass@1. JSON with the command, machine and seeds goes to
``bench/results/teachers/teachers-DATE.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import add_common_arguments, print_arms, run_header, settings_from, summary, write_result  # noqa: E402

from hkd.config import ModelConfig, TeacherConfig  # noqa: E402
from hkd.commands.demo import (  # noqa: E402
    DemoSettings, arm_config, pass_at_1, prepare, prepare_teacher, train_student,
)

ARMS = ("teacher_a", "teacher_b", "mixture")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "teachers")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    settings = settings_from(args, parser, DemoSettings())
    work = Path(args.work)
    data, teacher_a, distilled = prepare(settings, work, False)
    teacher_b = prepare_teacher(dataclasses.replace(settings, seed=settings.seed + 1), work / "teacher-b", data, False)
    teachers = {name: {"pass@1": pass_at_1(path, data.heldout, settings)}
                for name, path in (("a", teacher_a), ("b", teacher_b))}
    print(f"teacher A pass@1 {teachers['a']['pass@1']:.3f}, teacher B {teachers['b']['pass@1']:.3f}", flush=True)

    results: dict[str, dict[str, Any]] = {}
    for seed in args.seeds:
        for arm in ARMS:
            t0 = time.perf_counter()
            config = arm_config("logits_only", settings, data, teacher_a, distilled, seed, False)
            if arm == "teacher_b":
                config.teacher = ModelConfig(path=str(teacher_b))
            elif arm == "mixture":
                config.teachers = [TeacherConfig(path=str(teacher_b), weight=1.0)]
            phases = train_student(config, work / "students" / f"{arm}-seed{seed}")
            score = pass_at_1(phases[config.schedule.phases[-1].name], data.heldout, settings)
            results.setdefault(arm, {"runs": []})["runs"].append(
                {"seed": seed, "pass@1": score, "seconds": round(time.perf_counter() - t0, 1)})
            print(f"seed {seed} {arm:10s} pass@1 {score:.3f} [{time.perf_counter() - t0:.0f} s]", flush=True)
    for entry in results.values():
        entry["pass@1"] = summary([r["pass@1"] for r in entry["runs"]])

    report = {
        **run_header("teachers.py", argv),
        "settings": dataclasses.asdict(settings),
        "seeds": args.seeds,
        "teachers": teachers,
        "arms": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = write_result(args, "teachers", report)
    print(f"\n{len(args.seeds)} seeds, {settings.student_steps} steps")
    print_arms(results, 12)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
