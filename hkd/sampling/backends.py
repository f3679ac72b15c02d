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
  the temperature, top-p renormalised; 0 for greedy decoding). ``prompts`` is a
  :class:`PromptBatch`: token ids, rendered once by the caller (BOS, the chat template's
  special tokens), which the backend continues as they are and returns unchanged as
  ``Samples.prompt_ids``, so a trainer scores exactly the tokens that were sampled; a sample
  ends at EOS or at one of ``params.stop_token_ids`` (the chat template's end-of-turn token).
  A backend written before token-id prompts (its spec leaves ``takes_token_ids`` false) is
  given texts instead, decoded from the ids with their special tokens kept, and must encode
  them as :meth:`PromptBatch.from_texts` does. Optionally
  ``sync_weights(model)``: a trainer calls it (through :func:`sync_weights`) before sampling
  with a model it has updated since, so an engine holding its own weights copies them in; a
  backend sampling the live model needs nothing there.

Determinism: callers pass ``params.seed``; the same prompts, params and weights must give the
same samples, because ``hkd generate`` resumes a crashed run exactly by sampling the
unfinished batches again with their seeds. A backend that cannot promise this still works, but
a resumed output then differs from the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
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
    # a sample also ends at one of these tokens (inclusive); None: the tokenizer's chat template's
    # end-of-turn token, if it has one (hkd.data.chat.end_of_turn_ids). EOS always ends a sample
    stop_token_ids: tuple[int, ...] | None = None

    def validate(self, where: str = "sampling") -> None:
        for name in ("n", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ConfigError(f"{where}.temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{where}.top_p: must be in (0, 1], got {self.top_p}")


def with_stop_tokens(params: SamplingParams, tokenizer: Any) -> SamplingParams:
    """``params`` with ``stop_token_ids`` resolved: ``None`` becomes the chat template's end-of-turn token(s)."""
    if params.stop_token_ids is not None or tokenizer is None:
        return params
    from hkd.data.chat import end_of_turn_ids

    return dataclasses.replace(params, stop_token_ids=end_of_turn_ids(tokenizer))


@dataclass(frozen=True)
class PromptBatch:
    """Prompts as token ids: ``ids[i]`` is prompt ``i``, unpadded, with the special tokens of its
    rendering (BOS, a chat template's markers): exactly the ids a completion follows in training
    data (:func:`hkd.data.chat.prompt_ids`). The attention mask is 1 on every one of them;
    :meth:`padded` gives the left-padded ids and mask a batched sampler runs on."""

    ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_texts(cls, tokenizer: Any, prompts: Sequence[Any], chat_template: bool = False,
                   where: str = "prompts") -> PromptBatch:
        """Texts (or conversations: lists of messages) encoded as training data encodes prompts:
        ``[bos] + text``, or the chat template's rendering with the generation prompt."""
        from hkd.data.chat import prompt_ids

        return cls([prompt_ids(tokenizer, p, chat_template, where) for p in prompts])

    @classmethod
    def from_tensors(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PromptBatch:
        """The real tokens (``attention_mask == 1``) of each row of a padded batch, left or right padded."""
        ids, mask = input_ids.tolist(), attention_mask.tolist()
        return cls([[token for token, keep in zip(row, keep_row) if keep] for row, keep_row in zip(ids, mask)])

    def padded(self, pad_id: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[P, S]`` left-padded ids and attention mask (every row's continuation starts at column S)."""
        import torch

        width = max((len(row) for row in self.ids), default=0)
        # built on the host (explicitly: the step's device checks send device-less factories elsewhere), copied once
        ids = torch.full((len(self.ids), width), pad_id, dtype=torch.long, device="cpu")
        mask = torch.zeros((len(self.ids), width), dtype=torch.long, device="cpu")
        for i, row in enumerate(self.ids):
            if row:
                ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long, device="cpu")
                mask[i, width - len(row):] = 1
        return ids.to(device), mask.to(device)

    def texts(self, tokenizer: Any) -> list[str]:
        """The prompts as text for a backend that takes text: the BOS its encoder adds is dropped, every
        other special token (a chat template's) is kept, so re-encoding gives these ids back."""
        bos = tokenizer.bos_token_id
        return [tokenizer.decode(row[1:] if row and bos is not None and row[0] == bos else row,
                                 skip_special_tokens=False) for row in self.ids]


@dataclass(frozen=True)
class GenerationContext:
    """What a backend's factory is given."""

    role: str  # "teacher" (generate, pseudo-labels) or "student" (RL, on-policy)
    tokenizer: Any  # prompt and returned ids are this tokenizer's
    model: torch.nn.Module | None = None  # the live model, when the caller holds one
    model_path: str | None = None  # the model's HF directory: what an engine loads its own weights from
    device: torch.device | None = None  # where the caller's model lives
    where: str = "backend"  # config key prefix for error messages


@runtime_checkable
class GenerationBackend(Protocol):
    """Samples completions. Optional method: ``sync_weights(model: torch.nn.Module) -> None``.

    ``prompts`` is a :class:`PromptBatch` when the spec sets ``takes_token_ids``, else a list of texts."""

    def generate(self, prompts: Any, params: SamplingParams) -> Samples: ...


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
    # True: generate() takes a PromptBatch (token ids) and returns them as Samples.prompt_ids;
    # False (backends written before token-id prompts): it takes texts, decoded from the ids with
    # the chat template's special tokens kept (PromptBatch.texts), and encodes them itself
    takes_token_ids: bool = False


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
    return NamedBackend(name, backend, context.tokenizer, spec.takes_token_ids)


def sync_weights(backend: Any, model: torch.nn.Module) -> None:
    """Hand ``model``'s current weights to ``backend`` if it keeps its own copy (its optional ``sync_weights``)."""
    method = getattr(backend, "sync_weights", None)
    if method is not None:
        method(model)


class NamedBackend:
    """A backend whose output is checked against the contract, so a broken plugin is named.

    Wrong shapes from an engine would otherwise surface as an index error deep in a loss. It
    also bridges the two prompt forms: callers pass a :class:`PromptBatch` (texts from code
    written before are encoded as training data's prompts are), a text backend gets texts.
    """

    def __init__(self, name: str, inner: GenerationBackend, tokenizer: Any = None, takes_token_ids: bool = True) -> None:
        self.name = name
        self.inner = inner
        self.tokenizer = tokenizer
        self.takes_token_ids = takes_token_ids

    def generate(self, prompts: PromptBatch | Sequence[str], params: SamplingParams) -> Samples:
        if not isinstance(prompts, PromptBatch):
            if self.tokenizer is None:
                raise HkdError(f"generation backend {self.name!r}: text prompts need the context's tokenizer")
            prompts = PromptBatch.from_texts(self.tokenizer, list(prompts))
        params = with_stop_tokens(params, self.tokenizer)
        if not self.takes_token_ids:
            samples = self.inner.generate(prompts.texts(self.tokenizer), params)
            check_samples(samples, len(prompts), params, self.name)
            return samples
        samples = self.inner.generate(prompts, params)
        check_samples(samples, len(prompts), params, self.name)
        check_prompt_ids(samples, prompts, params, self.name)
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


def check_prompt_ids(samples: Any, prompts: PromptBatch, params: SamplingParams, backend: str) -> None:
    """Raise naming ``backend`` unless every sample's prompt is the prompt it was given, token for token."""
    ids, mask = samples.prompt_ids.tolist(), samples.prompt_mask.tolist()
    for row, (row_ids, row_mask) in enumerate(zip(ids, mask)):
        got = [token for token, keep in zip(row_ids, row_mask) if keep]
        if got != list(prompts.ids[row // params.n]):
            raise HkdError(f"generation backend {backend!r} broke the contract: sample {row}'s prompt_ids are not the "
                           f"ids of prompt {row // params.n} it was given ({len(got)} tokens returned, "
                           f"{len(prompts.ids[row // params.n])} given)")
