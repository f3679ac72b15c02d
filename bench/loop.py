"""Overhead of hkd's training step against a bare loop doing the same work, in the same run.

    python bench/loop.py                      # CPU default: 4-layer 256-wide teacher, 2-layer student
    python bench/loop.py --hidden 768 --layers 12 --precision bf16-mixed   # on a GPU: >= 100M params

Both loops run the same models, batches and optimizer settings: a live teacher forward
(no grad), the student forward and backward on the logits stage's loss (forward KL at T=1 via
``hkd.kernels.distill_loss``, normalised by the step's target tokens), gradient clipping and
an AdamW step. ``hkd`` is :func:`hkd.train.loop.train_step` (schedule, taps, stage dispatch, metrics,
one host read); ``bare`` is those operations written out by hand. They alternate in rounds
(``--rounds``, each ``--steps`` steps after a warm-up) so machine noise hits both alike; the
result is the median tokens/s of each (per CPU-second of the process on the CPU, per wall second
on CUDA) and ``overhead = bare / hkd - 1``. On CUDA it also
reports model FLOPs utilisation (6 x student params + 2 x teacher params per token, against
``--peak-tflops``). JSON (device, date, command, numbers) goes to
``bench/results/loop/loop-{cpu,cuda}-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch

from hkd import kernels
from hkd.config import Config, from_dict
from hkd.train.distributed import clip_gradients
from hkd.train.loop import Run, build_run, train_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import folder, header  # noqa: E402


def make_config(args: argparse.Namespace, device: str) -> Config:
    def llama(hidden: int, layers: int, seed: int) -> dict[str, Any]:
        return {"preset": "tiny-llama", "seed": seed, "preset_overrides": {
            "hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": max(1, hidden // 64), "num_key_value_heads": max(1, hidden // 128)}}

    return from_dict(Config, {
        "teacher": llama(args.hidden, args.layers, 1),
        "student": llama(args.hidden // 2, max(1, args.layers // 2), 2),
        "data": {"kind": "synthetic", "num_examples": 256, "batch_size": args.batch_size, "max_length": args.length,
                 "digits": 6},
        "schedule": {"phases": [{"name": "decision", "steps": 10**6, "stages": {"logits": 1.0}}]},
        "optim": {"lr": 1e-4, "grad_clip": 1.0},
        "train": {"progress": False, "device": device, "precision": args.precision},
        "logging": {"backends": []},
    })


def bare_step(run: Run, step: int) -> int:
    """The same work as ``train_step`` for the logits stage, without hkd's machinery; returns tokens."""
    batch = {k: v.to(run.device) for k, v in run.batches.batch(step).items()}
    teacher = run.teachers[0].model
    targets = batch["labels"][:, 1:]
    tokens = int((targets != -100).sum())
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.precision == "bf16-mixed"):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits
        student_logits = run.student(**inputs).logits
        loss = kernels.distill_loss(student_logits[:, :-1], teacher_logits[:, :-1], labels=targets,
                                    reduction="sum") / max(tokens, 1)
    loss.backward()
    clip_gradients(run.params, run.config.optim.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return int(batch["attention_mask"].sum())


def timed(fn: Any, steps: int, first: int, device: torch.device) -> float:
    """Tokens/s of ``steps`` calls ``fn(step) -> tokens`` starting at step ``first``: per second of
    wall time on CUDA, per second of this process's CPU time on the CPU (other jobs on a shared
    machine then do not move the number)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    start, tokens = clock(), 0
    for step in range(first, first + steps):
        tokens += fn(step)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens / (clock() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="teacher width (student: half)")
    parser.add_argument("--layers", type=int, default=4, help="teacher depth (student: half)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and loop")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (H100 SXM bf16 dense: 989)")
    parser.add_argument("--out", help="JSON path (default bench/results/loop/loop-<device>-<time>.json)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with TemporaryDirectory() as tmp:
        ours = build_run(make_config(args, device), Path(tmp) / "hkd")
        bare = build_run(make_config(args, device), Path(tmp) / "bare")
        hkd_step = lambda step: (train_step(ours, step), int(ours.batches.counts(step)[1]))[1]  # noqa: E731
        for fn in (hkd_step, lambda step: bare_step(bare, step)):
            timed(fn, 2, 0, ours.device)  # warm-up: allocator, kernels, autotuning
        rates: dict[str, list[float]] = {"hkd": [], "bare": []}
        for round_index in range(args.rounds):
            first = 2 + round_index * args.steps
            rates["hkd"].append(timed(hkd_step, args.steps, first, ours.device))
            rates["bare"].append(timed(lambda step: bare_step(bare, step), args.steps, first, ours.device))
        student_params = sum(p.numel() for p in ours.student.parameters())
        teacher_params = sum(p.numel() for p in ours.teachers[0].model.parameters())
    median = {name: statistics.median(values) for name, values in rates.items()}
    result: dict[str, Any] = {
        **header("loop.py", argv, f"cuda: {torch.cuda.get_device_name()}" if device == "cuda" else None),
        "torch_threads": torch.get_num_threads(),
        "precision": ours.precision, "student_params": student_params, "teacher_params": teacher_params,
        "tokens_per_s": median, "rounds": rates,
        "overhead": median["bare"] / median["hkd"] - 1,
    }
    if device == "cuda":
        flops_per_token = 6 * student_params + 2 * teacher_params
        result["mfu"] = {name: rate * flops_per_token / (args.peak_tflops * 1e12) for name, rate in median.items()}
    print(f"tokens/s  hkd {median['hkd']:.0f}  bare {median['bare']:.0f}  overhead {100 * result['overhead']:+.1f}%"
          f"  (median of {args.rounds} rounds x {args.steps} steps; student {student_params / 1e6:.1f}M, "
          f"teacher {teacher_params / 1e6:.1f}M params, {result['precision']})")
    out = Path(args.out) if args.out else folder("loop") / f"loop-{device}-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
