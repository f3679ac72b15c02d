"""The teacher on its own ranks (``teacher.placement: ranks``): who is who in the torchrun job, the
process groups, and what each side runs.

One torchrun job of ``W`` processes: ranks ``0 .. S-1`` are student ranks (``S = W - Σ teacher.ranks``),
then each teacher's ``ranks`` in config order (``teacher``, then ``teachers[0]``, ...). Student ranks
train exactly as a run without teacher ranks would (their own process group for the gradient
all-reduce, :class:`hkd.train.distributed.DistInfo` ``group``); each holds a
:class:`hkd.teachers.ranked.RemoteTeacher` per teacher (the architecture on the meta device, no
weights). Teacher rank ``t`` of a teacher serves the student ranks ``r`` with ``r % ranks == t``.

Start-up is two all-rank exchanges, so a refusal on any rank stops every rank with its message:
(A) each teacher's first rank writes a preset teacher; (B) student ranks build their run (models,
stages, resume) while teacher ranks load their teacher; student rank 0 then hands every teacher
rank the plan: the first step (resume), the last, and for every stretch of steps what the active
stages ask of that teacher. The end: student rank 0 tells every teacher rank the run stopped
(finished, signalled or failed); each sends its students an end message and exits.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from hkd.config import Config
from hkd.data.encoding import Batches, encode_dataset
from hkd.errors import ConfigError, HkdError, StoppedEarly
from hkd.models.loading import freeze, load_model, load_tokenizer, preset_dir
from hkd.models.taps import enable_taps
from hkd.plugin.manager import HkdPluginManager
from hkd.plugin.schedule import Schedule
from hkd.teachers.cache import teacher_dir, teacher_skeleton
from hkd.teachers.ranked import Channel, Receiver, RemoteTeacher, Work, request_from_json, request_to_json, serve
from hkd.teachers.sources import OpenedTeacher, teacher_entries
from hkd.train.distributed import DistInfo, init_distributed
from hkd.train.run import Run, RunResult, resolve_device, resolve_precision, stage_at
from hkd.models.view import TapRequest

CONTROL_TIMEOUT = timedelta(days=7)  # start-up exchanges and the stop message: as long as a run may take


@dataclass(frozen=True)
class Layout:
    """Who is who: ``students`` student ranks first, then each teacher's global ranks."""

    students: int
    teachers: list[list[int]]  # per teacher (config order): its global ranks
    rank: int  # this process's global rank

    @property
    def teacher(self) -> tuple[int, int] | None:
        """``(teacher index, rank among its ranks)`` on a teacher rank, ``None`` on a student rank."""
        for index, ranks in enumerate(self.teachers):
            if self.rank in ranks:
                return index, ranks.index(self.rank)
        return None

    def serving(self, teacher: int, student: int) -> int:
        """The global rank of ``teacher`` that serves ``student``."""
        ranks = self.teachers[teacher]
        return ranks[student % len(ranks)]

    def served(self, teacher: int, local: int) -> list[int]:
        return [r for r in range(self.students) if r % len(self.teachers[teacher]) == local]


def refusals(config: Config) -> None:
    """Combinations a teacher on its own ranks does not run (yet), refused by key before anything loads."""
    entries = teacher_entries(config)
    where = ["teacher"] + [f"teachers[{i}]" for i in range(len(config.teachers))]
    placed = [spec.placement for spec, _, _, _ in entries]
    if len(set(placed)) > 1:
        mixed = ", ".join(f"{w}.placement: {p}" for w, p in zip(where, placed))
        raise ConfigError(f"teacher.placement: every teacher runs on its own ranks or none does ({mixed})")
    for name, (spec, _, cache, _) in zip(where, entries):
        if cache:
            key = "teacher_cache" if name == "teacher" else f"{name}.teacher_cache"
            raise ConfigError(f"{key}: an offline cache needs no teacher ranks; drop {name}.placement: ranks "
                              "or the cache")
    if config.train.parallel == "fsdp":
        raise ConfigError("train.parallel: fsdp is not supported with teacher.placement: ranks yet (the student "
                          "ranks' FSDP mesh); use ddp: the student ranks then hold no teacher shard at all")
    if config.eval.every:
        raise ConfigError("eval.every: held-out evaluation is not supported with teacher.placement: ranks yet "
                          "(the teacher ranks would have to serve the held-out batches); set eval.every: 0")
    if config.data.streaming:
        raise ConfigError("data.streaming: not supported with teacher.placement: ranks yet (every rank reads the "
                          "data itself, which needs a data set it can index)")


