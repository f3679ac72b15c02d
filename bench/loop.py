"""Overhead of hkd's training step against a bare loop doing the same work, in the same run.

    python bench/loop.py                      # CPU default: 4-layer 256-wide teacher, 2-layer student
    python bench/loop.py --hidden 768 --layers 12 --precision bf16-mixed   # on a GPU: >= 100M params
    python bench/loop.py --hidden 2560 --layers 8 --student-hidden 2048 --student-layers 8 --vocab 128256 \
        --batch-size 40 --precision bf16-mixed --fused      # a 1.0B student, Llama-3 vocabulary, fused LM head

Both loops run the same models, batches and optimizer settings: a live teacher forward
(no grad), the student forward and backward on the logits stage's loss (forward KL at T=1 via
``hkd.kernels.distill_loss``, normalised by the step's target tokens), gradient clipping and
an AdamW step. ``hkd`` is :func:`hkd.train.loop.train_step` (schedule, taps, stage dispatch, metrics,
one host read); ``bare`` is those operations written out by hand. They alternate in rounds
(``--rounds``, each ``--steps`` steps after a warm-up) so machine noise hits both alike; the
result is the median tokens/s of each (per CPU-second of the process on the CPU, per wall second
on CUDA) and ``overhead = bare / hkd - 1``. ``--fused`` sets ``stages.logits.fused`` (the LM head fused into the
loss kernel: no logits tensor) and the bare loop then calls
:func:`hkd.kernels.fused_linear_distill_loss` on the bodies' final hidden states likewise;
``--vocab`` gives both models that vocabulary size (the synthetic data's characters use the
first ids). The two preset models are written once and both loops load them. On CUDA it also
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
from hkd.models.loading import PRESET_RECIPE, write_preset
from hkd.train.distributed import clip_gradients
from hkd.train.loop import Run, build_run, train_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import folder, header  # noqa: E402


def model_specs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The teacher's and student's preset recipes: Llama-shaped, 4x wide MLPs, 64-wide heads; the
    student is half the teacher's width and depth unless ``--student-hidden`` / ``--student-layers``."""
    def llama(hidden: int, layers: int, seed: int) -> dict[str, Any]:
        overrides = {"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
                     "num_attention_heads": max(1, hidden // 64), "num_key_value_heads": max(1, hidden // 128)}
        if getattr(args, "vocab", None):
            overrides["vocab_size"] = args.vocab
        return {"preset": "tiny-llama", "seed": seed, "preset_overrides": overrides}

    student_hidden = getattr(args, "student_hidden", None) or args.hidden // 2
    student_layers = getattr(args, "student_layers", None) or max(1, args.layers // 2)
    return {"teacher": llama(args.hidden, args.layers, 1), "student": llama(student_hidden, student_layers, 2)}


def write_models(args: argparse.Namespace, root: Path) -> dict[str, dict[str, Any]]:
    """Write both preset models once under ``root`` (kept if ``root`` already holds them from the
    same recipe); the specs that load them by path. Two runs would otherwise each write their own
    copy, which takes long at a billion parameters."""
    specs = {}
    for role, spec in model_specs(args).items():
        recipe = {"preset": spec["preset"], "overrides": spec["preset_overrides"], "seed": spec["seed"]}
        written = root / role / PRESET_RECIPE
        if not (written.is_file() and json.loads(written.read_text()) == recipe):
            write_preset(spec["preset"], root / role, spec["preset_overrides"], spec["seed"])
        specs[role] = {"path": str(root / role)}
    return specs


def make_config(args: argparse.Namespace, device: str, models: dict[str, dict[str, Any]] | None = None) -> Config:
    models = models or model_specs(args)
    fused = bool(getattr(args, "fused", False))
    return from_dict(Config, {
        "teacher": models["teacher"],
        "student": models["student"],
        "data": {"kind": "synthetic", "num_examples": 256, "batch_size": args.batch_size, "max_length": args.length,
                 "digits": 6},
        "schedule": {"phases": [{"name": "decision", "steps": 10**6, "stages": {"logits": 1.0}}]},
        "stages": {"logits": {"fused": fused}},
        "optim": {"lr": 1e-4, "grad_clip": 1.0},
        "train": {"progress": False, "device": device, "precision": args.precision},
        "logging": {"backends": []},
    })


def bare_step(run: Run, step: int) -> int:
    """The same work as ``train_step`` for the logits stage, without hkd's machinery; returns tokens.
    With ``stages.logits.fused`` the bodies run without their LM heads and the fused loss takes
    their final hidden states and the heads' weights, as the stage does."""
    batch = {k: v.to(run.device) for k, v in run.batches.batch(step).items()}
    teacher = run.teachers[0].model
    targets = batch["labels"][:, 1:]
    tokens = int((targets != -100).sum())
    fused = run.config.stages.get("logits", {}).get("fused", False)
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.precision == "bf16-mixed"):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        if fused:
            with torch.no_grad():
                teacher_hidden = getattr(teacher, teacher.base_model_prefix)(**inputs).last_hidden_state
            student_hidden = getattr(run.student, run.student.base_model_prefix)(**inputs).last_hidden_state
            loss = kernels.fused_linear_distill_loss(
                student_hidden[:, :-1], run.student.get_output_embeddings().weight, teacher_hidden[:, :-1],
                teacher.get_output_embeddings().weight, labels=targets, reduction="sum") / max(tokens, 1)
        else:
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
    parser.add_argument("--student-hidden", type=int, help="student width (default: half the teacher's)")
    parser.add_argument("--student-layers", type=int, help="student depth (default: half the teacher's)")
    parser.add_argument("--vocab", type=int, help="vocabulary size of both models (default: the preset's, 100)")
    parser.add_argument("--fused", action="store_true", help="stages.logits.fused: the LM head fused into the loss")
    parser.add_argument("--models", help="folder for the two preset models, reused when it holds them already "
                                         "(default: a temporary one)")
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
        models = write_models(args, Path(args.models) if args.models else Path(tmp) / "models")
        ours = build_run(make_config(args, device, models), Path(tmp) / "hkd")
        bare = build_run(make_config(args, device, models), Path(tmp) / "bare")
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
        "precision": ours.precision, "fused": args.fused, "vocab": ours.student.config.vocab_size,
        "student_params": student_params, "teacher_params": teacher_params,
        "tokens_per_s": median, "rounds": rates,
        "overhead": median["bare"] / median["hkd"] - 1,
    }
    if device == "cuda":
        flops_per_token = 6 * student_params + 2 * teacher_params
        result["mfu"] = {name: rate * flops_per_token / (args.peak_tflops * 1e12) for name, rate in median.items()}
        result["peak_tflops"] = args.peak_tflops
    print(f"tokens/s  hkd {median['hkd']:.0f}  bare {median['bare']:.0f}  overhead {100 * result['overhead']:+.1f}%"
          f"  (median of {args.rounds} rounds x {args.steps} steps; student {student_params / 1e6:.1f}M, "
          f"teacher {teacher_params / 1e6:.1f}M params, {result['precision']}"
          f"{', fused LM head' if args.fused else ''})")
    out = Path(args.out) if args.out else folder("loop") / f"loop-{device}-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
