"""Where teacher targets come from: a live teacher forward, or the offline cache.

A :class:`TeacherSource` turns a micro-batch and a :class:`hkd.view.TapRequest` into a
:class:`hkd.view.ModelView`, and says up front what it can serve (:meth:`TeacherSource.serves`,
itself a ``TapRequest``). The loop checks every stage's teacher request against it at
start-up, so a stage asking for something a source lacks is refused by name before step 1.
Several teachers are several sources (a list); each stage reads the view of the source it
was built for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from transformers import PreTrainedModel

from hkd.cache import TeacherCache, fingerprint
from hkd.errors import ConfigError
from hkd.models import num_layers
from hkd.taps import forward_with_taps
from hkd.view import ModelView, TapRequest, unserved


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
    """Targets written once by ``hkd cache-teacher``: top-k logits and the mapped hidden states.

    ``model`` is the teacher's architecture on the meta device (no weights are loaded).
    """

    live = False

    def __init__(self, cache: TeacherCache, skeleton: PreTrainedModel) -> None:
        self.cache = cache
        self.model = skeleton
        self.name = f"teacher_cache {str(cache.path)!r}"

    def serves(self) -> TapRequest:
        return TapRequest(hidden=set(self.cache.index["layers"]), sparse_logits=True)

    def check_fingerprint(self, teacher_path: Path, tokenizer: Any, encoded: list[tuple[list[int], list[int]]]) -> None:
        """Refuse targets computed for another teacher, tokenizer or data set."""
        self.cache.check(fingerprint(teacher_path, tokenizer, encoded))

    def view(self, batch: dict[str, Tensor], request: TapRequest) -> ModelView:
        return self.cache.view(batch, request)


def check_requests(source: TeacherSource, requests: dict[str, TapRequest]) -> None:
    """Refuse, naming stage and field, any stage whose teacher request ``source`` cannot serve."""
    problems = unserved(source.serves(), requests)
    if problems:
        hint = ("; build the cache with the layers the stages map to (hkd cache-teacher with this config), "
                "remove the stage, or train with the live teacher") if not source.live else ""
        raise ConfigError(f"{source.name} cannot serve what the schedule asks: {'; '.join(problems)}{hint}")