def layout(config: Config, world: int, rank: int) -> Layout:
    refusals(config)
    counts = [spec.ranks for spec, _, _, _ in teacher_entries(config)]
    students = world - sum(counts)
    if students < 1:
        raise ConfigError(f"teacher.ranks: {sum(counts)} teacher rank(s) leave no student rank in a torchrun job of "
                          f"WORLD_SIZE={world}; start torchrun with --nproc_per_node (x --nnodes) = student ranks "
                          f"+ {sum(counts)}")
    where = ["teacher"] + [f"teachers[{i}]" for i in range(len(config.teachers))]
    for name, count in zip(where, counts):
        if count > students:
            raise ConfigError(f"{name}.ranks: {count} teacher ranks for {students} student rank(s); each teacher "
                              "rank serves whole student ranks, so at most one per student rank")
    teachers, first = [], students
    for count in counts:
        teachers.append(list(range(first, first + count)))
        first += count
    return Layout(students, teachers, rank)


@dataclass
class Groups:
    students: Any
    control: Any  # gloo, every rank: the start-up exchanges and the stop message
    meta: list[Any]  # per teacher: gloo, students + its ranks
    data: list[Any]  # per teacher: the device backend, students + its ranks


def make_groups(lay: Layout) -> Groups:
    """Every rank creates every group, in the same order (``new_group`` is collective).

    No short timeouts on the groups themselves: a teacher rank waits in its send as long as its
    students checkpoint; a silent teacher rank is caught by the student's own deadline
    (``timeout_s``, :meth:`hkd.teachers.ranked.Receiver.next`) and a dead one by the broken connection."""
    students = list(range(lay.students))
    student_group = dist.new_group(students)
    control = dist.new_group(list(range(lay.students + sum(map(len, lay.teachers)))), backend="gloo",
                             timeout=CONTROL_TIMEOUT)
    meta, data = [], []
    for ranks in lay.teachers:
        meta.append(dist.new_group(students + ranks, backend="gloo", timeout=CONTROL_TIMEOUT))
        data.append(dist.new_group(students + ranks, timeout=CONTROL_TIMEOUT))
    return Groups(student_group, control, meta, data)


