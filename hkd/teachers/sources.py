"""Where teacher targets come from: a live teacher forward, or the offline cache.

A :class:`TeacherSource` turns a micro-batch and a :class:`hkd.models.view.TapRequest` into a
:class:`hkd.models.view.ModelView`, and says up front what it can serve (:meth:`TeacherSource.serves`,
itself a ``TapRequest``). The loop checks every stage's teacher request against it at
start-up, so a stage asking for something a source lacks is refused by name before step 1.
Several teachers are several sources (a list); each stage reads the view of the source it
was built for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from transformers import PreTrainedModel

from hkd.teachers.cache import (
    TeacherCache, cache_serves, constant_temperature, describe_temperature, fingerprint, teacher_skeleton,
)
from hkd.config import Config, ModelConfig, TeacherModelConfig, TemperatureConfig
from hkd.errors import ConfigError
from hkd.models.loading import freeze, load_model, num_layers
from hkd.models.taps import forward_with_taps
from hkd.models.view import ModelView, TapRequest, unserved


class TeacherSource(Protocol):
    """One teacher, as the loop sees it."""

    name: str  # for messages: "teacher" or "teacher_cache '<path>'"
    model: PreTrainedModel  # the teacher's architecture (weights only when live): stages read its config
    live: bool  # a real forward runs (False: targets are read from storage)

    def serves(self) -> TapRequest:
        """Everything this source can put in a view."""
        ...

    def view(self, batch: dict[str, Tensor], request: TapRequest) -> ModelView:
        """The teacher's side of ``batch`` (no gradient), exposing what ``request`` names."""
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

    def view(self, batch: dict[str, Tensor], request: TapRequest) -> ModelView:
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

    def serves(self) -> TapRequest:
        return cache_serves(self.cache.index, constant_temperature(self.temperature))[0]

    def notes(self) -> list[str]:
        """Why the cache serves less than a cache could (its targets kind, its temperature)."""
        return cache_serves(self.cache.index, constant_temperature(self.temperature),
                            describe_temperature(self.temperature))[1]

    def check_fingerprint(self, teacher_path: Path, tokenizer: Any, encoded: list[tuple[list[int], list[int]]]) -> None:
        """Refuse targets computed for another teacher, tokenizer or data set."""
        self.cache.check(fingerprint(teacher_path, tokenizer, encoded))

    def view(self, batch: dict[str, Tensor], request: TapRequest) -> ModelView:
        return self.cache.view(batch, request)


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
