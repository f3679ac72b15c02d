"""Benchmark: a student with its own tokenizer distilled from the demo's teacher (``uld`` stage) vs SFT.

    python bench/cross_tokenizer.py                       # 3 seeds, the demo's 800 steps
    python bench/cross_tokenizer.py --set student_steps=200 --arms answer_only uld

The demo's task, teacher (character-level tokenizer, 100 entries; cached in the work
directory) and verified distilled data. The student has the demo's architecture but a
byte-level BPE tokenizer trained on the teacher's training text (``--vocab`` entries, 300 by
default: 256 bytes, 4 specials and merges such as ``11`` or `` c``), so teacher and student
disagree on both vocabulary and segmentation. Arms, same steps, same student initialisation
per seed:

* ``answer_only``: SFT on the training problems' final answers (no teacher at all);
* ``sft_distilled``: SFT on the teacher's verified worked solutions (data distillation only);
* ``uld``: the ``uld`` stage (span alignment, shared entries by generalized KL, the rest by
  ULD, ``alpha`` 0.5 hard labels) on the same distilled data;
* ``uld_pure``: the same with ``shared: none`` (ULD over the whole vocabularies);
* ``uld_first_char``: the same with ``shared: first_char`` (next-first-character KL + ULD).

Reported: held-out greedy pass@1 (mean, sample std, min, max over seeds); JSON with the
command, machine and seeds in ``bench/results/cross-tokenizer/cross-tokenizer-DATE.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import add_common_arguments, print_arms, run_header, settings_from, summary, write_result  # noqa: E402

from hkd.config import ModelConfig  # noqa: E402
from hkd.commands.demo import DemoSettings, arm_config, make_config, pass_at_1, prepare, train_student  # noqa: E402
from hkd.models.loading import build_preset  # noqa: E402
from hkd.data.tokenalign import train_bpe_tokenizer  # noqa: E402

ARMS = ("answer_only", "sft_distilled", "uld", "uld_pure", "uld_first_char")
SHARED = {"uld": "kl", "uld_pure": "none", "uld_first_char": "first_char"}


def write_student(settings: DemoSettings, texts: list[str], vocab: int, seed: int, out: Path) -> Path:
    """The demo's student architecture with a BPE tokenizer trained on ``texts``, randomly initialised."""
    tokenizer = train_bpe_tokenizer(texts, vocab)
    model = build_preset("tiny-llama", {**settings.student_arch, "vocab_size": len(tokenizer)}, seed=100 + seed)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--vocab", type=int, default=300, help="student BPE vocabulary size")
    add_common_arguments(parser, "cross-tokenizer")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    settings = settings_from(args, parser, DemoSettings())
    work = Path(args.work)
    data, teacher, distilled = prepare(settings, work, False)
    teacher_pass = pass_at_1(teacher, data.heldout, settings)
    texts = [r["prompt"] + r["completion"] for r in map(json.loads, data.teacher_train.read_text().splitlines())]

    results: dict[str, dict[str, Any]] = {}
    for seed in args.seeds:
        student_dir = write_student(settings, texts, args.vocab, seed, work / "students" / f"bpe-seed{seed}")
        for arm in args.arms:
            t0 = time.perf_counter()
            student = {"path": str(student_dir)}
            if arm in ("answer_only", "sft_distilled"):  # no teacher involved: the student stands in for it
                config = arm_config(arm, settings, data, teacher, distilled, seed, False)
                config.teacher, config.student = ModelConfig(path=str(student_dir)), ModelConfig(path=str(student_dir))
            else:
                config = make_config(settings, teacher={"path": str(teacher)}, student=student, data=distilled,
                                     phases=[{"name": "decision", "steps": settings.student_steps,
                                              "stages": {"uld": 1.0}}],
                                     stages={"uld": {"alpha": 0.5, "shared": SHARED[arm]}},
                                     lr=settings.student_lr, seed=seed, progress=False)
            phases = train_student(config, work / "runs" / f"{arm}-seed{seed}")
            final = phases[config.schedule.phases[-1].name]
            score = pass_at_1(final, data.heldout, settings)
            results.setdefault(arm, {"runs": []})["runs"].append(
                {"seed": seed, "pass@1": score, "seconds": round(time.perf_counter() - t0, 1)})
            print(f"seed {seed} {arm:14s} pass@1 {score:.3f} [{time.perf_counter() - t0:.0f} s]", flush=True)
    for entry in results.values():
        entry["pass@1"] = summary([r["pass@1"] for r in entry["runs"]])

    report = {
        **run_header("cross_tokenizer.py", argv),
        "settings": settings.__dict__,
        "seeds": args.seeds,
        "student_vocab": args.vocab,
        "teacher": {"pass@1": teacher_pass, "tokenizer": "character-level (hkd.models.loading.char_tokenizer)"},
        "arms": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = write_result(args, "cross-tokenizer", report)
    print(f"\nteacher pass@1 {teacher_pass:.3f}; {len(args.seeds)} seeds, {settings.student_steps} steps")
    print_arms(results, 14)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