def exchange(groups: Groups, lay: Layout, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``payload`` (``{"error": message}`` on a rank that failed); a failure anywhere is
    raised on every rank, naming the rank that failed."""
    gathered: list[Any] = [None] * (lay.students + sum(map(len, lay.teachers)))
    dist.all_gather_object(gathered, payload, group=groups.control)
    for rank, item in enumerate(gathered):
        if item.get("error"):
            if rank == lay.rank:
                raise HkdError(item["error"])
            role = "student" if rank < lay.students else "teacher"
            raise HkdError(f"{role} rank {rank} stopped the start-up: {item['error']}")
    return gathered


def _error(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, HkdError) else f"{type(exc).__name__}: {exc}"


def step_requests(run: Run, step: int) -> list[TapRequest]:
    """What the active stages ask of each teacher at ``step`` (as :func:`hkd.train.loop.train_step` merges them)."""
    schedule = run.schedule
    requests = [TapRequest() for _ in run.teachers]
    for name, weight in schedule.weights(step).items():
        if weight > 0:
            asked = stage_at(run.stages, schedule.stage_key(step, name)).teacher_requests(len(run.teachers))
            requests = [have.merge(more) for have, more in zip(requests, asked)]
    return requests


def segments(run: Run, teacher: int) -> list[tuple[int, int, dict[str, Any]]]:
    """``[first, end) -> request`` over the whole run for one teacher. Requests change only where a
    phase starts or its weight ramp ends (:class:`hkd.plugin.schedule.Schedule`); the teacher rank sends
    each micro-batch's request along and the student checks it against the step's, so a schedule
    that changed elsewhere would be named, never silently served."""
    total = run.schedule.total_steps
    points, start = {0, total}, 0
    for phase in run.config.schedule.phases:
        points.add(start)
        if run.config.schedule.ramp_steps and start + run.config.schedule.ramp_steps < start + phase.steps:
            points.add(start + run.config.schedule.ramp_steps)
        start += phase.steps
    edges = sorted(p for p in points if p <= total)
    return [(a, b, request_to_json(step_requests(run, a)[teacher])) for a, b in zip(edges, edges[1:]) if a < b]


# --------------------------------------------------------------------------- entry


def distill_ranked(config: Config, run_dir: Path, *, resume: bool = False, pm: HkdPluginManager | None = None,
                   build_run: Callable[..., Run], train: Callable[[Run], RunResult]) -> RunResult:
    """Run this rank's part of a job whose teachers sit on their own ranks. Student ranks build and
    train their run with the loop's ``build_run`` and ``train`` (passed in: the loop calls this module)."""
    world = init_distributed()
    lay = layout(config, world.world_size, world.rank)
    if not world.enabled:  # layout() refused already: no torchrun world has at least 2 ranks here
        raise ConfigError("teacher.placement: ranks needs torchrun")  # pragma: no cover
    groups = make_groups(lay)
    if lay.teacher is None:
        return _student(config, run_dir, resume, pm, world, lay, groups, build_run, train)
    return _teacher(config, run_dir, world, lay, groups)


def _student(config: Config, run_dir: Path, resume: bool, pm: HkdPluginManager | None, world: DistInfo,
             lay: Layout, groups: Groups, build_run: Callable[..., Run], train: Callable[[Run], RunResult]) -> RunResult:
    exchange(groups, lay, {})  # (A) teacher presets written
    info = DistInfo(world.rank, lay.students, world.local_rank, group=groups.students)
    entries = teacher_entries(config)
    receivers: list[Receiver] = []

    def open_remote(config: Config, run_dir: Path, device: torch.device, dtype: torch.dtype) -> list[OpenedTeacher]:
        total = sum(weight for _, _, _, weight in entries)
        opened = []
        for index, (spec, role, _, weight) in enumerate(entries):
            skeleton, tokenizer = teacher_skeleton(spec, run_dir, role)  # config and tokenizer only, no weights
            peer = lay.serving(index, world.rank)
            who = f"teacher rank {peer} ({role}, {lay.teachers[index].index(peer) + 1} of {len(lay.teachers[index])})"
            receiver = Receiver(Channel(groups.meta[index], groups.data[index], peer, device),
                                spec.run_ahead, who, spec.timeout_s)
            receivers.append(receiver)
            source = RemoteTeacher(skeleton, f"{role} (on its own ranks, {role}.placement: ranks)", receiver,
                                   spec.transfer)
            opened.append(OpenedTeacher(source, spec, role, tokenizer, weight / total))
        return opened

    plan: dict[str, Any] = {}
    try:
        run = build_run(config, run_dir, resume=resume, pm=pm, info=info, open_sources=open_remote)
        if world.rank == 0:
            plan = {"start_step": run.start_step, "total_steps": run.schedule.total_steps,
                    "segments": [segments(run, i) for i in range(len(entries))],
                    "precision": run.precision, "device_type": run.device.type}
    except BaseException as exc:
        exchange(groups, lay, {"error": _error(exc)})  # (B) every rank learns why, then this one raises it
        raise
    exchange(groups, lay, {"plan": plan} if plan else {})  # (B)
    outcome = "failed"
    try:
        result = train(run)
        outcome = "done"
        if world.rank == 0:
            _record(run_dir, world.rank, {"role": "student", "waited_for_teacher_s": [r.waited_s for r in receivers]})
        return result
    except StoppedEarly as exc:  # a signal (torchrun signals every rank when one dies: name a teacher rank that did)
        outcome = "stopped"
        _end(groups, lay, world.rank, receivers, wait_s=10.0)
        gone = [r for r in receivers if r.failure is not None]
        if gone:
            raise HkdError(f"{gone[0].who} stopped answering ({' '.join(str(gone[0].failure).split())}); "
                           f"{exc}") from exc
        raise
    finally:
        if outcome != "stopped":  # done, or a failure here: the teacher ranks must not wait for students that left
            if not _end(groups, lay, world.rank, receivers, wait_s=max(r.timeout_s for r in receivers)
                        if outcome == "done" else 5.0) and outcome == "done":
                print("hkd: warning: a teacher rank did not confirm the end of the run (the student is saved)",
                      file=sys.stderr)


def _record(run_dir: Path, rank: int, facts: dict[str, Any]) -> None:
    """``RUN_DIR/ranks/rank-<R>.json``: how long a student waited for its teachers, how busy a teacher
    rank was (compute vs send, which includes waiting for a free slot) and how many bytes it sent."""
    out = run_dir / "ranks" / f"rank-{rank}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(facts, indent=1))


def _end(groups: Groups, lay: Layout, rank: int, receivers: list[Receiver], wait_s: float) -> bool:
    """Student rank 0 tells every teacher rank the run is over; every student rank then takes what is
    still in flight until its teacher rank's end message. ``False``: some end message never came."""
    if rank == 0:
        for ranks in lay.teachers:
            for teacher_rank in ranks:
                try:
                    dist.send(torch.tensor([1], dtype=torch.int64), teacher_rank, group=groups.control)
                except Exception:  # that teacher rank is gone already; the others still get theirs
                    pass
    return all([receiver.close(timeout_s=wait_s) for receiver in receivers])


def _teacher(config: Config, run_dir: Path, world: DistInfo, lay: Layout, groups: Groups) -> RunResult:
    assert lay.teacher is not None
    index, local = lay.teacher
    spec, role, _, _ = teacher_entries(config)[index]
    try:
        if local == 0:
            with _saves_on_this_rank():  # a preset is written here, by the teacher's own rank
                teacher_dir(spec, run_dir, role)
        error: dict[str, Any] = {}
    except BaseException as exc:
        error = {"error": _error(exc)}
    exchange(groups, lay, error)  # (A)
    device = resolve_device(config.train.device, world)
    precision = resolve_precision(config.train.precision, device)
    try:
        model, teacher_tok = load_model(spec, role, run_dir)
        freeze(model).to(device, torch.float32 if precision == "fp32" else torch.bfloat16)  # type: ignore[arg-type]
        error = {}
    except BaseException as exc:
        error = {"error": _error(exc)}
    gathered = exchange(groups, lay, error)  # (B): student rank 0's plan
    plan = gathered[0]["plan"]
    served = lay.served(index, local)
    channels = {r: Channel(groups.meta[index], groups.data[index], r, device) for r in served}
    work = Work(plan["start_step"], plan["total_steps"], plan["segments"][index], served, lay.students,
                config.optim.grad_accum)
    stop = _StopListener(groups.control)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:  # a signal reaches every rank: the teacher serves until the students have checkpointed and stopped
        batches = _batches(config, run_dir, teacher_tok)
        if any(request_from_json(r).attention for _, _, r in work.segments):
            enable_taps(model)
        schedule = Schedule(config.schedule, config.optim)
        mixed = precision == "bf16-mixed"
        stats = serve(model, batches.batch, work, channels, schedule.temperature, spec.top_k,
                      lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed), stop.value)
        final = stop.wait()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if final < 0:
        raise HkdError("student rank 0 left without ending the run (see its output)")
    _record(run_dir, world.rank, {"role": "teacher", "teacher": role, "served": served, "sent": stats.sent,
                                  "bytes": stats.bytes, "compute_s": stats.compute_s, "send_s": stats.send_s})
    return RunResult(run_dir, run_dir / "final", stats.steps, {"teacher/sent": float(stats.sent),
                                                        "teacher/bytes": float(stats.bytes),
                                                        "teacher/compute_s": stats.compute_s,
                                                        "teacher/send_s": stats.send_s})


