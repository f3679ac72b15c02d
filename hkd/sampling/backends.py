"""Generation backends: who samples completions for ``hkd generate``, pseudo-labels and RL.

At scale a teacher writes data on a serving engine (vLLM, SGLang), not through
``model.generate``; a student sampling on-policy wants the fastest sampler it can get. So
sampling is a plugin contract, and today's KV-cache sampler (:func:`hkd.sampling.hf_sampler.sample`) is
just the built-in backend ``transformers``.

The contract, in three parts:

* A plugin returns :class:`GenerationBackendSpec` objects from ``hkd_add_generation_backends``:
  a name (what config selects with ``backend:``) and a factory
  ``factory(context: GenerationContext, **options) -> GenerationBackend``; ``options`` are the
  config's ``backend_options`` mapping.
* The :class:`GenerationContext` says what the caller has: the live model when one is loaded
  in this process (the student in RL/on-policy; the teacher in ``hkd generate`` when the spec
  says ``needs_model``), the tokenizer every returned id must come from, and the model's
  directory, from which an engine loads its own copy of the weights.
* A :class:`GenerationBackend` has ``generate(prompts, params) -> Samples``: ``params.n``
  completions for each prompt, prompt-major, with token ids, masks, texts and the
  log-probability of every sampled token under the sampling distribution (logits divided by
  the temperature, top-p renormalised; 0 for greedy decoding). Optionally
  ``sync_weights(model)``: a trainer calls it (through :func:`sync_weights`) before sampling
  with a model it has updated since, so an engine holding its own weights copies them in; a
  backend sampling the live model needs nothing there.

Determinism: callers pass ``params.seed``; the same prompts, params and weights must give the
same samples, because ``hkd generate`` resumes a crashed run exactly by sampling the
unfinished batches again with their seeds. A backend that cannot promise this still works, but
a resumed output then differs from the uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from hkd.errors import ConfigError, HkdError

if TYPE_CHECKING:
    import torch

    from hkd.sampling.hf_sampler import Samples


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: the same for every prompt of one ``generate`` call."""

    n: int = 1  # completions per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy decoding
    top_p: float = 1.0  # nucleus sampling; 1: the whole vocabulary
    seed: int | None = None  # same seed, prompts and weights: same samples

    def validate(self, where: str = "sampling") -> None:
        for name in ("n", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ConfigError(f"{where}.temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{where}.top_p: must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class GenerationContext:
    """What a backend's factory is given."""

    role: str  # "teacher" (generate, pseudo-labels) or "student" (RL, on-policy)
    tokenizer: Any  # returned ids are this tokenizer's; prompts are encoded as hkd.sampling.hf_sampler.encode_prompts does
    model: torch.nn.Module | None = None  # the live model, when the caller holds one
    model_path: str | None = None  # the model's HF directory: what an engine loads its own weights from
    device: torch.device | None = None  # where the caller's model lives
    where: str = "backend"  # config key prefix for error messages


@runtime_checkable
class GenerationBackend(Protocol):
    """Samples completions. Optional method: ``sync_weights(model: torch.nn.Module) -> None``."""

    def generate(self, prompts: list[str], params: SamplingParams) -> Samples: ...


@dataclass(frozen=True)
class GenerationBackendSpec:
    """A backend a plugin offers: ``factory(context, **options) -> GenerationBackend``."""

    name: str
    factory: Callable[..., GenerationBackend]
    description: str = ""
    # True: the backend samples the live model, so hkd generate loads it into this process;
    # False: it loads its own weights from context.model_path (an engine), and hkd generate
    # loads only the tokenizer
    needs_model: bool = True


def available_generation_backends(manager: Any) -> dict[str, GenerationBackendSpec]:
    """Every backend the plugins of ``manager`` register, by name; a name registered twice is an error."""
    return dict(manager.named("hkd_add_generation_backends", "generation backend", GenerationBackendSpec))


def get_generation_backend(manager: Any, name: str, where: str = "backend") -> GenerationBackendSpec:
    """The spec registered as ``name``; an unknown name is a config error listing the known ones."""
    specs = available_generation_backends(manager)
    if name not in specs:
        raise ConfigError(f"{where}: unknown generation backend {name!r}; available: {sorted(specs)}")
    return specs[name]


def build_generation_backend(manager: Any, name: str, context: GenerationContext,
                             options: dict[str, Any] | None = None) -> GenerationBackend:
    """Look up ``name`` and call its factory; bad options name the backend and the config key."""
    spec = get_generation_backend(manager, name, context.where)
    if spec.needs_model and context.model is None:
        raise HkdError(f"{context.where}: generation backend {name!r} samples a live model, but none was loaded")
    try:
        backend = spec.factory(context, **(options or {}))
    except TypeError as exc:
        raise ConfigError(f"{context.where}_options: bad options for generation backend {name!r}: {exc}") from exc
    if not callable(getattr(backend, "generate", None)):
        raise HkdError(f"generation backend {name!r}: its factory returned {type(backend).__name__}, "
                       "which has no generate(prompts, params) method")
    return NamedBackend(name, backend)


def sync_weights(backend: Any, model: torch.nn.Module) -> None:
    """Hand ``model``'s current weights to ``backend`` if it keeps its own copy (its optional ``sync_weights``)."""
    method = getattr(backend, "sync_weights", None)
    if method is not None:
        method(model)


class NamedBackend:
    """A backend whose output is checked against the contract, so a broken plugin is named.

    Wrong shapes from an engine would otherwise surface as an index error deep in a loss.
    """

    def __init__(self, name: str, inner: GenerationBackend) -> None:
        self.name = name
        self.inner = inner

    def generate(self, prompts: list[str], params: SamplingParams) -> Samples:
        samples = self.inner.generate(prompts, params)
        check_samples(samples, len(prompts), params, self.name)
        return samples

    def sync_weights(self, model: torch.nn.Module) -> None:
        sync_weights(self.inner, model)


def check_samples(samples: Any, num_prompts: int, params: SamplingParams, backend: str) -> None:
    """Raise naming ``backend`` unless ``samples`` has the contract's fields and shapes."""
    rows = num_prompts * params.n

    def bad(what: str) -> HkdError:
        return HkdError(f"generation backend {backend!r} broke the contract: {what}")

    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "texts", "token_logprobs"):
        if getattr(samples, name, None) is None:
            raise bad(f"its samples have no {name}")
    if len(samples.texts) != rows:
        raise bad(f"{len(samples.texts)} texts for {num_prompts} prompts x n={params.n}")
    for name in ("prompt_ids", "prompt_mask"):
        if tuple(getattr(samples, name).shape[:1]) != (rows,):
            raise bad(f"{name} has shape {tuple(getattr(samples, name).shape)}, expected ({rows}, prompt length)")
    width = tuple(samples.completion_ids.shape)
    if len(width) != 2 or width[0] != rows:
        raise bad(f"completion_ids has shape {width}, expected ({rows}, completion length)")
    if width[1] > params.max_new_tokens:
        raise bad(f"completions of {width[1]} tokens, more than max_new_tokens={params.max_new_tokens}")
    for name in ("completion_mask", "token_logprobs"):
        if tuple(getattr(samples, name).shape) != width:
            raise bad(f"{name} has shape {tuple(getattr(samples, name).shape)}, expected {width} like completion_ids")
