"""The distillation loop. Read it top to bottom: set up, then one optimizer step at a time.

    batch ─► teacher (no_grad, only the taps active stages need) ─► TeacherView
          └► student (taps)                                       ─► StudentView
    total = Σ weight_i(step) · stage_i.loss(...)  ─► backward ─► clip ─► AdamW step
    hooks: hkd_after_step (loggers), checkpoints every N steps, final save_pretrained

With ``teacher_cache`` set, the teacher is never loaded (only its config, on the meta device)
and its side of each micro-batch comes from the offline cache (:mod:`hkd.cache`).
"""

from __future__ import annotations

import math
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from tqdm.auto import tqdm

from hkd import checkpoint as ckpt
from hkd.config import Config
from hkd.cache import TeacherCache, fingerprint, needed_request, teacher_dir, teacher_skeleton
from hkd.data import Batches, encode_dataset
from hkd.distributed import (
    DistInfo, all_reduce_sum, barrier, clip_gradients, init_distributed, shard_model, sync_gradients,
)
from hkd.errors import ConfigError, HkdError, StoppedEarly
from hkd.manager import HkdPluginManager, build_manager
from hkd.models import check_compatible, freeze, load_model
from hkd.schedule import Schedule
from hkd.stage import StageContext, StepState, build_stages
from hkd.taps import ModelView, TapRequest, enable_taps, forward_with_taps


@dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    steps: int
    last_metrics: dict[str, float]


