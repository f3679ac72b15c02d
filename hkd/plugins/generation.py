"""The built-in generation backend ``transformers``: the live model's ``generate`` with the KV cache.

Batched, left-padded prompt token ids (:func:`hkd.sampling.hf_sampler.sample`), continued as given; per-token
log-probs of the sampled tokens are recorded during sampling, under the tempered, top-p-filtered distribution,
and the draws come from a generator of the sampler's own (seeded with ``params.seed``). It samples
the model object the caller holds, so ``sync_weights`` only points it at the model it is given:
a student updated in place is sampled as it is now, with no copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hkd import hookimpl
from hkd import HkdError
from hkd import GenerationBackendSpec, GenerationContext, PromptBatch, SamplingParams

if TYPE_CHECKING:
    import torch

    from hkd import Samples


class TransformersBackend:
    def __init__(self, context: GenerationContext) -> None:
        if context.model is None:
            raise HkdError(f"{context.where}: the transformers backend samples a live model; none was given")
        if context.tokenizer is None:
            raise HkdError(f"{context.where}: the transformers backend needs the model's tokenizer")
        self.model = context.model
        self.tokenizer = context.tokenizer

    def generate(self, prompts: PromptBatch, params: SamplingParams) -> Samples:
        from hkd import sample  # transformers is imported when a backend first samples

        return sample(self.model, self.tokenizer, prompts, n=params.n,  # type: ignore[arg-type]
                      max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                      top_p=params.top_p, seed=params.seed, stop_token_ids=params.stop_token_ids)

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # the live object: its weights are already the current ones


def transformers_backend(context: GenerationContext, **options: Any) -> TransformersBackend:
    if options:
        raise TypeError(f"the transformers backend takes no options, got {sorted(options)}")
    return TransformersBackend(context)


@hookimpl
def hkd_add_generation_backends() -> list[GenerationBackendSpec]:
    return [GenerationBackendSpec("transformers", transformers_backend,
                                  "the live model's generate(): KV cache, batched, left-padded", needs_model=True,
                                  takes_token_ids=True)]
