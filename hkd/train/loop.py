"""The distillation loop, in three parts: ``build_run``, ``train_step``, ``finish``.

    batch ─► teacher source (live forward or offline cache; only what active stages need) ─► ModelView
          └► student forward (taps; skipped when no active stage needs it)                ─► ModelView
    total = Σ weight_i(step) · stage_i.loss(...)  ─► backward (skipped without gradient) ─► clip ─► AdamW
    losses stay on the device; the host reads them once per optimizer step
    hooks: hkd_after_step (loggers, console), checkpoints every N steps, final save_pretrained

:func:`distill` strings the three together; a notebook can call them one by one.
"""

from __future__ import annotations

import math
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from hkd.train import checkpoint as ckpt
from hkd.teachers.cache import teacher_dir
from hkd.config import Config
from hkd.data.encoding import Batches, encode_dataset
from hkd.train.distributed import (
    DistInfo, all_reduce_sum, all_reduce_tensor, barrier, clip_gradients, fsdp_refusal, init_distributed, shard_model,
    sync_gradients, union_names,
)
from hkd.errors import ConfigError, HkdError, StoppedEarly
from hkd.models.device import batch_to_device
from hkd.models.export import save_student
from hkd.plugin.manager import HkdPluginManager, build_manager
from hkd.models.loading import check_compatible, decoder_body, load_model
from hkd.plugin.schedule import Schedule
from hkd.train.seeding import seed_everything
from hkd.teachers.sources import CachedTeacher, OpenedTeacher, check_requests, open_teachers, teacher_entries
from hkd.plugin.stage import StageContext, StepState, available_stages, build_stages
from hkd.models.taps import enable_taps
from hkd.train.best import BestTracker
from hkd.train.placement import distill_ranked
from hkd.train.run import (
    Run, RunResult, autocast, export_options, forward_views, prefetch_step, prefetch_teachers, stage_at, stage_loss_terms,
    resolve_device, resolve_precision, step_requests,
)
from hkd.train.validation import evaluate, held_out_batches, save_best
from hkd.models.view import TapRequest


def prepare_student(student: PreTrainedModel, config: Config, precision: str) -> None:
    """Weights dtype, activation checkpointing and compilation, as ``train.*`` asks."""
    if precision == "bf16":
        student.to(torch.bfloat16)  # type: ignore[arg-type]
    if config.train.activation_checkpointing:
        if not getattr(student, "supports_gradient_checkpointing", False):
            raise ConfigError(f"train.activation_checkpointing: {type(student).__name__} does not support "
                              "gradient checkpointing")
        # non-reentrant: the attention taps record q/k/v once (the recomputation sees no tap store)
        # and their gradients flow like any other activation's
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.train.compile:
        decoder_body(student).compile(backend=config.train.compile_backend)


