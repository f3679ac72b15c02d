"""On-policy (GKD) against off-policy logits KD, at equal optimizer steps and equal teacher forwards.

    python bench/onpolicy.py                          # 3 seeds, every arm
    python bench/onpolicy.py --seeds 0 --arms logits gkd --set student_steps=200

Task: the demo's (synthetic 2-digit addition with worked solutions, :mod:`hkd.commands.demo`), its
teacher and its verified distilled data. Every arm first trains ``warm`` = half of
``student_steps`` steps of logits KD on the distilled data (the same for all arms: GKD starts
from a student that already writes the format, as in the paper), then the arm's own phase for
the other half:

* ``logits``      logits KD on the distilled data continues (forward KL, the demo's stage options)
* ``supervised``  the onpolicy stage with ``lmbda: 0``: reverse KL on the data's completions
                  (isolates the divergence from the sampling)
* ``gkd``         ``lmbda: 0.5``: half the steps on the student's own samples, reverse KL
* ``onpolicy``    ``lmbda: 1``: every step on the student's own samples, reverse KL

Every step of every arm runs the teacher once per micro-batch (on the data or on the samples),
so teacher forwards are equal; the on-policy arms also pay for sampling. Reported: held-out
greedy pass@1 per arm (mean, sample std, min, max over seeds) and seconds per run; the JSON goes
to ``bench/results/onpolicy/onpolicy-DATE.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import add_common_arguments, print_arms, run_header, settings_from, summary, write_result  # noqa: E402

from hkd.commands.demo import (  # noqa: E402
    DemoSettings, make_config, pass_at_1, prepare, stage_configs, student_model, train_student,
)

ARMS: dict[str, dict[str, Any] | None] = {
    "logits": None,
    "supervised": {"lmbda": 0.0},
    "gkd": {"lmbda": 0.5},
    "onpolicy": {"lmbda": 1.0},
}


def arm_phases(arm: str, total: int) -> list[dict[str, Any]]:
    warm = total // 2
    second = {"logits": 1.0} if ARMS[arm] is None else {"onpolicy": 1.0}
    return [{"name": "warm", "steps": warm, "stages": {"logits": 1.0}},
            {"name": arm, "steps": total - warm, "stages": second}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "onpolicy")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--max-new-tokens", type=int, default=40, help="the on-policy samples' length cap")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    settings = settings_from(args, parser, DemoSettings())
    work = Path(args.work)
    data, teacher, distilled = prepare(settings, work, args.progress)
    teacher_pass = pass_at_1(teacher, data.heldout, settings)
    per_arm: dict[str, dict[str, Any]] = {arm: {"runs": []} for arm in args.arms}
    for seed in args.seeds:
        for arm in args.arms:
            t0 = time.perf_counter()
            stages = stage_configs(settings, data)
            stages["onpolicy"] = {**(ARMS[arm] or {}), "divergence": "reverse_kl", "seed": seed,
                                  "max_new_tokens": args.max_new_tokens}
            config = make_config(settings, teacher={"path": str(teacher)}, student=student_model(settings, seed),
                                 data=distilled, phases=arm_phases(arm, settings.student_steps), stages=stages,
                                 lr=settings.student_lr, seed=seed, progress=args.progress)
            phases = train_student(config, work / "students" / f"{arm}-seed{seed}")
            run = {"seed": seed, "pass@1": pass_at_1(phases[arm], data.heldout, settings),
                   "warm_pass@1": pass_at_1(phases["warm"], data.heldout, settings),
                   "seconds": round(time.perf_counter() - t0, 1)}
            per_arm[arm]["runs"].append(run)
            print(f"seed {seed} {arm:10s} pass@1 {run['pass@1']:.3f} (after warm-up {run['warm_pass@1']:.3f})"
                  f"  [{run['seconds']:.0f} s]", flush=True)
    for entry in per_arm.values():
        entry["pass@1"] = summary([r["pass@1"] for r in entry["runs"]])
        entry["warm_pass@1"] = summary([r["warm_pass@1"] for r in entry["runs"]])
    report = {**run_header("onpolicy.py", argv), "settings": settings.__dict__, "seeds": args.seeds,
              "max_new_tokens": args.max_new_tokens, "teacher": {"pass@1": teacher_pass}, "arms": per_arm,
              "seconds": round(time.perf_counter() - started, 1)}
    out = write_result(args, "onpolicy", report)
    print(f"\nteacher pass@1 {teacher_pass:.3f}; {len(args.seeds)} seeds, {settings.student_steps} steps "
          f"({settings.student_steps // 2} warm-up)")
    print_arms(per_arm, 10)
    print(f"written to {out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
