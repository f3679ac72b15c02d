"""Benchmark: student tokens/s with the teacher on its own rank against the teacher colocated.

    python bench/teacher_ranks.py                       # 3 rounds, 12 steps each, on this machine's cores
    python bench/teacher_ranks.py --rounds 5 --steps 20 --teacher-scale 4

A teacher with ``--teacher-scale`` times the student's forward compute (the same depth, width times
sqrt(scale): matrix FLOPs per token grow with width squared) distils into the student with the
hidden-state and logits stages (full logits). Three arms on the same cores (``--cores``, default all
of this machine's, at most 2 used):

* ``colocated_1x1``: one process, one thread, one core: teacher forward, then student forward and
  backward, every micro-batch (the colocated loop as it runs);
* ``colocated_1x2``: one process, two threads on both cores (the colocated loop given the same cores);
* ``ranked_2x1``: ``teacher.placement: ranks`` under torchrun, a student rank and a teacher rank, one
  thread each, both processes on the same two cores (``taskset``): the teacher's forward for the
  next micro-batches overlaps the student's step.

Reported per arm: the median over steps 3.. of the student's ``tokens_per_s`` (metrics.jsonl), per
round; the ratios are of medians over rounds, arms interleaved round by round so that a busy machine
slows them alike. JSON with the command, machine, load average and
versions goes to ``bench/results/teacher-ranks/teacher-ranks-DATE.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import default_path, header  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STUDENT = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
           "num_key_value_heads": 2}


def teacher_shape(scale: float) -> dict[str, int]:
    heads = 4
    width = int(round(STUDENT["hidden_size"] * math.sqrt(scale) / (2 * heads))) * 2 * heads  # divisible by heads
    return {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": STUDENT["num_hidden_layers"],
            "num_attention_heads": heads, "num_key_value_heads": 2}


def base_config(scale: float, steps: int, batch: int, length: int) -> dict[str, Any]:
    return {
        "teacher": {"preset": "tiny-llama", "preset_overrides": teacher_shape(scale), "seed": 1},
        "student": {"preset": "tiny-llama", "preset_overrides": STUDENT, "seed": 2},
        "data": {"kind": "synthetic", "num_examples": 4096, "batch_size": batch, "max_length": length, "digits": 12},
        "schedule": {"phases": [{"name": "all", "steps": steps, "stages": {"hidden": 0.5, "logits": 1.0}}]},
        "optim": {"lr": 1e-3, "grad_accum": 2},
        "train": {"progress": False, "device": "cpu", "precision": "fp32"},
        "logging": {"backends": ["jsonl"]},
    }


def run_arm(arm: str, config: dict[str, Any], work: Path, cores: list[int]) -> list[float]:
    out = work / arm
    if out.exists():
        import shutil

        shutil.rmtree(out)
    raw = copy.deepcopy(config)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if arm == "ranked_2x1":
        raw["teacher"]["placement"] = "ranks"
        cmd = ["taskset", "-c", ",".join(map(str, cores)), sys.executable, "-m", "torch.distributed.run",
               "--standalone", "--nproc_per_node=2"]
    else:
        threads = 2 if arm == "colocated_1x2" else 1
        env["OMP_NUM_THREADS"] = str(threads)
        cmd = ["taskset", "-c", ",".join(map(str, cores[:threads])), sys.executable]
    path = work / f"{arm}.yaml"
    path.write_text(yaml.safe_dump(raw))
    cmd += ["-m", "hkd.cli", "distill", str(path), "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{arm} failed:\n{proc.stderr[-3000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if arm == "ranked_2x1":  # what each side did: RUN_DIR/ranks/rank-<R>.json
        facts = [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank-*.json"))]
        BREAKDOWN.append({"student_waited_s": facts[0]["waited_for_teacher_s"][0],
                          "teacher_compute_s": facts[1]["compute_s"], "teacher_send_s": facts[1]["send_s"],
                          "bytes_per_micro_batch": facts[1]["bytes"] / max(1, facts[1]["sent"]),
                          "student_run_s": sum(m["tokens"] / m["tokens_per_s"] for m in lines)})
    return [m["tokens_per_s"] for m in lines[2:]]  # steps 3..: start-up and the teacher's first fill excluded


BREAKDOWN: list[dict[str, float]] = []  # per ranked round


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--teacher-scale", type=float, default=4.0, help="teacher forward compute / student's")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--cores", default="0,1", help="the two cores the arms share")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench-teacher-ranks"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    cores = [int(c) for c in args.cores.split(",")][:2]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    config = base_config(args.teacher_scale, args.steps, args.batch, args.length)
    arms = ["colocated_1x1", "colocated_1x2", "ranked_2x1"]
    per_round: dict[str, list[float]] = {arm: [] for arm in arms}
    started = time.time()
    for round_ in range(args.rounds):
        for arm in arms:
            rates = run_arm(arm, config, work, cores)
            per_round[arm].append(statistics.median(rates))
            print(f"round {round_ + 1}: {arm:14s} {per_round[arm][-1]:10.0f} student tokens/s", flush=True)
    median = {arm: statistics.median(v) for arm, v in per_round.items()}
    ratios = {"ranked_2x1 / colocated_1x1": median["ranked_2x1"] / median["colocated_1x1"],
              "ranked_2x1 / colocated_1x2": median["ranked_2x1"] / median["colocated_1x2"]}
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    for facts in BREAKDOWN:
        print("ranked: student waited {student_waited_s:.2f} s of {student_run_s:.2f} s of steps; teacher computed "
              "{teacher_compute_s:.2f} s, sent (incl. waiting for a slot) {teacher_send_s:.2f} s; "
              "{bytes_per_micro_batch:.0f} bytes per micro-batch".format(**facts))
    print(f"load average while it ran: {os.getloadavg()}")
    result = {
        **header("teacher_ranks.py", argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "student": STUDENT, "teacher": teacher_shape(args.teacher_scale), "teacher_scale": args.teacher_scale,
        "batch": args.batch, "length": args.length, "steps": args.steps, "rounds": args.rounds,
        "tokens_per_s_per_round": per_round, "tokens_per_s_median": median, "ratios": ratios,
        "ranked_breakdown": BREAKDOWN,
        "seconds": round(time.time() - started, 1), "load_average_at_end": os.getloadavg(),
    }
    if not args.no_write:
        out = default_path("teacher-ranks")
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
