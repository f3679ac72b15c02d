"""Benchmark: does a teacher that enriches the data (pseudo-labels, augmentation) make up for
labels you do not have?

    python bench/enrich.py                                  # 3 seeds, the demo's settings
    python bench/enrich.py --seeds 0 1 2 --set student_steps=400

The demo's task (:mod:`hkd.commands.demo`: teacher trained on worked solutions, ``student_problems``
training prompts, held-out split). Only the first half of the training prompts keeps its
answers; the second half is unlabelled. All data goes through ``hkd generate``
(:func:`hkd.commands.generate.generate`) with the demo's verifier (``exact_answer``):

* ``half``: the teacher's greedy worked solutions for the labelled half, verified against
  their answers (the demo's data distillation on half the labels).
* ``half+pseudo``: plus the unlabelled half, ``mode: pseudo_label``: ``n`` samples at
  ``temperature``, majority answer, ``min_agreement``; kept completions reach the majority.
* ``half+augment``: plus one ``arith_operands`` variant of every labelled prompt (new
  operands, computed answer, never a held-out problem), solved greedily and verified.
* ``half+pseudo+augment``: both.
* ``full``: the teacher's verified solutions for all training prompts with their answers.

Every arm trains the demo's student with SFT on its data (the ``sft_distilled`` arm of
``bench/quality.py``) for ``student_steps`` steps; the seed changes the student's
initialisation and batch order (one teacher and one set of generated data serve every seed,
as in ``bench/quality.py``). Reported: held-out greedy pass@1 per arm (mean, sample std,
min, max), each data set's size, and the pseudo-labels' accuracy against the answers that
were withheld. JSON to ``bench/results/enrich/enrich-DATE.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import add_common_arguments, print_arms, run_header, settings_from, summary, write_result  # noqa: E402

from hkd.sampling.augment import TransformConfig  # noqa: E402
from hkd.config import ModelConfig  # noqa: E402
from hkd.data.encoding import read_jsonl  # noqa: E402
from hkd.commands.generate import GenerateConfig, generate, read_lines, rewrite_lines  # noqa: E402
from hkd.commands.demo import (  # noqa: E402
    DemoSettings, arm_config, pass_at_1, prepare_data, prepare_teacher, train_student,
)
from hkd.sampling.verify import VerifierConfig  # noqa: E402

ARMS = ("half", "half+pseudo", "half+augment", "half+pseudo+augment", "full")


def split_prompts(train_prompts: Path, folder: Path) -> dict[str, Path]:
    """The labelled first half (with answers), the second half without answers, and the second half's truth."""
    records = read_jsonl(train_prompts, "fail", ("id", "prompt", "answer"))
    half = len(records) // 2
    paths = {name: folder / f"{name}.jsonl" for name in ("labelled", "unlabelled", "withheld")}
    rewrite_lines(paths["labelled"], records[:half])
    rewrite_lines(paths["unlabelled"], [{"id": r["id"], "prompt": r["prompt"]} for r in records[half:]])
    rewrite_lines(paths["withheld"], records[half:])
    return paths


def teacher_data(settings: DemoSettings, teacher: Path, prompts: Path, output: Path, **changes: Any) -> list[dict[str, Any]]:
    """One ``hkd generate`` run (greedy, verified, as the demo's data distillation unless ``changes``)."""
    config = GenerateConfig(teacher=ModelConfig(path=str(teacher)), prompts=str(prompts), output=str(output),
                            n=1, temperature=0.0, max_new_tokens=settings.max_new_tokens, batch_size=100,
                            seed=settings.seed, device="cpu", verifiers=[VerifierConfig("exact_answer")],
                            progress=False)
    config = dataclasses.replace(config, **changes)
    config.validate()
    summary_ = generate(config)
    print(f"  {output.name}: {summary_.prompts} prompts, kept {summary_.kept} of {summary_.samples} "
          f"(rejected: {summary_.rejected or 'none'})", flush=True)
    return read_lines(output)


