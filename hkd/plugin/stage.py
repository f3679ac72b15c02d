"""What a distillation stage is.

A stage is an ``nn.Module``: its parameters (projectors) are trained with the student and
its ``state_dict`` goes into every checkpoint, so a stage needs no extra save/load code.
It declares what it needs from each model (:class:`hkd.models.view.TapRequest`) and turns the two
:class:`hkd.models.view.ModelView` s into named losses.

Normalisation contract: a stage returns losses already divided by ``state.tokens``, the
number of real (non-ignored) target tokens in the *whole* optimizer step (all gradient
accumulation micro-batches). Summing per-token terms and dividing by that count makes the
accumulated gradient equal to the gradient of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from torch import Tensor, nn

from hkd.models.view import ModelView, TapRequest

if TYPE_CHECKING:  # annotations only: `hkd stages` need not import transformers
    from transformers import PreTrainedModel


@dataclass
class StageContext:
    """What a stage factory may look at when it builds the stage."""

    name: str
    teacher: PreTrainedModel | None
    student: PreTrainedModel
    kernels: dict[str, str]  # op -> backend, from the run config
    config_path: str  # dotted path of the stage's config, for error messages
    plugins: Any = None  # the run's plugin manager (to build verifiers); None outside the loop
    tokenizer: Any = None  # the student's tokenizer, for stages that sample text (RL)
    # what the teacher source can serve (hkd.teachers.sources); a stage may adapt its request to it,
    # e.g. the logits stage asks for sparse top-k targets from an offline cache
    teacher_serves: TapRequest = field(default_factory=lambda: TapRequest(logits=True, final_hidden=True))
    teacher_live: bool = True  # False: the teacher is an architecture without weights (offline cache)
    # every teacher of the run (``teacher`` is the first), their mixture weights (summing to 1)
    # and what each one's source serves; one teacher unless the config has ``teachers:``
    teachers: list[PreTrainedModel] = field(default_factory=list)
    teacher_weights: list[float] = field(default_factory=lambda: [1.0])
    teachers_serve: list[TapRequest] = field(default_factory=list)
    # the run's data config (hkd.config.DataConfig): a stage refuses here, before the first step,
    # what it cannot train on (e.g. data.packing); None outside the loop
    data: Any = None
    # the kind of targets an offline teacher_cache holds ("topk", "sampled", "none"); None: a live teacher
    teacher_cache_targets: str | None = None


@dataclass
class StepState:
    """Per-micro-batch facts the loop hands to every stage.

    Stages never need ``torch.distributed``: ``rank``/``world_size`` say which data-parallel
    process this is, and the loop averages gradients over ranks.
    """

    step: int  # the optimizer step being computed (0-based)
    temperature: float
    tokens: int  # real target tokens in the whole optimizer step, all ranks (for normalisation)
    micro_batch: int = 0  # index of this micro-batch within the step (0 .. micro_batches - 1)
    micro_batches: int = 1  # optim.grad_accum
    rank: int = 0
    world_size: int = 1
    # every teacher's view (``teacher_requests``); ``teachers[0]`` is the ``teacher`` argument
    teachers: list[ModelView | None] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    # the same micro-batch as the host built it (CPU tensors), for stages that need token values on
    # the host (re-tokenising, prompts to sample from): reading these waits for nothing; ``None``
    # outside the loop, where a stage reads the batch it is given
    host_batch: dict[str, Tensor] | None = None


class Stage(nn.Module):
    """Base class for stages: override the requests a stage needs and :meth:`loss`."""

    def teacher_request(self) -> TapRequest:
        """What this stage needs from the teacher's forward; empty means no teacher forward."""
        return TapRequest()

    def teacher_requests(self, count: int) -> list[TapRequest]:
        """What this stage needs from each of ``count`` teachers; by default only the first one,
        through :meth:`teacher_request`. Override to read several (their views arrive in
        ``state.teachers``)."""
        return [self.teacher_request()] + [TapRequest() for _ in range(count - 1)]

    def student_request(self) -> TapRequest:
        """What this stage needs from the student's forward; if no active stage needs anything,
        the loop skips the student forward and passes ``student=None``."""
        return TapRequest()

    def export_options(self) -> dict[str, Any]:
        """What this stage, as configured, tells the saved student (``final/``, ``best/``): the
        sentence stage gives its ``pooling``. Stages are asked in schedule order; later phases win."""
        return {}

    def parallel_refusal(self, parallel: str) -> str | None:
        """Why this stage, as configured, cannot run under ``train.parallel: <parallel>`` (``ddp`` or
        ``fsdp``), naming its config key; ``None`` when it can. The loop refuses at build time."""
        return None

    def loss(self, batch: dict[str, Tensor], teacher: ModelView | None, student: ModelView | None,
             state: StepState) -> dict[str, Tensor]:
        """Return named loss terms (each already normalised by ``state.tokens``).

        The loop weights their sum by the stage's scheduled weight. Extra keys starting with
        ``metric/`` are logged but not added to the loss (use detached tensors for them).
        Returning no loss terms (or terms without gradient) contributes nothing; a step whose
        total has no gradient skips ``backward()``.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class StageSpec:
    """A stage type a plugin offers (returned from ``hkd_add_stages``)."""

    name: str
    config_cls: type
    factory: Callable[[Any, StageContext], Stage]
    description: str = ""
    level: str = "custom"  # structural | feature | decision | rl | custom
    cross_tokenizer: bool = False  # handles teacher/student with different tokenizers (hkd.models.loading.check_compatible)


def available_stages(pm: Any) -> dict[str, StageSpec]:
    """Stage specs from every registered plugin; two plugins claiming one name is an error."""
    return dict(pm.named("hkd_add_stages", "stage"))


def merged_options(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override``'s keys replacing its own; nested mappings merge key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merged_options(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_stages(
    pm: Any, names: list[str], stage_configs: dict[str, dict[str, Any]], make_context: Callable[[str], StageContext],
    phases: list[Any] = (),  # type: ignore[assignment]
) -> nn.ModuleDict:
    """Instantiate the named stages, validating each one's config block with its dataclass.

    A phase that gives a stage its own ``options`` gets its own instance ``<stage>@<phase>``
    (own projectors, own state), built from ``stages.<stage>`` merged with those options.
    """
    from hkd.config import from_dict
    from hkd.config.needs import check_needs
    from hkd.errors import ConfigError, HkdError

    specs = available_stages(pm)
    owners = {spec.name: plugin for plugin, spec in pm.collect("hkd_add_stages")}
    for name in list(stage_configs):
        if name not in specs:
            raise ConfigError(f"stages.{name}: no installed plugin provides this stage; available: {sorted(specs)}")
    instances: list[tuple[str, str, dict[str, Any], str]] = []  # (key, stage, options, config path)
    for name in names:
        if name not in specs:
            raise ConfigError(
                f"schedule: stage {name!r} is not available (disabled or not installed); available: {sorted(specs)}"
            )
        instances.append((name, name, stage_configs.get(name, {}), f"stages.{name}"))
    for index, phase in enumerate(phases):
        for name, options in phase.options.items():
            where = f"schedule.phases[{index}].options.{name}"
            if name not in phase.stages:
                raise ConfigError(f"{where}: stage {name!r} is not in this phase's stages {sorted(phase.stages)}")
            instances.append((f"{name}@{phase.name}", name, merged_options(stage_configs.get(name, {}), options), where))
    stages = nn.ModuleDict()
    for key, name, options, where in instances:
        if key in stages or "." in key:
            raise ConfigError(f"{where}: phases that give a stage options need distinct names without '.' "
                              f"(instance {key!r})")
        config: Any = from_dict(specs[name].config_cls, options, where)
        # options that act only with another, as the stage's config declares them (hkd/config/needs.py)
        check_needs(config, list(getattr(specs[name].config_cls, "NEEDS", ())), where)
        context = make_context(name)
        context.config_path = where
        try:
            stages[key] = specs[name].factory(config, context)
        except HkdError:
            raise
        except Exception as exc:  # a plugin's bug must name the plugin, not end in a bare traceback
            raise HkdError(f"stage {name!r} (plugin {owners[name]!r}) failed to build: {exc!r}") from exc
    return stages
