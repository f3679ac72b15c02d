"""Validation while training: held-out metrics every ``eval.every`` steps, the best model, early stopping.

On held-out examples (``eval.path``, read with the data config's fields; for synthetic data,
``eval.num_examples`` fresh problems disjoint from the training set) the student is compared
with the teacher, without gradient, at temperature 1:

* ``eval/kl``: mean per-target-token ``KL(teacher || student)``;
* ``eval/top1_agreement``: fraction of target tokens where both models' argmax agree;
* ``eval/student_nll``: the student's mean negative log-likelihood of the labels;
* ``eval/loss/<stage>``: each stage active at that step, on the held-out batches.

``best/`` holds the student that scored best on ``eval.metric`` so far (``final/`` stays the
last one); ``best.json`` records its step and value, and the early-stopping count, so a
resumed run goes on judging against the same best. With ``eval.patience: N`` training stops
after N evaluations in a row without an improvement larger than ``eval.min_delta``.

Under data parallelism the held-out batches are shared out over the ranks (batch ``i`` on rank
``i % world``) and the sums reduced, so N ranks evaluate the set once between them and report
what one process would: each batch is scored as a one-process step (``rank 0`` of ``1``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import torch

from hkd.tasks.arith import make_problems
from hkd.config import Config
from hkd.data.encoding import Batches, encode, encode_dataset
from hkd.train.distributed import all_reduce_tensor
from hkd.data.labels import next_token_labels, next_token_targets
from hkd.kernels.divergence import kl_divergence
from hkd.errors import ConfigError
from hkd.models.export import save_student
from hkd.plugin.stage import StepState
from hkd.models.view import TapRequest
from hkd.train.run import Run, autocast, export_options, forward_views, stage_loss_terms


LOGIT_METRICS = ("kl", "top1_agreement", "student_nll")  # need both models' LM heads


def held_out_batches(config: Config, tokenizer: Any, causal: bool) -> Batches | None:
    """The held-out set as batches (``None`` when ``eval.every`` is 0)."""
    evaluation, data = config.eval, config.data
    if not evaluation.every:
        return None
    if config.student.encoder and evaluation.metric in LOGIT_METRICS:  # it would never be measured: no best/
        raise ConfigError(f"eval.metric: {evaluation.metric!r} compares next-token distributions, which an "
                          "encoder student has none of; use eval.metric: loss (the held-out stage losses)")
    if config.teacher_cache:
        raise ConfigError("eval.every: validation compares the student with a live teacher; "
                          "it is not available with teacher_cache (set eval.every: 0)")
    if evaluation.path is not None:
        held_out = dataclasses.replace(data, kind="jsonl", path=evaluation.path, packing=False, streaming=False)
        encoded = encode_dataset(tokenizer, held_out, config.train.seed)
    elif data.kind == "synthetic":
        seen = {(p.a, p.b) for p in make_problems(data.num_examples, data.digits, config.train.seed)}
        problems = make_problems(evaluation.num_examples, data.digits, config.train.seed + 1, exclude=seen)
        encoded = [encode(tokenizer, p.prompt, p.worked_solution(), data.max_length, data.chat_template)
                   for p in problems]
    else:
        raise ConfigError(f"eval.path: required for data.kind {data.kind!r} (a held-out JSONL file read with "
                          "the data's fields)")
    plain = dataclasses.replace(data, shuffle=False, packing=False)
    return Batches(encoded, plain, tokenizer.pad_token_id or 0, config.train.seed, causal)


@torch.no_grad()
def evaluate(run: Run, step: int, active: dict[str, str]) -> dict[str, float]:
    """Held-out metrics for the current student (one host read at the end); ``active`` maps
    each stage to score to the instance it runs as (``Schedule.stage_key``)."""
    assert run.eval_batches is not None
    was_training = run.student.training
    run.student.eval()
    count = min(run.config.eval.max_batches, -(-len(run.eval_batches.encoded) // run.config.data.batch_size))
    has_head = getattr(run.student, "lm_head", None) is not None and run.teachers[0].serves().logits
    teacher_requests = [TapRequest(logits=has_head)] + [TapRequest() for _ in run.teachers[1:]]
    student_request = TapRequest(logits=has_head)
    for key in active.values():
        asked = run.stages[key].teacher_requests(len(run.teachers))  # type: ignore[operator]
        teacher_requests = [have.merge(more) for have, more in zip(teacher_requests, asked)]
        student_request = student_request.merge(run.stages[key].student_request())  # type: ignore[operator]
    sums = torch.zeros(4 + len(active), device=run.device)  # kl, agree, nll, tokens, stage losses
    world, rank = run.info.world_size, run.info.rank
    # batch i on rank i % world; every rank runs as many forwards as the busiest (FSDP gathers in each),
    # one past the end re-runs batch 0 and counts nothing
    for index in range(rank, -(-count // world) * world, world):
        real = index < count
        batch = {k: v.to(run.device) for k, v in run.eval_batches.batch(index if real else 0).items()}
        tokens, _ = run.eval_batches.counts(index if real else 0)
        state = StepState(step=step, temperature=1.0, tokens=tokens)  # a batch is scored as one process's step
        with autocast(run):
            state.teachers, student = forward_views(run, batch, teacher_requests, student_request)
        teacher = state.teachers[0]
        assert teacher is not None and student is not None
        part = torch.zeros_like(sums)
        if has_head:
            assert teacher.logits is not None and student.logits is not None
            keep = next_token_targets(batch["labels"])
            teacher_logp = teacher.logits[:, :-1][keep].float().log_softmax(-1)
            student_logp = student.logits[:, :-1][keep].float().log_softmax(-1)
            part[0] = kl_divergence(teacher_logp, student_logp).sum()
            part[1] = (teacher_logp.argmax(-1) == student_logp.argmax(-1)).sum()
            part[2] = -student_logp.gather(-1, next_token_labels(batch["labels"])[keep][:, None]).sum()
        part[3] = tokens
        for slot, key in enumerate(active.values()):
            stage_terms = stage_loss_terms(run.stages, key, batch, teacher, student, state)
            part[4 + slot] = sum((v for k, v in stage_terms.items() if not k.startswith("metric/")),
                                 torch.zeros((), device=run.device))
        if real:
            sums += part
    run.student.train(was_training)
    values = all_reduce_tensor(sums, run.info).tolist()
    tokens = max(values[3], 1.0)
    metrics = {f"eval/loss/{name}": value / max(count, 1) for name, value in zip(active, values[4:])}
    weights = run.schedule.weights(max(step - 1, 0))
    metrics["eval/loss"] = sum(weights[name] * metrics[f"eval/loss/{name}"] for name in active)
    if has_head:
        metrics |= {"eval/kl": values[0] / tokens, "eval/top1_agreement": values[1] / tokens,
                    "eval/student_nll": values[2] / tokens}
    return metrics


def save_best(run: Run, state_dict: dict[str, Any]) -> None:
    """Write the student to ``best/`` atomically (a temp directory renamed over the old one)."""
    best, tmp = run.run_dir / "best", run.run_dir / "best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_student(run.student, run.tokenizer, tmp, state_dict, run.config, export_options(run))  # like final/
    old = run.run_dir / "best.old"
    if best.exists():
        os.replace(best, old)
    os.replace(tmp, best)
    shutil.rmtree(old, ignore_errors=True)