@contextmanager
def _saves_on_this_rank() -> Iterator[None]:
    """transformers >= 5 writes ``save_pretrained``'s files on global rank 0 only, which is a student
    rank here: the teacher's first rank writes its own preset (the students never build its weights)."""
    from transformers import PreTrainedModel

    if not hasattr(PreTrainedModel, "should_save_on_this_rank"):  # older transformers: every rank writes
        yield
        return
    own = PreTrainedModel.__dict__.get("should_save_on_this_rank")  # else inherited from a mixin
    setattr(PreTrainedModel, "should_save_on_this_rank", lambda self, is_main_process: is_main_process)
    try:
        yield
    finally:
        if own is None:
            delattr(PreTrainedModel, "should_save_on_this_rank")
        else:
            setattr(PreTrainedModel, "should_save_on_this_rank", own)


def _batches(config: Config, run_dir: Path, teacher_tok: Any) -> Batches:
    """The data exactly as the student ranks read it (the student's tokenizer, written by student rank 0)."""
    student_path = preset_dir(config.student, "student", run_dir) if config.student.preset else Path(
        str(config.student.path)).expanduser()
    tokenizer = load_tokenizer(student_path, config.student.trust_remote_code) or teacher_tok
    if tokenizer is None:
        raise HkdError("neither the teacher nor the student directory has a tokenizer")
    encoded = encode_dataset(tokenizer, config.data, config.train.seed)
    return Batches(encoded, config.data, tokenizer.pad_token_id or 0, config.train.seed,
                   causal=not config.student.encoder)


class _StopListener:
    """Waits, on its own thread, for student rank 0's stop message (the step the run ended at)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.result: int | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="hkd-stop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        buffer = torch.zeros(1, dtype=torch.int64)
        try:
            dist.recv(buffer, 0, group=self.group)
            self.result = int(buffer.item())
        except Exception:  # student rank 0 is gone: stop serving
            self.result = -1
        self.done.set()

    def value(self) -> int | None:
        return self.result if self.done.is_set() else None

    def wait(self) -> int:
        while not self.done.wait(timeout=1.0):
            time.sleep(0)
        assert self.result is not None
        return self.result
