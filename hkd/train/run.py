"""What a run holds between steps (:class:`Run`), and the per-micro-batch calls that the training
step (:mod:`hkd.train.loop`) and held-out evaluation (:mod:`hkd.train.validation`) share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from hkd.config import Config
from hkd.data.encoding import Batches
from hkd.errors import HkdError
from hkd.models.taps import forward_with_taps
from hkd.models.view import ModelView, TapRequest
from hkd.plugin.manager import HkdPluginManager
from hkd.plugin.schedule import Schedule
from hkd.plugin.stage import Stage
from hkd.teachers.sources import TeacherSource
from hkd.train.best import BestTracker
from hkd.train.distributed import DistInfo


@dataclass
class Run:
    """Everything one training run holds between steps."""

    config: Config
    run_dir: Path
    pm: HkdPluginManager
    info: DistInfo
    device: torch.device
    student: PreTrainedModel
    tokenizer: Any
    teachers: list[TeacherSource]  # one today; several teachers are several sources
    stages: torch.nn.ModuleDict  # every stage named anywhere in the schedule
    schedule: Schedule
    batches: Batches
    optimizer: torch.optim.AdamW
    trainable: torch.nn.ModuleDict  # what checkpoints hold: the student and the stages' parameters
    precision: str = "fp32"  # resolved: fp32 | bf16-mixed | bf16
    start_step: int = 0
    resumed_from: Path | None = None
    phase_index: int = -1  # the phase the previous step ran in
    nonfinite_in_row: int = 0
    saved_step: int = -1  # the step of the newest checkpoint this process wrote
    params: list[torch.nn.Parameter] = field(default_factory=list)
    eval_batches: Batches | None = None  # held-out data (eval.every > 0)
    best: BestTracker | None = None  # the best evaluation so far (best/ holds its student)

    def hook(self, name: str, **kwargs: Any) -> None:
        """Lifecycle hooks run on rank 0 only (loggers, console)."""
        if self.info.is_main:
            self.pm.call(name, **kwargs)


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


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto``: bf16 autocast over fp32 weights on CUDA, plain fp32 elsewhere."""
    if name == "auto":
        return "bf16-mixed" if device.type == "cuda" else "fp32"
    return name


def stage_at(stages: torch.nn.ModuleDict, name: str) -> Stage:
    stage = stages[name]
    assert isinstance(stage, Stage)
    return stage


def autocast(run: Run) -> torch.autocast:
    return torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.precision == "bf16-mixed")


def forward_views(run: Run, micro: dict[str, torch.Tensor], teacher_requests: list[TapRequest],
                  student_request: TapRequest, host: dict[str, torch.Tensor] | None = None,
                  ) -> tuple[list[ModelView | None], ModelView | None]:
    """Each model's view for one micro-batch, teachers one after another; a model nothing is
    asked of does not run. ``host``: the micro-batch as the host built it, for a source that reads
    ahead (:func:`prefetch_teachers`)."""
    teacher_views = [None if request.empty() else
                     source.view(micro, request, host_batch=host) if host is not None and reads_ahead(source) else
                     source.view(micro, request)
                     for source, request in zip(run.teachers, teacher_requests)]
    student_view = None if student_request.empty() else forward_with_taps(run.student, micro, student_request)
    return teacher_views, student_view


def reads_ahead(source: TeacherSource) -> bool:
    """A source that prepares a micro-batch's view off the step (the offline cache's reader thread)."""
    return callable(getattr(source, "prefetch", None))


def step_requests(run: Run, step: int) -> tuple[dict[str, float], dict[str, str], list[TapRequest], TapRequest]:
    """At ``step``: the active stages' weights, the instance each runs as, and what each teacher and the
    student must expose (each model runs only for what active stages need, and not at all if nothing does)."""
    weights = run.schedule.weights(step)
    active = {name: w for name, w in weights.items() if w > 0}
    keys = {name: run.schedule.stage_key(step, name) for name in active}  # the instance each stage runs as
    teacher_requests = [TapRequest() for _ in run.teachers]
    student_request = TapRequest()
    for key in keys.values():
        asked = stage_at(run.stages, key).teacher_requests(len(run.teachers))
        teacher_requests = [have.merge(more) for have, more in zip(teacher_requests, asked)]
        student_request = student_request.merge(stage_at(run.stages, key).student_request())
    return active, keys, teacher_requests, student_request


def prefetch_teachers(run: Run, host: dict[str, torch.Tensor], requests: list[TapRequest]) -> None:
    """Start reading a coming micro-batch's teacher targets (``host``: built on the host) on every source
    that reads ahead, while the current one trains."""
    for source, request in zip(run.teachers, requests):
        if not request.empty() and reads_ahead(source):
            source.prefetch(host, request, run.device)  # type: ignore[attr-defined]


def prefetch_step(run: Run, step: int) -> None:
    """:func:`prefetch_teachers` for the first micro-batch of ``step`` (read ahead of that step), if any source
    reads ahead and the step asks it for something."""
    if not any(reads_ahead(source) for source in run.teachers):
        return
    active, _, requests, _ = step_requests(run, step)
    if active and not all(request.empty() for request in requests):
        first = (step * run.info.world_size + run.info.rank) * run.config.optim.grad_accum  # as train_step counts
        prefetch_teachers(run, run.batches.batch(first), requests)


def stage_loss_terms(stages: torch.nn.ModuleDict, key: str, *args: Any) -> dict[str, torch.Tensor]:
    """Call a stage instance's loss; a failure inside a plugin's stage names the stage."""
    try:
        return stage_at(stages, key).loss(*args)
    except (HkdError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        raise HkdError(f"stage {key!r} failed computing its loss: {exc!r}") from exc


def export_options(run: Run) -> dict[str, Any]:
    """The stages' options for the saved student, in schedule order (a later phase's instance wins)."""
    options: dict[str, Any] = {}
    for index, phase in enumerate(run.schedule.config.phases):
        for name in phase.stages:
            options.update(stage_at(run.stages, run.schedule.phase_stage_key(index, name)).export_options())
    return options