def make_optimizer(config: Config, params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    """AdamW; matrices decay, biases and norm gains do not (the usual GPT recipe)."""
    decay = [p for p in params if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in params if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.optim.lr, betas=tuple(config.optim.betas))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- 1. build


def build_run(config: Config, run_dir: Path, *, resume: bool = False, pm: HkdPluginManager | None = None,
              info: DistInfo | None = None, open_sources: Callable[..., list[OpenedTeacher]] | None = None) -> Run:
    """Models, teacher sources, stages, data, optimizer and (with ``resume``) the newest checkpoint.

    Everything is validated before the run directory gets its ``config.yaml``; a setup that
    fails removes the directory again if this call created it (preset models are written into
    it to be loaded the way real ones are). ``info`` and ``open_sources`` (default: the whole
    torchrun world, :func:`open_teachers`) are how a student rank with the teacher on its own ranks
    builds its run (:mod:`hkd.train.placement`).
    """
    pm = pm or build_manager(config.plugins.disable)
    pm.activate_kernel_backends()  # this run's plugins' kernel backends, none another run's left behind
    info = info or init_distributed()
    created = info.is_main and not run_dir.exists()
    try:
        run = _build(config, run_dir, resume, pm, info, open_sources or open_teachers)
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if info.is_main and not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return run


def _build(config: Config, run_dir: Path, resume: bool, pm: HkdPluginManager, info: DistInfo,
           open_sources: Callable[..., list[OpenedTeacher]]) -> Run:
    if info.is_main:  # only rank 0 writes presets; the others wait for them to exist
        for spec, role, _, _ in teacher_entries(config):
            if getattr(spec, "placement", "colocated") == "colocated":  # else its own ranks write it
                teacher_dir(spec, run_dir, role)
        load_model(config.student, "student", run_dir)
    barrier(info)
    seed_everything(config.train.seed)
    device = resolve_device(config.train.device, info)
    precision = resolve_precision(config.train.precision, device)
    teacher_dtype = torch.float32 if precision == "fp32" else torch.bfloat16

    # --- models: teachers frozen (or only their architecture, with an offline cache)
    student, student_tok = load_model(config.student, "student", run_dir)
    schedule = Schedule(config.schedule, config.optim)
    teachers = open_sources(config, run_dir, device, teacher_dtype)
    sources = [t.source for t in teachers]
    specs = available_stages(pm)
    cross_tokenizer = {name: specs[name].cross_tokenizer for name in schedule.stage_names if name in specs}
    for opened in teachers:
        check_compatible(opened.source.model, student, opened.tokenizer, student_tok, cross_tokenizer)
    tokenizer = student_tok or teachers[0].tokenizer
    if tokenizer is None:
        raise HkdError("neither the teacher nor the student directory has a tokenizer")
    student.to(device).train()  # type: ignore[arg-type]
    prepare_student(student, config, precision)

    # --- stages named anywhere in the schedule, each checked against what its teachers serve
    def context(name: str) -> StageContext:
        return StageContext(name, sources[0].model, student, config.kernels, f"stages.{name}", pm, tokenizer,
                            teacher_serves=sources[0].serves(), teacher_live=sources[0].live,
                            teachers=[s.model for s in sources], teacher_weights=[t.weight for t in teachers],
                            teachers_serve=[s.serves() for s in sources], data=config.data,
                            teacher_cache_targets=sources[0].cache.index["targets"]
                            if isinstance(sources[0], CachedTeacher) else None)

    stages = build_stages(pm, schedule.stage_names, config.stages, context, config.schedule.phases).to(device)
    for index, source in enumerate(sources):
        check_requests(source, {key: stage_at(stages, key).teacher_requests(len(sources))[index] for key in stages})
    if any(stage_at(stages, n).teacher_request().attention or stage_at(stages, n).student_request().attention
           for n in stages):
        enable_taps(student)
        for source in sources:
            if source.live:
                enable_taps(source.model)
    if info.enabled and config.train.parallel == "fsdp":
        for refusal in [fsdp_refusal(student)] + [stage_at(stages, name).parallel_refusal("fsdp") for name in stages]:
            if refusal:
                raise ConfigError(refusal)
        for source in sources:
            if source.live:
                shard_model(source.model, reshard_after_forward=True)
        shard_model(student, reshard_after_forward=False)
    trainable = torch.nn.ModuleDict({"student": student, "stages": stages})

    # --- data (a cache must hold targets for exactly this data), optimizer, resume
    encoded = encode_dataset(tokenizer, config.data, config.train.seed)
    for opened in teachers:
        if isinstance(opened.source, CachedTeacher):
            opened.source.check_fingerprint(teacher_dir(opened.spec, run_dir, opened.role), tokenizer, encoded)
    batches = Batches(encoded, config.data, tokenizer.pad_token_id or 0, config.train.seed,
                      causal=not config.student.encoder)
    params = list(trainable.parameters())
    optimizer = make_optimizer(config, params)
    run = Run(config, run_dir, pm, info, device, student, tokenizer, sources, stages, schedule, batches,
              optimizer, trainable, precision=precision, params=params,
              eval_batches=held_out_batches(config, tokenizer, causal=not config.student.encoder))
    if config.eval.every:
        run.best = BestTracker.load(run_dir, config.eval.metric) if resume else BestTracker(config.eval.metric)
    if resume:  # the newest complete checkpoint (incomplete ones are named and skipped)
        run.resumed_from = ckpt.resume_checkpoint(run_dir / "checkpoints")
        step = ckpt.load_checkpoint(run.resumed_from, trainable, optimizer)["step"]
        run.start_step = run.saved_step = ckpt.check_resume_step(step, schedule.total_steps, run.resumed_from)
    return run


# --------------------------------------------------------------------------- 2. one optimizer step


def train_step(run: Run, step: int) -> dict[str, float]:
    """One optimizer step over ``optim.grad_accum`` micro-batches; returns the step's metrics."""
    config, schedule, info = run.config, run.schedule, run.info
    position = schedule.phase_at(step)
    weights = schedule.weights(step)
    active = {name: w for name, w in weights.items() if w > 0}
    keys = {name: schedule.stage_key(step, name) for name in active}  # the instance each stage runs as
    if position.index != run.phase_index:
        run.phase_index = position.index
        run.hook("hkd_on_phase_start", phase_name=position.name, phase_index=position.index, step=step,
                 active_stages=sorted(active))
    temperature = schedule.temperature(step)
    lr = config.optim.lr * schedule.lr_factor(step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr

    # each model runs only for what active stages need, and not at all if nothing does
    _, _, teacher_requests, student_request = step_requests(run, step)

    started = time.perf_counter()
    accum = config.optim.grad_accum
    # rank r takes micro-batches [r*A, (r+1)*A) of the step's world*A: the same data as one process
    first = (step * info.world_size + info.rank) * accum
    micro_counts = [run.batches.counts(first + i) for i in range(accum)]  # host ints: no tensor read
    micro_batches = [run.batches.batch(first + i) for i in range(accum)] if active else []  # none if all paused
    local = [float(sum(c for c, _ in micro_counts)), float(sum(s for _, s in micro_counts))]
    tokens, seen = (int(x) for x in all_reduce_sum(local, info, run.device))

    # per-stage losses and (weighted sum, weight) of each "metric/..." stay on the device until the end:
    # a metric is the mean of the values reported for it over the micro-batches and ranks that did,
    # weighted by their target tokens (a per-token metric stays the step's per-token mean; a value
    # reported on one micro-batch, like the RL reward, is that value)
    stage_losses = torch.zeros(len(active), device=run.device)
    metric_sums: dict[str, torch.Tensor] = {}
    metric_weights: dict[str, float] = {}
    for index, micro in enumerate(micro_batches):
        # a cached teacher reads the next micro-batch (at the last, the next step's first) on its own thread
        # while this one trains
        for ahead in micro_batches[index: index + 2]:
            prefetch_teachers(run, ahead, teacher_requests)
        if index + 1 == len(micro_batches) and step + 1 < schedule.total_steps:
            prefetch_step(run, step + 1)
        state = StepState(step=step, temperature=temperature, tokens=tokens, micro_batch=index,
                          micro_batches=accum, rank=info.rank, world_size=info.world_size, host_batch=micro)
        micro = batch_to_device(micro, run.device)  # pinned and non_blocking on CUDA
        with out_of_memory_hint(config):
            total = torch.zeros((), device=run.device)
            terms_by_stage = micro_batch_terms(run, micro, keys, teacher_requests, student_request, state)
            for slot, (name, terms) in enumerate(terms_by_stage.items()):
                stage_loss = sum((v for k, v in terms.items() if not k.startswith("metric/")),
                                 torch.zeros((), device=run.device))
                stage_losses[slot] += stage_loss.detach()
                total = total + active[name] * stage_loss
                weight = float(max(micro_counts[index][0], 1))
                for metric in (k for k in terms if k.startswith("metric/")):
                    metric_sums[metric] = metric_sums.get(metric, 0) + weight * terms[metric].detach().float()
                    metric_weights[metric] = metric_weights.get(metric, 0.0) + weight
            if total.requires_grad:  # e.g. the RL stage contributes on the first micro-batch only
                (total * info.world_size).backward()  # ranks average gradients: undo the 1/N
    sync_gradients(run.params, info)
    metric_names = union_names(metric_sums, info)  # the same keys, in the same order, on every rank
    zero = torch.zeros(1, device=run.device)
    sums = [metric_sums[k].reshape(1).to(run.device) if k in metric_sums else zero for k in metric_names]
    counts = torch.tensor([metric_weights.get(k, 0.0) for k in metric_names], device=run.device)
    reduced = all_reduce_tensor(torch.cat([stage_losses, *sums, counts]), info)
    grad_norm = clip_gradients(run.params, config.optim.grad_clip)

    # the step's one host read: losses, metrics and the gradient norm together
    values = torch.cat([reduced, grad_norm.reshape(1).to(run.device)]).tolist()
    losses = dict(zip(active, values[:len(active)]))
    totals = values[len(active):len(active) + len(metric_names)]
    reports = values[len(active) + len(metric_names):-1]
    stage_metrics = {k: total / n for k, total, n in zip(metric_names, totals, reports) if n}
    norm = values[-1]

    bad = [name for name, value in losses.items() if not math.isfinite(value)]
    if bad or not math.isfinite(norm):
        run.optimizer.zero_grad(set_to_none=True)
        run.nonfinite_in_row += 1
        culprit = f"stage(s) {bad}" if bad else "the gradient"
        tqdm.write(f"step {step + 1}: non-finite loss from {culprit}; step skipped")
        if run.nonfinite_in_row >= config.train.max_nonfinite_steps:
            raise HkdError(
                f"{run.nonfinite_in_row} non-finite steps in a row (last from {culprit}) at step {step + 1}; "
                "lower optim.lr, check the data, or raise train.max_nonfinite_steps"
            )
    else:
        run.nonfinite_in_row = 0
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)

    return {
        "step": step + 1,
        "phase": position.index,
        "loss": sum(weights[n] * losses[n] for n in active),
        **{f"loss/{n}": v for n, v in losses.items()},
        **{f"weight/{n}": w for n, w in weights.items()},
        "temperature": temperature,
        "lr": lr,
        "grad_norm": norm,
        "tokens": tokens,
        "tokens_per_s": seen / max(time.perf_counter() - started, 1e-9),
        **stage_metrics,
    }


def micro_batch_terms(run: Run, micro: dict[str, torch.Tensor], keys: dict[str, str],
                      teacher_requests: list[TapRequest], student_request: TapRequest,
                      state: StepState) -> dict[str, dict[str, torch.Tensor]]:
    """Forward what the active stages need and return each stage's named loss terms.

    ``bf16-mixed`` runs forwards and losses under bf16 autocast; stages and kernels accumulate
    in fp32 themselves.
    """
    with autocast(run):
        state.teachers, student_view = forward_views(run, micro, teacher_requests, student_request, state.host_batch)
        return {name: stage_loss_terms(run.stages, key, micro, state.teachers[0], student_view, state)
                for name, key in keys.items()}


@contextmanager
def out_of_memory_hint(config: Config) -> Iterator[None]:
    """Turn an OOM into advice that names the batch and the knobs that shrink it."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise HkdError(
            f"out of memory on a micro-batch of {config.data.batch_size} sequences x {config.data.max_length} "
            f"tokens (optim.grad_accum={config.optim.grad_accum}): lower data.batch_size and raise "
            "optim.grad_accum to keep the global batch, set stages.logits.fused: true or kernels.distill_loss: "
            "chunked to avoid full logits, or train from an offline teacher cache"
        ) from exc


def validate(run: Run, step: int) -> dict[str, float]:
    """Held-out metrics after ``step``; a new best student goes to ``best/``."""
    assert run.best is not None
    weights = run.schedule.weights(step - 1)
    metrics = evaluate(run, step, {name: run.schedule.stage_key(step - 1, name) for name, w in weights.items() if w > 0})
    key = f"eval/{run.config.eval.metric}"
    if key in metrics and run.best.update(metrics[key], step, run.config.eval.min_delta):
        state = ckpt.full_model_state(run.student)  # every rank joins the gather under FSDP
        if run.info.is_main:
            save_best(run, state)
    if run.info.is_main:
        run.best.save(run.run_dir)
    return metrics


# --------------------------------------------------------------------------- 3. finish


def save(run: Run, step: int) -> None:
    """Every rank helps gather the full state; rank 0 writes it while the others wait."""
    path = ckpt.save_checkpoint(
        run.run_dir / "checkpoints", step, run.trainable, run.optimizer, {"config": run.config.to_dict()},
        keep=run.config.train.keep_checkpoints, write=run.info.is_main,
    )
    run.saved_step = step
    run.hook("hkd_on_checkpoint", step=step, path=path)
    barrier(run.info)


def finish(run: Run, step: int, metrics: dict[str, float]) -> RunResult:
    """The last checkpoint (unless this step's is already written), the final model, end hooks."""
    if run.saved_step != step:
        save(run, step)
    final_dir = run.run_dir / "final"
    student_state = ckpt.full_model_state(run.student)  # gathered from all shards under FSDP
    if run.info.is_main:
        save_student(run.student, run.tokenizer, final_dir, student_state, run.config, export_options(run))
    run.hook("hkd_on_train_end", step=step, run_dir=run.run_dir, final_dir=final_dir, metrics=metrics)
    barrier(run.info)
    return RunResult(run.run_dir, final_dir, step, metrics)


# --------------------------------------------------------------------------- all three


@contextmanager
def stop_requests() -> Iterator[dict[str, bool]]:
    """SIGINT/SIGTERM set a flag: the loop finishes its step, checkpoints and exits cleanly."""
    flag = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        flag["stop"] = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def distill(config: Config, run_dir: Path, *, resume: bool = False, pm: HkdPluginManager | None = None) -> RunResult:
    if any(getattr(spec, "placement", "colocated") == "ranks" for spec, _, _, _ in teacher_entries(config)):
        # teacher ranks serve; student ranks come back to train()
        return distill_ranked(config, run_dir, resume=resume, pm=pm, build_run=build_run, train=train)
    return train(build_run(config, run_dir, resume=resume, pm=pm))


def train(run: Run) -> RunResult:
    """Steps from ``run.start_step`` to the end (or an early stop), checkpoints, and :func:`finish`."""
    config, run_dir = run.config, run.run_dir
    total = run.schedule.total_steps
    run.hook("hkd_on_train_start", config=config, run_dir=run_dir, student=run.student, teacher=run.teachers[0].model,
             start_step=run.start_step, total_steps=total, resumed_from=run.resumed_from)
    step, metrics, stopped = run.start_step, {}, False
    with stop_requests() as stop:
        while step < total and not stopped:
            metrics = train_step(run, step)
            step += 1
            if config.eval.every and step % config.eval.every == 0:
                metrics.update(validate(run, step))
            run.hook("hkd_after_step", step=step, metrics=metrics, run_dir=run_dir)
            # every rank must agree to stop at the same step, or one would enter the checkpoint's
            # collectives while another runs the next step
            stopped = bool(all_reduce_sum([float(stop["stop"])], run.info, run.device)[0])
            if run.best is not None and config.eval.patience and run.best.since_best >= config.eval.patience:
                if run.info.is_main:
                    tqdm.write(f"early stop after step {step}: eval/{run.best.metric} has not improved for "
                               f"{run.best.since_best} evaluations (best {run.best.best:.4g} at step "
                               f"{run.best.best_step}, in {run.run_dir / 'best'})")
                break  # early stopping: no improvement for eval.patience evaluations; finish normally
            every = config.train.checkpoint_every
            if (every and step % every == 0) or stopped:
                save(run, step)
    if stopped and step < total:
        raise StoppedEarly(f"stopped by signal after step {step}; checkpoint saved, continue with --resume")
    return finish(run, step, metrics)
