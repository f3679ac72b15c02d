"""Ranges of command-line options, in one place with the config's.

A flag that sets what a config key sets takes the key's own :class:`Range` (``--seed`` is
``train.seed``'s); the others are declared here. ``hkd.cli`` builds each flag's argparse
``type`` from its range with :func:`number`, and the command checks the same range with
:func:`check_number` when it is called from Python, so ``--batches 10**9`` (a hang) or
``--threads 0`` (a torch error) never reaches the work.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Callable

from hkd.config.schema import MAX_STEPS, ModelConfig, Range, TemperatureConfig, TrainConfig
from hkd.errors import ConfigError


def field_range(cls: type, name: str) -> Range:
    """The :class:`Range` of a ``ranged`` config field."""
    for spec in dataclasses.fields(cls):  # type: ignore[arg-type]
        if spec.name == name:
            return spec.metadata["range"]  # type: ignore[no-any-return]
    raise KeyError(f"{cls.__name__}.{name}")


SEED = field_range(TrainConfig, "seed")  # seeds of draws, calibration and the demo: train.seed's range
PRESET_SEED = field_range(ModelConfig, "seed")  # hkd init-model --seed: a preset's weight seed
TEMPERATURE = field_range(TemperatureConfig, "start")  # cache-teacher --temperature: schedule.temperature's
BATCHES = Range(1, 10**5)  # probe / init-student --batches: micro-batches to measure on
TOP_K = Range(1, 2**20)  # cache-teacher --top-k (also at most the vocabulary, checked with the teacher)
SAMPLES = Range(1, 2**20)  # cache-teacher --samples: draws per position
EXAMPLES_PER_SHARD = Range(1, 10**7)  # cache-teacher --examples-per-shard
THREADS = Range(1, 4096)  # demo --threads: torch CPU threads
STEP = Range(0, MAX_STEPS)  # probe --step (0: the initial student)
SIZE = Range(1, 2**24)  # init-student --hidden / --intermediate / --heads (at most the teacher's, checked with it)
SHARE = Range(1, 2**16)  # init-student --share-layers


def check_number(value: Any, bounds: Range, where: str, kind: type = int) -> Any:
    """``value`` is a ``kind`` (no bool; a float is finite) inside ``bounds``, else a :class:`ConfigError` naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    if value not in bounds:
        raise ConfigError(f"{where}: {value!r} is outside {bounds}")
    return value


class Number:
    """An argparse ``type``: the text as ``kind``, inside ``bounds`` (the refusal names value and range)."""

    def __init__(self, bounds: Range, kind: type = int) -> None:
        self.bounds, self.kind = bounds, kind
        self.__name__ = kind.__name__  # argparse names the type in its own messages

    def __call__(self, text: str) -> Any:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if self.kind is int else 'a number'}, "
                                              f"got {text!r}") from None
        if self.kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value not in self.bounds:
            raise argparse.ArgumentTypeError(f"{value!r} is outside {self.bounds}")
        return value


def number(bounds: Range, kind: type = int) -> Callable[[str], Any]:
    """The argparse ``type`` of a flag with this range (:class:`Number`)."""
    return Number(bounds, kind)
