"""Benchmark: a student cut from its teacher (``hkd init-student``) vs the same architecture at random init.

    python bench/init_student.py                                  # 3 seeds, logits_only, demo's 800 steps
    python bench/init_student.py --set student_steps=200 --arms logits_only progressive

The demo's task, teacher (4 blocks, hidden 64, 4 heads / 2 KV heads, MLP 128; cached in the
work directory) and distilled data. The student architecture is the demo's (2 blocks, hidden
32, 2 heads / 1 KV head, MLP 64). Two initialisations of it:

* ``random``: the demo's preset student (seeded random weights);
* ``teacher``: ``hkd init-student --layers every:2 --hidden 32 --intermediate 64 --heads 2``
  (teacher blocks 1 and 3, the most active channels, neurons and KV group, measured on 4
  batches of the teacher's training text), written once; the seed changes the batch order.

Each (arm, init, seed) trains the same number of optimizer steps with the demo's stage
settings; reported: held-out greedy pass@1 (mean, sample std, min, max over seeds), and the
pass@1 of the cut student before any training. JSON with the command, machine and seeds goes
to ``bench/results/init-student/init-student-DATE.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import add_common_arguments, print_arms, run_header, settings_from, summary, write_result  # noqa: E402

from hkd.config import ModelConfig  # noqa: E402
from hkd.commands.demo import DemoSettings, arm_config, count_params, pass_at_1, prepare, train_student  # noqa: E402
from hkd.commands.init_student import InitOptions, init_student  # noqa: E402

INITS = ("random", "teacher")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=["logits_only"], help="hkd.commands.demo arms (default logits_only)")
    add_common_arguments(parser, "init-student")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    settings = settings_from(args, parser, DemoSettings())
    work = Path(args.work)
    data, teacher, distilled = prepare(settings, work, False)
    teacher_pass = pass_at_1(teacher, data.heldout, settings)
    arch = settings.student_arch
    options = InitOptions(layers="every:2", hidden=arch["hidden_size"], intermediate=arch["intermediate_size"],
                          heads=arch["num_attention_heads"], data=str(data.teacher_train), prompt_field="prompt")
    cut = init_student(teacher, work / "init-student", options)
    cut_pass = pass_at_1(cut, data.heldout, settings)
    print(f"teacher pass@1 {teacher_pass:.3f}; cut student before training {cut_pass:.3f}", flush=True)

    results: dict[str, dict[str, Any]] = {}
    for seed in args.seeds:
        for arm in args.arms:
            for init in INITS:
                t0 = time.perf_counter()
                config = arm_config(arm, settings, data, teacher, distilled, seed, False)
                if init == "teacher":
                    config.student = ModelConfig(path=str(cut))
                phases = train_student(config, work / "students" / f"{arm}-{init}-seed{seed}")
                final = phases[config.schedule.phases[-1].name]
                score = pass_at_1(final, data.heldout, settings)
                entry = results.setdefault(f"{arm}/{init}", {"runs": [], "params": count_params(final)})
                entry["runs"].append({"seed": seed, "pass@1": score, "seconds": round(time.perf_counter() - t0, 1)})
                print(f"seed {seed} {arm}/{init:8s} pass@1 {score:.3f} [{time.perf_counter() - t0:.0f} s]", flush=True)
    for entry in results.values():
        entry["pass@1"] = summary([r["pass@1"] for r in entry["runs"]])

    report = {
        **run_header("init_student.py", argv),
        "settings": settings.__dict__,
        "seeds": args.seeds,
        "init_options": options.__dict__ | {"data": "OUT/data/teacher_train.jsonl"},
        "teacher": {"pass@1": teacher_pass, "params": count_params(teacher)},
        "cut_student_before_training": {"pass@1": cut_pass},
        "arms": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = write_result(args, "init-student", report)
    print(f"\n{len(args.seeds)} seeds, {settings.student_steps} steps")
    print_arms(results, 24)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
