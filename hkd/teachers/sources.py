"""Where teacher targets come from: a live teacher forward, or the offline cache.

A :class:`TeacherSource` turns a micro-batch and a :class:`hkd.models.view.TapRequest` into a
:class:`hkd.models.view.ModelView`, and says up front what it can serve (:meth:`TeacherSource.serves`,
itself a ``TapRequest``). The loop checks every stage's teacher request against it at
start-up, so a stage asking for something a source lacks is refused by name before step 1.
Several teachers are several sources (a list); each stage reads the view of the source it
was built for.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from transformers import PreTrainedModel

from hkd.teachers.cache import (
    HostTargets, TeacherCache, cache_serves, constant_temperature, describe_temperature, fingerprint, teacher_skeleton,
)
from hkd.config import Config, ModelConfig, TeacherModelConfig, TemperatureConfig
from hkd.errors import ConfigError
from hkd.models.loading import freeze, load_model, num_layers
from hkd.models.taps import forward_with_taps
from hkd.models.view import ModelView, TapRequest, unserved


READ_AHEAD = 4  # micro-batches a cached teacher reads ahead, at most


class TeacherSource(Protocol):
    """One teacher, as the loop sees it."""

    name: str  # for messages: "teacher" or "teacher_cache '<path>'"
    model: PreTrainedModel  # the teacher's architecture (weights only when live): stages read its config
    live: bool  # a real forward runs (False: targets are read from storage)

    def serves(self) -> TapRequest:
        """Everything this source can put in a view."""
        ...

    def view(self, batch: dict[str, Tensor], request: TapRequest,
             host_batch: dict[str, Tensor] | None = None) -> ModelView:
        """The teacher's side of ``batch`` (no gradient), exposing what ``request`` names. ``host_batch``: the
        same micro-batch on the host, as the loop built it (``None`` outside the loop)."""
        ...


class LiveTeacher:
    """A frozen teacher model on the training device; taps record what stages ask for."""

    live = True

    def __init__(self, model: PreTrainedModel, name: str = "teacher") -> None:
        self.model = model
        self.name = name

    def serves(self) -> TapRequest:
        layers = num_layers(self.model)
        has_head = getattr(self.model, "lm_head", None) is not None
        return TapRequest(hidden=set(range(layers + 1)), attention=set(range(1, layers + 1)),
                          logits=has_head, final_hidden=has_head)

    def view(self, batch: dict[str, Tensor], request: TapRequest,
             host_batch: dict[str, Tensor] | None = None) -> ModelView:
        with torch.no_grad():
            return forward_with_taps(self.model, batch, request)


class CachedTeacher:
    """Targets written once by ``hkd cache-teacher``: top-k logits with the teacher's log-normaliser,
    sampled targets, or none, and the mapped hidden states.

    ``model`` is the teacher's architecture on the meta device (no weights are loaded).
    ``temperature``: the run's ``schedule.temperature``; the tail bucket and sampled targets are
    exact only at the cache's temperature, so they are served only when the run uses that one
    at every step (:func:`hkd.teachers.cache.cache_serves`).
    """

    live = False

    def __init__(self, cache: TeacherCache, skeleton: PreTrainedModel,
                 temperature: TemperatureConfig | None = None) -> None:
        self.cache = cache
        self.model = skeleton
        self.name = f"teacher_cache {str(cache.path)!r}"
        self.temperature = temperature or TemperatureConfig()
        self._pool: ThreadPoolExecutor | None = None  # the reader thread, started by the first read
        self._pending: OrderedDict[tuple[Any, ...], Future[HostTargets]] = OrderedDict()  # reads under way, by key

    def serves(self) -> TapRequest:
        return cache_serves(self.cache.index, constant_temperature(self.temperature))[0]

    def notes(self) -> list[str]:
        """Why the cache serves less than a cache could (its targets kind, its temperature)."""
        return cache_serves(self.cache.index, constant_temperature(self.temperature),
                            describe_temperature(self.temperature))[1]

    def check_fingerprint(self, teacher_path: Path, tokenizer: Any, encoded: list[tuple[list[int], list[int]]]) -> None:
        """Refuse targets computed for another teacher, tokenizer or data set."""
        self.cache.check(fingerprint(teacher_path, tokenizer, encoded))

    # --- reading ahead: shard reads, the per-row target positions and the host-side scatter run on one
    # background thread (:meth:`prefetch`), so the step only copies finished host tensors to the device.
    # A prefetch is keyed by what the targets depend on (examples, batch shape, request); a view it
    # does not match is read on the same thread while the step waits, so the targets (and a resumed
    # run) never depend on what was read ahead.

    def _reader(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hkd-cache-reader")
        return self._pool

    def prefetch(self, host_batch: dict[str, Tensor], request: TapRequest, device: torch.device) -> None:
        """Start reading ``host_batch``'s targets (CPU tensors, as the loop builds them) for ``request``."""
        key = _prefetch_key(host_batch, request)
        if key in self._pending:
            return
        pin = torch.device(device).type == "cuda"
        self._pending[key] = self._reader().submit(self.cache.read, host_batch, request, pin)
        while len(self._pending) > READ_AHEAD:  # never consumed (the schedule changed): drop the oldest
            self._pending.popitem(last=False)

    def view(self, batch: dict[str, Tensor], request: TapRequest,
             host_batch: dict[str, Tensor] | None = None) -> ModelView:
        device = batch["loss_mask"].device
        if host_batch is None:  # outside the loop: the batch itself is what there is to read
            return self.cache.view(batch, request)
        future = self._pending.pop(_prefetch_key(host_batch, request), None)
        if future is None:  # not read ahead (the first micro-batch, a resume): read it now, on the reader thread
            future = self._reader().submit(self.cache.read, host_batch, request, device.type == "cuda")
        return self.cache.to_view(future.result(), device)

    def close(self) -> None:
        """Stop the reader thread (a pending read is finished and dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._pending.clear()


def _prefetch_key(host_batch: dict[str, Tensor], request: TapRequest) -> tuple[Any, ...]:
    """What a micro-batch's cached targets depend on: its examples, its shape and the request."""
    mask = host_batch["loss_mask"]
    return (tuple(host_batch["example_index"].tolist()), tuple(mask.shape), tuple(sorted(request.hidden)),
            request.sparse_logits, request.sparse_logsumexp)


