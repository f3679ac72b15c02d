"""Render the tables of docs/benchmarks.md from the result files in bench/results/.

    python docs/gen_benchmarks.py           print every table (Markdown)
    python docs/gen_benchmarks.py --write   replace the generated blocks of docs/benchmarks.md
    python docs/gen_benchmarks.py --check   exit 1 when docs/benchmarks.md is out of date

The page holds blocks between ``<!-- BEGIN GENERATED: NAME -->`` and ``<!-- END GENERATED: NAME -->``;
each is rendered by the function ``TABLES[NAME]`` from the JSON files it names, followed by the
command, device, date and versions of every file it read (bench/provenance.py writes those
fields). The ``index`` block lists every result file, so a new one shows up on the page.
tests/test_docs.py runs the check.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PAGE = Path(__file__).resolve().parent / "benchmarks.md"
BLOCK = re.compile(r"(<!-- BEGIN GENERATED: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- END GENERATED: (?P=name) -->)", re.S)


# --------------------------------------------------------------------------- reading and formatting


def load(rel: str) -> dict[str, Any]:
    """A result file, by its path under bench/results/."""
    return json.loads((RESULTS / rel).read_text())


def stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pm(values: list[float], digits: int = 3) -> str:
    mean, std = stats(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def span(values: list[float], digits: int = 3) -> str:
    return f"{min(values):.{digits}f} – {max(values):.{digits}f}"


def table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def bold_best(cells: list[str], values: list[float], lowest: bool = False) -> list[str]:
    """``cells`` with the best value's cell in bold."""
    best = (min if lowest else max)(values)
    return [f"**{c}**" if v == best else c for c, v in zip(cells, values)]


def short_versions(versions: dict[str, str]) -> str:
    parts = [f"{name} {versions.get(key, 'unrecorded')}" for name, key in
             (("Python", "python"), ("torch", "torch"), ("transformers", "transformers"), ("hkd", "hkd"))]
    return ", ".join(parts)


def sources(*rels: str) -> list[str]:
    """The provenance of every file a table read: command, device, date, versions, path."""
    lines = ["", "Measured by:", ""]
    for rel in rels:
        d = load(rel)
        lines.append(f"- `{d['command']}` on {d['device']}, {d['date'][:10]} ({short_versions(d['versions'])}); "
                     f"`bench/results/{rel}`")
    return lines


