"""Sparse teacher targets: how close does a student get to its teacher from top-k or sampled targets?

    python bench/sparse_targets.py                   # 3 seeds, every arm (about 12 min on 2 shared cores)
    python bench/sparse_targets.py --seeds 0 --steps 50 --arms full topk_bucket_8   # plumbing check

Arms, all at equal steps, batch and learning rate, temperature 1, no hard labels (alpha 0):

* ``full``               live-teacher full-vocabulary KD (:func:`hkd.kernels.distill_loss`, forward KL)
* ``topk_renorm_K``      the cache's top-K logits renormalised within the top-K (``sparse_tail: renormalize``)
* ``topk_bucket_K``      top-K plus the tail as one bucket with the stored log-normaliser (``sparse_tail: bucket``)
* ``sampled_K``          K draws from the teacher with replacement, ``count / K`` (``--targets sampled``)

for K in ``--ks`` (default 8 and 32). The demo's character vocabulary has about 100 tokens, so
k = 32 would hold a third of it and the arms could not differ; this benchmark uses a synthetic
language-modelling task with a 4096-token vocabulary instead: the teacher is a random tiny
Llama whose LM head is scaled so its next-token distributions are peaked with a long tail
(``--head-scale``; the script prints the teacher's mean entropy and top-K mass), the inputs
are uniform random token sequences, and the metric is the held-out KL(teacher || student)
over the full vocabulary, per token (lower is better), plus top-1 agreement.

Targets are computed once per training position, as a cache holds them, by the functions
``hkd cache-teacher`` writes with (:func:`hkd.teachers.cache.topk_targets`, :func:`hkd.teachers.cache.sampled_targets`
seeded per example), and the losses are the logits stage's own (:meth:`LogitsStage.sparse_loss`).
The seed changes the student's initialisation, the batch order and the draws.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import run_header, summary, write_result  # noqa: E402

from hkd import SparseTargets, StageContext, TapRequest, kernels  # noqa: E402
from hkd.teachers.cache import example_generator, sampled_targets, topk_targets  # noqa: E402
from hkd.models.loading import build_preset  # noqa: E402
from hkd.plugins.logits import LogitsStage, LogitsStageConfig  # noqa: E402

TEACHER = {"vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2}
STUDENT = {"vocab_size": 4096, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1}


def arm_names(ks: list[int]) -> list[str]:
    return ["full"] + [f"{kind}_{k}" for k in ks for kind in ("topk_renorm", "topk_bucket", "sampled")]


def teacher_logits(model: torch.nn.Module, tokens: torch.Tensor, batch: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=tokens[i: i + batch]).logits.float() for i in range(0, len(tokens), batch)])


def targets_for(arm: str, logits: torch.Tensor, seed: int) -> dict[str, torch.Tensor] | None:
    """Per training sequence [N, S, k] targets, as a cache built for this arm would hold them."""
    if arm == "full":
        return None
    kind, k = arm.rsplit("_", 1)
    n, s, vocab = logits.shape
    if kind == "sampled":
        ids, values = [], []
        for example in range(n):  # seeded per example, as hkd cache-teacher draws
            drawn = sampled_targets(logits[example], int(k), 1.0, example_generator(seed, example))
            ids.append(drawn["sample_ids"].long())
            values.append((drawn["sample_counts"].double() / int(k)).log().float())
        return {"ids": torch.stack(ids), "values": torch.stack(values)}
    stored = topk_targets(logits.reshape(-1, vocab), int(k), 1.0)
    return {"ids": stored["topk_ids"].long().reshape(n, s, -1), "values": stored["topk_values"].reshape(n, s, -1),
            "logsumexp": stored["logsumexp"].reshape(n, s)}


def heldout_metrics(student: torch.nn.Module, tokens: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        s = torch.cat([student(input_ids=tokens[i: i + 32]).logits.float() for i in range(0, len(tokens), 32)])
    log_q, log_p = teacher.log_softmax(-1), s.log_softmax(-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    agree = (teacher.argmax(-1) == s.argmax(-1)).float().mean()
    return {"kl": float(kl), "top1_agreement": float(agree)}


def train(arm: str, seed: int, args: argparse.Namespace, data: dict[str, Any], stage: LogitsStage) -> dict[str, Any]:
    torch.manual_seed(seed)
    student = build_preset("tiny-llama", STUDENT, seed=100 + seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    train_tokens, train_logits = data["train_tokens"], data["train_logits"]
    targets = targets_for(arm, train_logits, seed)
    if targets is not None and arm.startswith("topk"):
        stage.sparse_tail = "bucket" if "bucket" in arm else "renormalize"
    n, s = train_tokens.shape
    order = torch.Generator().manual_seed(seed)
    labels = torch.zeros(args.batch, s - 1, dtype=torch.long)  # no -100: every position counts
    start = time.perf_counter()
    for step in range(args.steps):
        rows = torch.randint(0, n, (args.batch,), generator=order)
        logits = student(input_ids=train_tokens[rows]).logits[:, :-1]
        if targets is None:  # the stage's dense path, with the live teacher's logits
            loss = kernels.distill_loss(logits, train_logits[rows][:, :-1], temperature=1.0, reduction="sum")
        else:
            kind = "sampled" if arm.startswith("sampled") else "topk"
            view = SparseTargets(targets["ids"][rows], targets["values"][rows],
                                 targets["logsumexp"][rows] if "logsumexp" in targets else None, 1.0, kind)
            loss = stage.sparse_loss(logits, view, labels, temperature=1.0)
        loss = loss / labels.numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    metrics = heldout_metrics(student, data["heldout_tokens"], data["heldout_logits"])
    return {"seed": seed, **metrics, "final_train_loss": loss.item(), "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--arms", nargs="+", help="subset of the arms (default: all)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--train-seqs", type=int, default=512)
    parser.add_argument("--heldout-seqs", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--head-scale", type=float, default=20.0, help="multiplies the teacher's LM head")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="JSON path (default bench/results/sparse-targets/sparse-targets-DATE.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.arms or arm_names(args.ks)
    unknown = sorted(set(names) - set(arm_names(args.ks)) - {"full"})
    if unknown:
        parser.error(f"unknown arms {unknown}; available: {arm_names(args.ks)}")

    teacher = build_preset("tiny-llama", TEACHER, seed=1).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(args.head_scale)
    gen = torch.Generator().manual_seed(12345)
    vocab = TEACHER["vocab_size"]
    data = {"train_tokens": torch.randint(0, vocab, (args.train_seqs, args.seq), generator=gen),
            "heldout_tokens": torch.randint(0, vocab, (args.heldout_seqs, args.seq), generator=gen)}
    data["train_logits"] = teacher_logits(teacher, data["train_tokens"])
    data["heldout_logits"] = teacher_logits(teacher, data["heldout_tokens"])
    log_q = data["train_logits"].log_softmax(-1)
    entropy = float(-(log_q.exp() * log_q).sum(-1).mean())
    top_mass = {str(k): float(log_q.topk(k, dim=-1).values.exp().sum(-1).mean()) for k in args.ks}
    print(f"teacher: vocabulary {vocab}, mean entropy {entropy:.2f} nats, mean top-k mass "
          + ", ".join(f"k={k}: {m:.3f}" for k, m in top_mass.items()))
    model = build_preset("tiny-llama", {"num_hidden_layers": 1})
    context = StageContext("logits", model, model, {"sparse_distill_loss": "chunked"}, "stages.logits",
                           teacher_serves=TapRequest(sparse_logits=True, sparse_logsumexp=True), teacher_live=False)
    stage = LogitsStage(LogitsStageConfig(alpha=0.0), context)

    results: dict[str, Any] = {}
    for name in names:
        runs = []
        for seed in args.seeds:
            run = train(name, seed, args, data, stage)
            runs.append(run)
            print(f"{name:16s} seed {seed}: held-out KL {run['kl']:.4f}, top-1 agreement {run['top1_agreement']:.3f} "
                  f"({run['seconds']} s)", flush=True)
        results[name] = {"runs": runs, "kl": summary([r["kl"] for r in runs]),
                         "top1_agreement": summary([r["top1_agreement"] for r in runs])}
    print(f"\n{'arm':16s} {'held-out KL (mean ± std)':>26s} {'top-1 agreement':>18s}")
    for name, entry in results.items():
        kl, agree = entry["kl"], entry["top1_agreement"]
        print(f"{name:16s} {kl['mean']:12.4f} ± {kl['std']:.4f} {agree['mean']:11.3f} ± {agree['std']:.3f}")
    report = {"benchmark": "sparse_targets", **run_header("sparse_targets.py", argv),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "teacher_arch": TEACHER,
              "student_arch": STUDENT, "teacher_entropy_nats": entropy, "teacher_topk_mass": top_mass,
              "arms": results}
    report["machine"]["note"] = "2 CPU cores shared with other jobs; seconds are noisy"
    print(f"written: {write_result(args, 'sparse-targets', report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
