"""Prompt transforms: augmentation as plugins (``hkd_add_prompt_transforms``).

``hkd generate`` with ``augment: [{name, variants, options}]`` passes every prompt record
through each configured transform, which returns up to ``variants`` new records (a new
prompt, and a new reference answer when the transform can compute one). Variants join the
prompt's batch and are then solved, pseudo-labelled and verified like any prompt (``mode:
augment`` writes them without sampling, for encoder text). Each variant carries its origin
(source prompt id and text, transform, options) in the output.

A transform is built once from its options, ``factory(context, **options)``, and then
called as ``transform(record, rng, count) -> list[record]``. ``rng`` is a
:class:`random.Random` seeded from the run's seed, the prompt id and the transform, so a
resumed run makes the same variants. Variants equal to the source prompt or to an earlier
variant are dropped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from hkd.config.schema import ranged
from hkd.errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass
class TransformConfig:
    """One entry of ``augment:``."""

    name: str  # a transform some plugin registers (``arith_operands``, ``mlm_replace``, ...)
    variants: int = ranged(1, low=1, high=2**16)  # new records per source record (at most; a transform may make fewer)
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of its factory


@dataclass(frozen=True)
class TransformContext:
    prompt_field: str  # the record field holding the text to vary
    answer_field: str  # the reference answer field (a transform that changes the answer sets or drops it)
    base_dir: Path  # relative paths in options (a model directory) are taken from here
    device: torch.device | None = None
    where: str = "augment"  # config key for error messages
    teacher_path: Path | None = None  # the teacher's model directory (mlm_replace's default masked-LM)


class PromptTransform(Protocol):
    def __call__(self, record: dict[str, Any], rng: random.Random, count: int) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class PromptTransformSpec:
    """A transform a plugin offers: ``factory(context, **options) -> PromptTransform``."""

    name: str
    factory: Callable[..., PromptTransform]
    description: str = ""


def available_prompt_transforms(manager: Any) -> dict[str, PromptTransformSpec]:
    return dict(manager.named("hkd_add_prompt_transforms", "prompt transform"))


def build_prompt_transform(manager: Any, config: TransformConfig, context: TransformContext) -> PromptTransform:
    """Look up ``config.name`` and build it; unknown names and bad options name the config key."""
    specs = available_prompt_transforms(manager)
    if config.name not in specs:
        raise ConfigError(f"{context.where}.name: unknown prompt transform {config.name!r}; available: {sorted(specs)}")
    if config.variants < 1:
        raise ConfigError(f"{context.where}.variants: must be >= 1, got {config.variants}")
    try:
        return specs[config.name].factory(context, **config.options)
    except TypeError as exc:
        raise ConfigError(f"{context.where}.options: bad options for prompt transform {config.name!r}: {exc}") from exc