def pseudo_label_accuracy(ledger: Path, withheld: Path) -> dict[str, Any]:
    """How often the majority answer is the withheld true answer: all prompts, and those that pass min_agreement."""
    truth = {r["id"]: str(r["answer"]) for r in read_jsonl(withheld, "fail", ("id", "answer"))}
    labels = {pid: label for entry in read_lines(ledger) for pid, label in entry.get("pseudo_labels", {}).items()}
    return {"prompts": len(labels), "with_majority": sum(label["answer"] is not None for label in labels.values()),
            "majority_correct": sum(label["answer"] == truth[pid] for pid, label in labels.items()),
            "agreement_mean": sum(label["agreement"] for label in labels.values()) / max(len(labels), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "enrich")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--n", type=int, default=5, help="pseudo-labelling: samples per prompt")
    parser.add_argument("--temperature", type=float, default=0.7, help="pseudo-labelling: sampling temperature")
    parser.add_argument("--min-agreement", type=float, default=0.6, help="pseudo-labelling: majority share needed")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    settings = settings_from(args, parser, DemoSettings())
    work = Path(args.work)
    data = prepare_data(settings, work)
    teacher = prepare_teacher(settings, work, data, False)
    teacher_pass = pass_at_1(teacher, data.heldout, settings)
    print(f"teacher pass@1 {teacher_pass:.3f}", flush=True)
    folder = work / "enrich"
    folder.mkdir(parents=True, exist_ok=True)
    split = split_prompts(data.train_prompts, folder)

    # labelled half and its variants in one run: the sources' lines are the "half" data
    augmented = teacher_data(settings, teacher, split["labelled"], folder / "half-augmented.jsonl",
                             augment=[TransformConfig("arith_operands", 1, {"exclude": str(data.heldout.resolve())})])
    half = [line for line in augmented if "augmented_from" not in line]
    variants = [line for line in augmented if "augmented_from" in line]
    pseudo = teacher_data(settings, teacher, split["unlabelled"], folder / "pseudo.jsonl", mode="pseudo_label",
                          n=args.n, temperature=args.temperature, min_agreement=args.min_agreement,
                          max_new_tokens=settings.max_new_tokens)
    second_half = teacher_data(settings, teacher, split["withheld"], folder / "second-half.jsonl")
    accuracy = pseudo_label_accuracy(folder / "pseudo.jsonl.ledger.jsonl", split["withheld"])
    truth = {r["id"]: str(r["answer"]) for r in read_jsonl(split["withheld"], "fail", ("id", "answer"))}
    accuracy["kept_lines_wrong"] = sum(line["answer"] != truth[line["id"]] for line in pseudo)
    print(f"pseudo-labels: {accuracy}", flush=True)

    sets = {"half": half, "half+pseudo": half + pseudo, "half+augment": half + variants,
            "half+pseudo+augment": half + pseudo + variants, "full": half + second_half}
    sizes = {}
    for arm in args.arms:
        rewrite_lines(folder / f"train-{arm}.jsonl", sets[arm])
        sizes[arm] = len(sets[arm])
    print(f"training examples per arm: {sizes}", flush=True)

    results: dict[str, dict[str, Any]] = {}
    for seed in args.seeds:
        for arm in args.arms:
            t0 = time.perf_counter()
            config = arm_config("sft_distilled", settings, data, teacher, folder / f"train-{arm}.jsonl", seed, False)
            phases = train_student(config, work / "students" / f"{arm}-seed{seed}")
            score = pass_at_1(phases[config.schedule.phases[-1].name], data.heldout, settings)
            results.setdefault(arm, {"examples": sizes[arm], "runs": []})["runs"].append(
                {"seed": seed, "pass@1": score, "seconds": round(time.perf_counter() - t0, 1)})
            print(f"seed {seed} {arm:20s} pass@1 {score:.3f} [{time.perf_counter() - t0:.0f} s]", flush=True)
    for entry in results.values():
        entry["pass@1"] = summary([r["pass@1"] for r in entry["runs"]])

    report = {
        **run_header("enrich.py", argv),
        "settings": dataclasses.asdict(settings),
        "seeds": args.seeds,
        "pseudo_labelling": {"n": args.n, "temperature": args.temperature, "min_agreement": args.min_agreement,
                             **accuracy},
        "teacher_pass@1": teacher_pass,
        "arms": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = write_result(args, "enrich", report)
    print(f"\n{len(args.seeds)} seeds, {settings.student_steps} steps, teacher {teacher_pass:.3f}")
    print_arms(results, 20)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