def arm_runs(rels: Iterable[str], arm: str, seeds: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """The arm's runs from the files in order, each seed once (the first file that has it wins)."""
    wanted = set(seeds) if seeds is not None else None
    runs: dict[int, dict[str, Any]] = {}
    for rel in rels:
        for run in load(rel)["arms"].get(arm, {}).get("runs", []):
            if run["seed"] not in runs and (wanted is None or run["seed"] in wanted):
                runs[run["seed"]] = run
    return [runs[s] for s in sorted(runs)]


def values(runs: list[dict[str, Any]], key: str = "pass@1") -> list[float]:
    return [r[key] for r in runs]


def seeds_of(runs: list[dict[str, Any]]) -> str:
    return ", ".join(str(r["seed"]) for r in runs)


# --------------------------------------------------------------------------- the tables

DEMO = ["demo-seeds/demo-seeds-2026-11-27.json", "demo-seeds/demo-seeds-3-4-2026-11-27.json"]


def demo_seeds() -> list[str]:
    runs = [run for rel in DEMO for run in load(rel)["runs"]]
    models = list(runs[0]["rows"])
    rows = []
    for model in models:
        vals = [run["rows"][model] for run in runs]
        rows.append([model, pm(vals), span(vals), ", ".join(f"{v:.3f}" for v in vals)])
    out = table(["model", "pass@1 mean ± std", f"min – max ({len(runs)} seeds)",
                 "per seed (" + ", ".join(str(r["seed"]) for r in runs) + ")"], rows)
    walls = ", ".join(f"seed {r['seed']} {r['wall_s']:.0f} s" for r in runs)
    loads = "; ".join(f"{load(rel)['command'].split('--seeds')[1].split('--')[0].strip()}: "
                      f"{load(rel)['machine']['load_avg_at_start'][0]:.1f}" for rel in DEMO)
    out += ["", f"Wall time per run: {walls} (load average at the start, by seeds: {loads})."]
    return out + sources(*DEMO)


QUALITY_ARMS = [("answer_only", "SFT on answer-only data (no teacher)"), ("sft_distilled", "SFT on distilled data"),
                ("logits_only", "logits KD"), ("hidden_logits", "hidden → logits"),
                ("progressive", "progressive: attention → hidden → logits"),
                ("progressive_rl", "progressive + RL correction"),
                ("progressive_overlap", "progressive, logits on from the first step")]


def quality_table(*rels: str) -> list[str]:
    teacher = load(rels[0])["teacher"]["pass@1"]
    rows = []
    for arm, label in QUALITY_ARMS:
        runs = arm_runs(rels, arm)
        if not runs:
            continue
        vals = values(runs)
        note = ""
        if arm == "progressive_rl" and "rl_start_pass@1" in runs[0]:
            start = values(runs, "rl_start_pass@1")
            note = f" (RL phase from {statistics.fmean(start):.3f})"
        rows.append([label, pm(vals) + note, span(vals), f"{statistics.fmean(vals) / teacher:.2f}"])
    seeds = seeds_of(arm_runs(rels, QUALITY_ARMS[0][0]) or arm_runs(rels, "progressive_rl"))
    return table([f"arm (seeds {seeds})", "pass@1 mean ± std", "min – max", f"vs teacher ({teacher:.3f})"], rows)


def quality_800() -> list[str]:
    rels = ["quality/quality-2026-11-25.json", "quality/quality-overlap-2026-11-25.json"]
    return quality_table(*rels) + sources(*rels)


def quality_400() -> list[str]:
    rels = ["quality/quality-400steps-2026-11-25.json", "quality/quality-overlap-400steps-2026-11-25.json"]
    return quality_table(*rels) + sources(*rels)


def quality_200() -> list[str]:
    rels = ["quality/quality-200steps-2026-11-25.json"]
    return quality_table(*rels) + sources(*rels)


def quality_rl_lr() -> list[str]:
    rels = ["quality/quality-rl-lr1.0-2026-11-25.json", "quality/quality-2026-11-24.json"]
    return quality_table(rels[0]) + [""] + quality_table(rels[1]) + sources(*rels)


HARD_ARMS = [("answer_only", "SFT on answer-only data"), ("sft_distilled", "SFT on distilled data"),
             ("logits_only", "logits KD"), ("hidden_logits", "hidden → logits"),
             ("progressive_overlap", "progressive, logits on from the first step"),
             ("progressive_rl", "progressive + RL (the demo's full pipeline)")]


def hard_task() -> list[str]:
    rel = "hard-task/hard-task-2026-11-27.json"
    d = load(rel)
    points = [str(s) for s in d["steps"] if s >= 300]
    final = points[-1]
    curves = {arm: [[run["curve"][p] for run in d["arms"][arm]["runs"]] for p in points] for arm, _ in HARD_ARMS}
    columns = [[pm(curves[arm][i]) for arm, _ in HARD_ARMS] for i in range(len(points))]
    columns = [bold_best(col, [stats(curves[arm][i])[0] for arm, _ in HARD_ARMS]) for i, col in enumerate(columns)]
    rows = [[label, *(columns[i][k] for i in range(len(points))), span(curves[arm][-1])]
            for k, (arm, label) in enumerate(HARD_ARMS)]
    header = [f"arm (seeds {seeds_of(d['arms']['answer_only']['runs'])}; teacher {d['teacher']['pass@1']:.3f})",
              *(f"{p} steps" for p in points[:-1]), f"{final} steps (final)", f"min – max at {final}"]
    return table(header, rows) + sources(rel)


ENCODER_TEACHER = ["quality-encoder/quality-encoder-teacher-init-60steps-2026-11-27.json",
                   "quality-encoder/quality-encoder-teacher-init-60steps-seed2-2026-11-27.json",
                   "quality-encoder/quality-encoder-teacher-init-60steps-more-arms-2026-11-27.json",
                   "quality-encoder/quality-encoder-teacher-init-60steps-more-arms-seed2-2026-11-27.json",
                   "quality-encoder/quality-encoder-teacher-init-60steps-noembed-check-2026-11-27.json",
                   "quality-encoder/quality-encoder-teacher-init-60steps-sentence-2026-11-27.json",
                   "quality-encoder/quality-encoder-teacher-init-60steps-sentence-seeds1-2-2026-11-27.json"]
ENCODER_METRICS = ("spearman", "nn_top1", "nn_recall10")


def encoder_rows(arms: list[tuple[str, str]], rels: list[str], untrained: list[dict[str, float]],
                 extra: Callable[[list[dict[str, Any]]], list[str]] | None = None) -> list[list[str]]:
    rows = [["before training", *(pm([u[m] for u in untrained]) if len(untrained) > 1 else f"{untrained[0][m]:.3f}"
                                  for m in ENCODER_METRICS)] + ([""] if extra else [])]
    means = {m: [] for m in ENCODER_METRICS}  # type: dict[str, list[float]]
    body = []
    for arm, label in arms:
        runs = arm_runs(rels, arm)
        body.append([label, *(pm(values(runs, m)) for m in ENCODER_METRICS)] + (extra(runs) if extra else []))
        for m in ENCODER_METRICS:
            means[m].append(stats(values(runs, m))[0])
    for i, m in enumerate(ENCODER_METRICS, start=1):
        column = bold_best([row[i] for row in body], means[m])
        for row, cell in zip(body, column):
            row[i] = cell
    return rows + body


def encoder_teacher_init() -> list[str]:
    arms = [("last", "last layer only, 3→6 (MSE)"), ("uniform", "uniform, 0→0, 1→2, 2→4, 3→6 (MSE)"),
            ("uniform_nmse", "uniform, as above, `loss: nmse`"),
            ("uniform_nmse_noembed", "uniform without the embedding pair (1→2, 2→4, 3→6), `loss: nmse`"),
            ("progressive", "progressive: relations (30% of steps) → relations 0.5 + uniform hidden"),
            ("uniform_layernorm", "uniform, `normalize: layernorm` (MSE)"),
            ("uniform_then_last", "uniform for 30 steps, then last layer only (per-phase layer map)"),
            ("relations_last", "MiniLMv2 q/k/v relations on the last layer only (24 relation heads)"),
            ("attention_maps", "attention maps, per head, uniform (TinyBERT)"),
            ("sentence", "`sentence` stage alone: mean-pooled, `loss: cosine`, `similarity: 1.0`")]
    untrained = [load(ENCODER_TEACHER[0])["untrained_student"]]  # the cut student: one, whatever the seed
    rows = encoder_rows(arms, ENCODER_TEACHER, untrained)
    out = table(["arm (student→teacher blocks; seeds 0, 1, 2)", "Spearman", "NN top-1", "NN top-10 overlap"], rows)
    return out + sources(*ENCODER_TEACHER)


RANDOM_200 = [f"quality-encoder/quality-encoder-random-init-200steps-L16-bs16-lr1e-3-{tag}seed{s}-2026-11-27.json"
              for tag in ("", "noembed-", "nmsenoembed-", "lastembed-") for s in (0, 1, 2)]
RANDOM_600 = [f"quality-encoder/quality-encoder-random-init-600steps-L16-bs16-lr1e-3-seed{s}-2026-11-27.json"
              for s in (0, 1, 2)]
UNTRAINED_L16 = "quality-encoder/quality-encoder-random-init-untrained-L16-2026-11-27.json"


def last_pair_mse(rels: list[str]) -> Callable[[list[dict[str, Any]]], list[str]]:
    """Pair 3→6's own loss over the last steps, on the MSE scale (nmse times the teacher's last norm / width)."""
    scale = load(rels[0])["teacher_hidden_sq_norm_per_layer"][-1] / 384

    def cell(runs: list[dict[str, Any]]) -> list[str]:
        if not all("pair_losses" in r for r in runs):
            return ["not recorded"]
        arm_files = [load(rel) for rel in rels]
        nmse = any(a["arms"].get(arm, {}).get("phases_stages", [None, {}])[1].get("hidden", {}).get("loss") == "nmse"
                   for a in arm_files for arm in a["arms"] if a["arms"][arm]["runs"][0] in runs)
        return [pm([r["pair_losses"]["hidden/3_6"] * (scale if nmse else 1.0) for r in runs])]
    return cell


def encoder_random(rels: list[str], arms: list[tuple[str, str]]) -> list[str]:
    untrained = list(load(UNTRAINED_L16)["untrained_student"].values())
    rows = encoder_rows(arms, rels, untrained, extra=last_pair_mse(rels))
    return table(["arm (seeds 0, 1, 2)", "Spearman", "NN top-1", "NN top-10 overlap", "pair 3→6 MSE"], rows)


def encoder_random_200() -> list[str]:
    arms = [("last", "last layer only, 3→6"), ("uniform", "uniform 0→0, 1→2, 2→4, 3→6 (MSE)"),
            ("uniform_nmse", "uniform, `loss: nmse`"), ("uniform_last3x", "uniform, `layer_weights: [1, 1, 1, 3]`"),
            ("uniform_noembed", "uniform without the embedding pair (1→2, 2→4, 3→6)"),
            ("uniform_nmse_noembed", "the same, `loss: nmse`"),
            ("last_embed", "last layer plus the embedding pair only (0→0, 3→6)")]
    return encoder_random(RANDOM_200, arms) + sources(*RANDOM_200, UNTRAINED_L16)


def encoder_random_600() -> list[str]:
    arms = [("last", "last layer only, 3→6"), ("uniform_noembed", "uniform without the embedding pair")]
    return encoder_random(RANDOM_600, arms) + sources(*RANDOM_600, UNTRAINED_L16)


def encoder_cka() -> list[str]:
    rel = "encoder-cka/encoder-cka-2026-11-27.json"
    arms = load(rel)["arms"]
    groups = [("cut from the teacher, 60 steps", "teacher init, 60 steps",
               [("last", "last layer only"), ("uniform", "uniform (with 0→0)"), ("sentence", "sentence stage")]),
              ("random 3×192, 200 steps", "random init, 200 steps",
               [("last", "last layer only"), ("last_embed", "last layer + embedding pair"),
                ("uniform", "uniform (with 0→0)"), ("uniform_noembed", "uniform without 0→0"),
                ("uniform_nmse", "uniform, `nmse`"), ("uniform_nmse_noembed", "uniform without 0→0, `nmse`"),
                ("uniform_last3x", "uniform, `layer_weights: [1, 1, 1, 3]`")])]
    rows = []
    for student, key, members in groups:
        for i, (arm, label) in enumerate(members):
            entry = arms[f"{arm} ({key})"]
            runs = entry["runs"]
            rows.append([student if i == 0 else "", label, seeds_of(runs), pm(values(runs, "cka_last")),
                         pm(values(runs, "cka_uniform"))])
    return table(["student", "arm", "seeds", "CKA, last layers", "CKA, uniform pairs"], rows) + sources(rel)


def layer_analysis() -> list[str]:
    rel = "layer-analysis/layer-analysis-2026-11-27.json"
    d = load(rel)
    rows = []
    for part in ("embeddings", "block1", "block2"):
        ratios = [s["losses"]["mse"]["intermediate_sum_vs_last"][part]["norm_ratio"] for s in d["seeds"]]
        cosines = [s["losses"]["mse"]["intermediate_sum_vs_last"][part]["cosine"] for s in d["seeds"]]
        rows.append([part, span(ratios, 2) + "×", f"{min(cosines):+.2f} to {max(cosines):+.2f}"])
    out = table(["student parameters", "gradient norm of the lower pairs vs the last pair (seeds 0–2)",
                 "cosine with the last pair's gradient"], rows)
    return out + sources(rel)


def init_student() -> list[str]:
    rels = ["init-student/init-student-200steps-2026-11-27.json", "init-student/init-student-800steps-2026-11-27.json",
            "init-student/init-student-800steps-seeds3-5-2026-11-27.json"]
    rows = []
    for rel in rels:
        d = load(rel)
        random_runs, cut_runs = d["arms"]["logits_only/random"]["runs"], d["arms"]["logits_only/teacher"]["runs"]
        rows.append([f"{d['settings']['student_steps']} (seeds {seeds_of(random_runs)})", pm(values(random_runs)),
                     span(values(random_runs)), pm(values(cut_runs)), span(values(cut_runs))])
    out = table(["steps", "random init", "min – max", "cut from the teacher", "min – max"], rows)
    return out + sources(*rels)


def cross_tokenizer() -> list[str]:
    rels = ["cross-tokenizer/cross-tokenizer-800steps-2026-11-27.json",
            "cross-tokenizer/cross-tokenizer-first-char-800steps-2026-11-27.json"]
    arms = [("answer_only", "SFT on answer-only data", "student's BPE"),
            ("sft_distilled", "SFT on the teacher's verified solutions", "student's BPE"),
            ("uld", "`uld`, `shared: kl`", "across tokenizers"),
            ("uld_pure", "`uld`, `shared: none` (pure ULD)", "across tokenizers"),
            ("uld_first_char", "`uld`, `shared: first_char`", "across tokenizers")]
    rows = [[label, where, pm(values(arm_runs(rels, arm))), seeds_of(arm_runs(rels, arm))] for arm, label, where in arms]
    return table(["arm", "tokenizer", "pass@1 mean ± std", "seeds"], rows) + sources(*rels)


def teachers() -> list[str]:
    rels = ["teachers/teachers-400steps-2026-11-27.json", "teachers/teachers-800steps-2026-11-27.json"]
    ds = [load(rel) for rel in rels]
    arms = [(name, label) for name, label in (("teacher_a", "teacher A alone"), ("teacher_b", "teacher B alone"),
                                              ("mixture", "mixture of A and B"), ("sum", "sum of per-teacher losses"))
            if name in ds[0]["arms"]]
    header = ["arm", *(f"{d['settings']['student_steps']} steps" for d in ds)]
    rows = [[label, *(pm(values(d["arms"][arm]["runs"])) for d in ds)] for arm, label in arms]
    tp = ds[0]["teachers"]
    note = f"Teachers' own pass@1: A {tp['a']['pass@1']:.3f}, B {tp['b']['pass@1']:.3f}; seeds " \
           f"{seeds_of(ds[0]['arms']['teacher_a']['runs'])}."
    return table(header, rows) + ["", note] + sources(*rels)


def onpolicy() -> list[str]:
    rel = "onpolicy/onpolicy-2026-11-27.json"
    d = load(rel)
    arms = [("logits", "logits KD on the data (forward KL)"), ("supervised", "`onpolicy`, `lmbda: 0` (reverse KL on the data)"),
            ("gkd", "`onpolicy`, `lmbda: 0.5` (GKD, reverse KL)"), ("onpolicy", "`onpolicy`, `lmbda: 1` (reverse KL on samples)")]
    seeds = seeds_of(d["arms"]["logits"]["runs"])
    rows = [[label, pm(values(d["arms"][arm]["runs"])), ", ".join(f"{v:.3f}" for v in values(d["arms"][arm]["runs"]))]
            for arm, label in arms]
    warm = ", ".join(f"{v:.3f}" for v in values(d["arms"]["logits"]["runs"], "warm_pass@1"))
    out = table(["second phase", "pass@1 mean ± std", f"per seed ({seeds})"], rows)
    return out + ["", f"Teacher pass@1 {d['teacher']['pass@1']:.3f}; after the shared warm-up phase, by seed: {warm}."] \
        + sources(rel)


def enrich() -> list[str]:
    rels = ["enrich/enrich-2026-11-27.json", "enrich/enrich-seeds3-5-2026-11-27.json"]
    ds = [load(rel) for rel in rels]
    arms = [("half", "half: 750 labelled prompts"), ("half+pseudo", "half + pseudo-labelled second half"),
            ("half+augment", "half + `arith_operands` variants"), ("half+pseudo+augment", "half + pseudo-labels + variants"),
            ("full", "full: 1,500 labelled prompts")]
    half = {r["seed"]: r["pass@1"] for r in arm_runs(rels, "half")}
    means = [stats(values(arm_runs(rels, arm)))[0] for arm, _ in arms]
    cells = bold_best([pm(values(arm_runs(rels, arm))) for arm, _ in arms], means)
    rows = []
    for (arm, label), cell in zip(arms, cells):
        runs = arm_runs(rels, arm)
        above = sum(r["pass@1"] > half[r["seed"]] for r in runs)
        below = sum(r["pass@1"] < half[r["seed"]] for r in runs)
        rows.append([label, f"{ds[0]['arms'][arm]['examples']:,}", cell, span(values(runs)),
                     "—" if arm == "half" else f"{above} / {below}"])
    seeds = seeds_of(arm_runs(rels, "half"))
    out = table(["training data (SFT, 800 steps)", "examples", f"pass@1, seeds {seeds}", "min – max",
                 f"above / below *half* (of {len(half)} seeds)"], rows)
    p = ds[0]["pseudo_labelling"]
    out += ["", f"Pseudo-labelling (n = {p['n']}, temperature {p['temperature']}, `min_agreement` {p['min_agreement']}): "
                f"the majority answer was the withheld one for {p['majority_correct']} of {p['prompts']} prompts; "
                f"mean agreement {p['agreement_mean']:.2f}; {p['kept_lines_wrong']} kept lines teach a wrong answer. "
                f"Teacher pass@1 {ds[0]['teacher_pass@1']:.3f}."]
    return out + sources(*rels)


def sparse_targets() -> list[str]:
    rels = ["sparse-targets/sparse-targets-2026-11-27.json", "sparse-targets/sparse-targets-500steps-2026-11-27.json"]
    ds = [load(rel) for rel in rels]
    arms = [("full", "live teacher, full-vocabulary KD"), ("topk_renorm_8", "top-8 renormalised"),
            ("topk_bucket_8", "top-8 + tail bucket"), ("sampled_8", "sampled, K = 8"),
            ("topk_renorm_32", "top-32 renormalised"), ("topk_bucket_32", "top-32 + tail bucket"),
            ("sampled_32", "sampled, K = 32")]
    header = ["arm", *(f"{d['settings']['steps']} steps" for d in ds)]
    rows = [[label, *(pm(values(d["arms"][arm]["runs"], "kl")) if arm in d["arms"] else "—" for d in ds)]
            for arm, label in arms]
    d = ds[0]
    mass = ", ".join(f"top-{k} {v:.2f}" for k, v in d["teacher_topk_mass"].items())
    out = table(header, rows)
    out += ["", f"Held-out KL(teacher ‖ student) per token over the full vocabulary, lower is better; mean ± std over "
                f"seeds {', '.join(map(str, d['settings']['seeds']))}. Teacher entropy {d['teacher_entropy_nats']:.2f} "
                f"nats; teacher mass in its {mass}."]
    return out + sources(*rels)


def data_scale() -> list[str]:
    rels = ["data-scale/data-scale-2026-11-27.json", "data-scale/data-scale-streaming-unpacked-2026-11-27.json"]
    rows = []
    for rel in rels:
        for r in load(rel)["rows"]:
            mode = "streaming, unpacked" if r.get("streaming") else ("packed, cached" if r["packing"] else "cached")
            rows.append([f"{r['size']:,}", mode, r["run"], f"{r['read_s']:.1f} s", f"{r['first_step_s']:.1f} s",
                         f"{r['peak_rss_mb']:.0f} MB"])
    return table(["examples", "data", "cache", "read + tokenise", "first step after start", "peak RSS"], rows) \
        + sources(*rels)


def kernels_table(rel: str) -> list[str]:
    d = load(rel)
    fused = d.get("op") == "fused_linear"
    shape_keys = ("N", "H", "V") if fused else ("N", "V")
    eager = {tuple(r[k] for k in shape_keys): r for r in d["rows"] if r["backend"] == "eager" and "time_s" in r}
    cpu = any("cpu_s" in r for r in d["rows"])
    names = {"torch": "torch reference", "chunked": "chunked", "triton": "triton", "liger": "Liger-Kernel"}
    rows = []
    for r in d["rows"]:
        if r["backend"] == "eager":
            continue
        shape = tuple(r[k] for k in shape_keys)
        label = " × ".join(str(v) for v in shape)
        if "time_s" not in r:
            reason = r.get("error", "").split(" (")[0]
            rows.append([label, names.get(r["backend"], r["backend"]), "did not run", *([""] if cpu else []),
                         f"{reason}"])
            continue
        base = eager[shape]
        memory = f"{r['extra_bytes'] / base['extra_bytes']:.2f}× ({r['extra_bytes'] / 2**30:.1f} GiB vs " \
                 f"{base['extra_bytes'] / 2**30:.1f} GiB)"
        rows.append([label, names.get(r["backend"], r["backend"]), f"{r['time_s'] / base['time_s']:.2f}×",
                     *([f"{r['cpu_s'] / base['cpu_s']:.2f}×"] if cpu else []), memory])
    header = ["N × H × V" if fused else "N × V", "backend", "wall time vs eager", *(["CPU time vs eager"] if cpu else []),
              "memory added vs eager"]
    what = "the LM head fused in (hidden states and LM heads in, eager computes both logit tensors)" if fused \
        else "softmax-KL on logits"
    return [f"{what}, {d['dtype']}, forward + backward:", ""] + table(header, rows) + sources(rel)


def kernels() -> list[str]:
    return kernels_table("kernels/kernels-cpu-20261124-210903.json")


def kernels_fused() -> list[str]:
    return kernels_table("kernels/kernels-fused-linear-cpu-20261125-223248.json")


def kernels_other() -> list[str]:
    out: list[str] = []
    for rel in ("kernels/kernels-cpu-20261127-005300.json", "kernels/kernels-fused-linear-cpu-20261127-010203.json",
                "kernels/kernels-fused-linear-cpu-20261125-220357.json"):
        out += kernels_table(rel) + [""]
    return out[:-1]


def divergences() -> list[str]:
    rel = "divergences/divergences-cpu-20261127-023332.json"
    d = load(rel)
    rows = [[e["backend"], f"`{e['divergence']}`", f"{e['cpu_s'][0]:.2f} ± {e['cpu_s'][1]:.2f} s",
             f"{e['cpu_s_vs_forward_kl'][0]:.2f}×", f"{e['wall_s'][0]:.2f} ± {e['wall_s'][1]:.2f} s"]
            for e in d["summary"]]
    n, v = d["shape"]
    out = table(["backend", "divergence", "CPU time", "vs forward_kl", "wall time"], rows)
    seeds = sorted({r["seed"] for r in d["rows"]})
    out += ["", f"{n} × {v} {d['dtype'].replace('torch.', '')}, forward + backward, temperature {d['temperature']:g}, "
                f"alpha {d['alpha']:g}; mean ± std over seeds {', '.join(map(str, seeds))}."]
    return out + sources(rel)


def loop() -> list[str]:
    rel = "loop/loop-cpu-20261127-013600.json"
    d = load(rel)
    rows = [["hkd `train_step`", f"{d['tokens_per_s']['hkd']:.0f}"], ["hand-written loop", f"{d['tokens_per_s']['bare']:.0f}"]]
    out = table(["loop", "tokens per CPU-second of the process (median of rounds)"], rows)
    out += ["", f"Overhead {100 * d['overhead']:+.1f}%; student {d['student_params']:,} and teacher "
                f"{d['teacher_params']:,} parameters, {d['precision']}."]
    return out + sources(rel)


def startup() -> list[str]:
    rels = ["startup/startup-lazy-2026-11-27.json", "startup/startup-2026-11-27.json"]
    rows = []
    for rel, label in zip(rels, ("now", "before the lazy imports")):
        d = load(rel)
        for command, r in d["results"].items():
            rows.append([f"`hkd {command}`", label, f"{r['median_s']:.2f} s", f"{r['max_s']:.2f} s",
                         f"{r['peak_rss_mib']:.0f} MiB", f"{d['machine']['load_avg'][0]:.1f}"])
    return table(["command", "code", "median", "max", "peak RSS", "load average"], rows) + sources(*rels)


def index() -> list[str]:
    rows = []
    for path in sorted(RESULTS.glob("*/*.json")):
        d = json.loads(path.read_text())
        rel = path.relative_to(RESULTS)
        rows.append([f"`{rel}`", d["date"][:10], d["device"], short_versions(d["versions"]), f"`{d['command']}`"])
    return table(["file", "date", "device", "versions", "command"], rows)


TABLES: dict[str, Callable[[], list[str]]] = {
    "demo-seeds": demo_seeds, "quality-800": quality_800, "quality-400": quality_400, "quality-200": quality_200,
    "quality-rl-lr": quality_rl_lr, "hard-task": hard_task, "encoder-teacher-init": encoder_teacher_init,
    "encoder-cka": encoder_cka, "encoder-random-200": encoder_random_200, "encoder-random-600": encoder_random_600,
    "layer-analysis": layer_analysis, "init-student": init_student, "cross-tokenizer": cross_tokenizer,
    "teachers": teachers, "onpolicy": onpolicy, "enrich": enrich, "sparse-targets": sparse_targets,
    "data-scale": data_scale, "kernels": kernels, "kernels-fused": kernels_fused, "kernels-other": kernels_other,
    "divergences": divergences, "loop": loop, "startup": startup, "index": index,
}


# --------------------------------------------------------------------------- the page


def render(page: str) -> str:
    """``page`` with every generated block re-rendered; every table must appear exactly once."""
    seen = [m["name"] for m in BLOCK.finditer(page)]
    unknown = sorted(set(seen) - set(TABLES))
    missing = sorted(set(TABLES) - set(seen))
    doubled = sorted({n for n in seen if seen.count(n) > 1})
    if unknown or missing or doubled:
        raise SystemExit(f"{PAGE}: generated blocks unknown {unknown}, missing {missing}, repeated {doubled}")
    return BLOCK.sub(lambda m: f"{m.group(1)}\n" + "\n".join(TABLES[m["name"]]()) + f"\n\n{m.group(4)}", page)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="update docs/benchmarks.md in place")
    group.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md is out of date")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        for name, fn in TABLES.items():
            print(f"## {name}\n\n" + "\n".join(fn()) + "\n")
        return 0
    page = PAGE.read_text()
    wanted = render(page)
    if args.check:
        if page != wanted:
            print(f"{PAGE} is out of date with bench/results/; run: python docs/gen_benchmarks.py --write",
                  file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(wanted)
    print(f"updated {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