@dataclass
class OpenedTeacher:
    """A source with what opening it took: its config entry, preset role and tokenizer."""

    source: TeacherSource
    spec: ModelConfig
    role: str  # "teacher", "teacher1", ...: where a preset is written (RUN_DIR/models/ROLE)
    tokenizer: Any
    weight: float


def teacher_entries(config: Config) -> list[tuple[TeacherModelConfig, str, str | None, float]]:
    """``(spec, role, teacher_cache, weight)`` for ``teacher`` and then each of ``teachers``."""
    entries = [(config.teacher, "teacher", config.teacher_cache, config.teacher_weight)]
    entries += [(extra, f"teacher{i + 1}", extra.teacher_cache, extra.weight) for i, extra in enumerate(config.teachers)]
    return entries


def open_teachers(config: Config, run_dir: Path, device: torch.device, dtype: torch.dtype) -> list[OpenedTeacher]:
    """Every teacher of the run, in order: ``teacher`` (with ``teacher_cache``) then ``teachers``.

    Live teachers are loaded frozen onto ``device`` in ``dtype``; a cached one is only its
    architecture. Weights are normalised to sum to 1.
    """
    entries = teacher_entries(config)
    total = sum(weight for _, _, _, weight in entries)
    opened = []
    for spec, role, cache_path, weight in entries:
        source: TeacherSource
        if cache_path:
            skeleton, tokenizer = teacher_skeleton(spec, run_dir, role)
            cache = TeacherCache(cache_path)
            if cache.index["causal"] == config.student.encoder:  # rows are stored at the loss mask's positions
                built = "a causal student (targets after each token)" if cache.index["causal"] else "an encoder student"
                raise ConfigError(f"teacher_cache {str(cache.path)!r} was built for {built}, but student.encoder is "
                                  f"{str(config.student.encoder).lower()}; rebuild it with hkd cache-teacher")
            source = CachedTeacher(cache, skeleton, config.schedule.temperature)
        else:
            model, tokenizer = load_model(spec, role, run_dir)
            source = LiveTeacher(freeze(model).to(device, dtype), name=role)  # type: ignore[arg-type]
        opened.append(OpenedTeacher(source, spec, role, tokenizer, weight / total))
    return opened


def check_requests(source: TeacherSource, requests: dict[str, TapRequest]) -> None:
    """Refuse, naming stage and field, any stage whose teacher request ``source`` cannot serve."""
    problems = unserved(source.serves(), requests)
    if problems:
        hint = ("; build the cache with the layers the stages map to (hkd cache-teacher with this config), "
                "remove the stage, or train with the live teacher") if not source.live else ""
        notes = "".join(f" ({note})" for note in source.notes()) if isinstance(source, CachedTeacher) else ""
        raise ConfigError(f"{source.name} cannot serve what the schedule asks: {'; '.join(problems)}{notes}{hint}")