def resolve_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_optimizer(config: Config, params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    """AdamW; matrices decay, biases and norm gains do not (the usual GPT recipe)."""
    decay = [p for p in params if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in params if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.optim.lr, betas=tuple(config.optim.betas))  # type: ignore[arg-type]


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


def stage_loss_terms(stages: torch.nn.ModuleDict, name: str, *args: Any) -> dict[str, torch.Tensor]:
    """Call a stage's loss; a failure inside a plugin's stage names the stage."""
    try:
        stage: Any = stages[name]
        return stage.loss(*args)
    except (HkdError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        raise HkdError(f"stage {name!r} failed computing its loss: {exc!r}") from exc


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


def distill(config: Config, run_dir: Path, *, resume: bool = False, pm: HkdPluginManager | None = None) -> RunResult:
    pm = pm or build_manager(config.plugins.disable)
    info = init_distributed()
    cache = TeacherCache(config.teacher_cache) if config.teacher_cache else None
    if info.is_main:  # only rank 0 writes; the others wait for presets to exist
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        teacher_dir(config.teacher, run_dir)
        load_model(config.student, "student", run_dir)
    barrier(info)
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    device = resolve_device(config.train.device, info)

    # --- models: teacher frozen, both from local directories (presets were written above);
    # with an offline cache the teacher is only its architecture, without weights
    if cache is None:
        teacher, teacher_tok = load_model(config.teacher, "teacher", run_dir)
    else:
        teacher, teacher_tok = teacher_skeleton(config.teacher, run_dir)
    student, student_tok = load_model(config.student, "student", run_dir)
    check_compatible(teacher, student, teacher_tok, student_tok)
    tokenizer = student_tok or teacher_tok
    if tokenizer is None:
        raise HkdError("neither the teacher nor the student directory has a tokenizer")
    freeze(teacher)
    if cache is None:
        teacher.to(device)  # type: ignore[arg-type]
    student.to(device).train()  # type: ignore[arg-type]

    # --- stages named anywhere in the schedule, with their own validated configs
    schedule = Schedule(config.schedule, config.optim)

    def context(name: str) -> StageContext:
        return StageContext(name, teacher, student, config.kernels, f"stages.{name}", pm, tokenizer)

    stages: Any = build_stages(pm, schedule.stage_names, config.stages, context).to(device)
    if any(stage.teacher_request().attention or stage.student_request().attention for stage in stages.values()):
        enable_taps(teacher)
        enable_taps(student)
    if info.enabled and config.train.parallel == "fsdp":
        if any(getattr(stage.config, "fused", False) for stage in stages.values()):
            raise ConfigError("train.parallel: fsdp cannot be combined with stages.logits.fused yet; use ddp")
        if cache is None:
            shard_model(teacher, reshard_after_forward=True)
        shard_model(student, reshard_after_forward=False)
    trainable = torch.nn.ModuleDict({"student": student, "stages": stages})  # what checkpoints hold

    # --- data, optimizer, resume
    causal = not config.student.encoder
    encoded = encode_dataset(tokenizer, config.data, config.train.seed)
    if cache is not None:  # refuse targets computed for another teacher, tokenizer, data or layer map
        cache.check(fingerprint(teacher_dir(config.teacher, run_dir), tokenizer, encoded), needed_request(stages))
    batches = Batches(encoded, config.data, tokenizer.pad_token_id or 0, config.train.seed, causal)
    params = list(trainable.parameters())
    optimizer = make_optimizer(config, params)
    start_step = 0
    if resume:
        found = ckpt.list_checkpoints(run_dir / "checkpoints")
        if not found:
            raise HkdError(f"--resume: no checkpoint in {str(run_dir / 'checkpoints')!r}")
        start_step = ckpt.load_checkpoint(found[-1], trainable, optimizer)["step"]

    if info.is_main:
        pm.call("hkd_on_train_start", config=config, run_dir=run_dir, student=student, teacher=teacher,
                start_step=start_step)

    def teacher_side(micro: dict[str, torch.Tensor], request: TapRequest) -> ModelView:
        """A live teacher forward, or the offline cache (which also adds top-k targets to ``micro``)."""
        if cache is None:
            return forward_with_taps(teacher, micro, request)
        view, sparse_targets = cache.view(micro, request)
        micro.update(sparse_targets)
        return view

    accum = config.optim.grad_accum
    metrics: dict[str, float] = {}
    phase_index = -1
    nonfinite_in_row = 0
    bar = tqdm(total=schedule.total_steps, initial=start_step, disable=not (config.train.progress and info.is_main),
               unit="step")
    with stop_requests() as stop:
        step = start_step
        while step < schedule.total_steps and not stop["stop"]:
            position = schedule.phase_at(step)
            weights = schedule.weights(step)
            active = {name: w for name, w in weights.items() if w > 0}
            if position.index != phase_index and info.is_main:
                phase_index = position.index
                pm.call("hkd_on_phase_start", phase_name=position.name, phase_index=position.index,
                        step=step, active_stages=sorted(active))
            temperature = schedule.temperature(step)
            lr = config.optim.lr * schedule.lr_factor(step)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # teacher forward only for what active stages need; none at all if nothing does
            teacher_request = TapRequest()
            student_request = TapRequest()
            for name in active:
                teacher_request = teacher_request.merge(stages[name].teacher_request())
                student_request = student_request.merge(stages[name].student_request())

            started = time.perf_counter()
            # rank r takes micro-batches [r*A, (r+1)*A) of the step's world*A: the same data as one process
            first = (step * info.world_size + info.rank) * accum
            micro_batches = [batches.batch(first + i) for i in range(accum)]
            micro_tokens = [int(mb["loss_mask"].sum()) for mb in micro_batches]  # counted on the host: no sync
            local_tokens = sum(micro_tokens)
            local_seen = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
            tokens, seen = (int(x) for x in all_reduce_sum([local_tokens, local_seen], info, device))
            state = StepState(step=step, temperature=temperature, tokens=tokens)
            stage_losses = {name: 0.0 for name in active}
            # a stage's "metric/..." terms: per-micro-batch values, logged as their token-weighted mean
            metric_sums: dict[str, list[float]] = {}  # name -> [sum of value * tokens, sum of tokens]
            # a phase may pause every stage: then no micro-batch runs
            for micro, micro_count in zip(micro_batches, micro_tokens) if active else []:
                micro = {k: v.to(device) for k, v in micro.items()}
                with out_of_memory_hint(config):
                    with torch.no_grad():
                        teacher_view = None if teacher_request.empty() else teacher_side(micro, teacher_request)
                    student_view = forward_with_taps(student, micro, student_request)
                    total = torch.zeros((), device=device)
                    for name, weight in active.items():
                        terms = stage_loss_terms(stages, name, micro, teacher_view, student_view, state)
                        stage_loss: Any = sum(v for k, v in terms.items() if not k.startswith("metric/"))
                        stage_losses[name] += float(stage_loss.detach())
                        for key in (k for k in terms if k.startswith("metric/")):
                            acc = metric_sums.setdefault(key, [0.0, 0.0])
                            acc[0] += float(terms[key]) * micro_count
                            acc[1] += micro_count
                        total = total + weight * stage_loss
                    del teacher_view, student_view  # free activations before backward
                    (total * info.world_size).backward()  # ranks average gradients: undo the 1/N
            sync_gradients(params, info)
            stage_metrics = {k: weighted / count if count else 0.0 for k, (weighted, count) in metric_sums.items()}
            stage_losses = dict(zip(stage_losses, all_reduce_sum(list(stage_losses.values()), info, device)))

            bad = [name for name, value in stage_losses.items() if not math.isfinite(value)]
            grad_norm = clip_gradients(params, config.optim.grad_clip)
            if bad or not torch.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                nonfinite_in_row += 1
                culprit = f"stage(s) {bad}" if bad else "the gradient"
                tqdm.write(f"step {step + 1}: non-finite loss from {culprit}; step skipped")
                if nonfinite_in_row >= config.train.max_nonfinite_steps:
                    raise HkdError(
                        f"{nonfinite_in_row} non-finite steps in a row (last from {culprit}) at step {step + 1}; "
                        "lower optim.lr, check the data, or raise train.max_nonfinite_steps"
                    )
            else:
                nonfinite_in_row = 0
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1

            elapsed = time.perf_counter() - started
            metrics = {
                "step": step,
                "phase": position.index,
                "loss": sum(weights[n] * stage_losses[n] for n in active),
                **{f"loss/{n}": v for n, v in stage_losses.items()},
                **{f"weight/{n}": w for n, w in weights.items()},
                "temperature": temperature,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": tokens,
                "tokens_per_s": seen / max(elapsed, 1e-9),
                **stage_metrics,
            }
            if info.is_main:
                pm.call("hkd_after_step", step=step, metrics=metrics, run_dir=run_dir)
            bar.update(1)
            bar.set_postfix(phase=position.name, loss=f"{metrics['loss']:.4f}")
            every = config.train.checkpoint_every
            if (every and step % every == 0) or stop["stop"]:
                save(run_dir, step, trainable, optimizer, config, pm, info)
    bar.close()
    if stop["stop"] and step < schedule.total_steps:
        raise StoppedEarly(f"stopped by signal after step {step}; checkpoint saved, continue with --resume")
    save(run_dir, step, trainable, optimizer, config, pm, info)
    final_dir = run_dir / "final"
    student_state = ckpt.full_model_state(student)  # gathered from all shards under FSDP
    if info.is_main:
        student.save_pretrained(final_dir, state_dict=student_state, safe_serialization=True)
        tokenizer.save_pretrained(final_dir)
        pm.call("hkd_on_train_end", step=step, run_dir=run_dir, final_dir=final_dir, metrics=metrics)
    barrier(info)
    return RunResult(run_dir, final_dir, step, metrics)


def save(run_dir: Path, step: int, trainable: torch.nn.Module, optimizer: torch.optim.Optimizer,
         config: Config, pm: HkdPluginManager, info: DistInfo) -> None:
    """Every rank helps gather the full state; rank 0 writes it while the others wait."""
    path = ckpt.save_checkpoint(
        run_dir / "checkpoints", step, trainable, optimizer, {"config": config.to_dict()},
        keep=config.train.keep_checkpoints, write=info.is_main,
    )
    if info.is_main:
        pm.call("hkd_on_checkpoint", step=step, path=path)
    barrier(info)
