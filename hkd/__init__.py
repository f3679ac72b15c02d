"""hkd: progressive hierarchical knowledge distillation for transformer models.

The public API for plugin authors lives here, as ``pytest.hookimpl`` does for pytest::

    from hkd import hookimpl, Stage, StageSpec, StageContext, StepState, TapRequest, ModelView

Built-in plugins (:mod:`hkd.plugins`) import only these names, :mod:`hkd.kernels` and
:mod:`hkd.tasks`, as a third-party plugin would; an ``import-linter`` contract keeps it so.
Names are imported on first use, so ``import hkd`` (and ``hkd --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hkd import _moved

__version__ = "0.1.0"

_moved.install()  # 0.1 module paths (hkd.verify, hkd.stage, ...) keep importing

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # the contract: hooks and stages
    "hookimpl": "hkd.plugin.hookspecs",
    "hookspec": "hkd.plugin.hookspecs",
    "Stage": "hkd.plugin.stage",
    "StageSpec": "hkd.plugin.stage",
    "StageContext": "hkd.plugin.stage",
    "StepState": "hkd.plugin.stage",
    "build_manager": "hkd.plugin.manager",
    "HkdError": "hkd.errors",
    "ConfigError": "hkd.errors",
    "Config": "hkd.config",
    "ranged": "hkd.config.schema",  # a stage config's numeric option with its range (checked when built)
    "Need": "hkd.config.needs",  # a stage config's NEEDS rows: options that act only with another
    # what a stage sees of a model, and helpers to read it
    "TapRequest": "hkd.models.view",
    "ModelView": "hkd.models.view",
    "SparseTargets": "hkd.models.view",
    "QKV": "hkd.models.taps",
    "enable_taps": "hkd.models.taps",
    "LayerMapConfig": "hkd.models.layermap",
    "build_layer_map": "hkd.models.layermap",
    "layer_metrics": "hkd.models.layermap",
    "output_head": "hkd.models.architectures",
    "apply_logit_softcap": "hkd.models.architectures",
    "check_supported": "hkd.models.architectures",
    "load_tokenizer": "hkd.models.loading",
    "to_device": "hkd.models.device",
    "full_parameter": "hkd.models.device",
    # data and tokenizers
    "read_jsonl": "hkd.data.records",
    "IGNORE_INDEX": "hkd.data.labels",
    "next_token_labels": "hkd.data.labels",
    "next_token_targets": "hkd.data.labels",
    "prompt_ids": "hkd.data.chat",
    "end_of_turn_ids": "hkd.data.chat",
    "Retokenized": "hkd.data.tokenalign",
    "VocabMatch": "hkd.data.tokenalign",
    "cross_vocab_distance": "hkd.data.tokenalign",
    "retokenize": "hkd.data.tokenalign",
    # sampling, verifiers and prompt transforms
    "Verdict": "hkd.sampling.verify",
    "Verifier": "hkd.sampling.verify",
    "VerifierSpec": "hkd.sampling.verify",
    "VerifierConfig": "hkd.sampling.verify",
    "build_verifier": "hkd.sampling.verify",
    "answer_extractor": "hkd.sampling.verify",
    "compile_pattern": "hkd.sampling.verify",
    "GenerationBackend": "hkd.sampling.backends",
    "GenerationBackendSpec": "hkd.sampling.backends",
    "GenerationContext": "hkd.sampling.backends",
    "SamplingParams": "hkd.sampling.backends",
    "PromptBatch": "hkd.sampling.backends",
    "get_generation_backend": "hkd.sampling.backends",
    "build_generation_backend": "hkd.sampling.backends",
    "sync_weights": "hkd.sampling.backends",
    "Samples": "hkd.sampling.hf_sampler",
    "sample": "hkd.sampling.hf_sampler",
    "PromptTransform": "hkd.sampling.augment",
    "PromptTransformSpec": "hkd.sampling.augment",
    "TransformContext": "hkd.sampling.augment",
    # kernels and seeds
    "KernelBackend": "hkd.kernels.registry",
    "derive_seed": "hkd.train.seeding",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from hkd.config import Config
    from hkd.config.needs import Need
    from hkd.config.schema import ranged
    from hkd.data.chat import end_of_turn_ids, prompt_ids
    from hkd.data.records import read_jsonl
    from hkd.data.labels import IGNORE_INDEX, next_token_labels, next_token_targets
    from hkd.data.tokenalign import Retokenized, VocabMatch, cross_vocab_distance, retokenize
    from hkd.errors import ConfigError, HkdError
    from hkd.kernels.registry import KernelBackend
    from hkd.models.architectures import apply_logit_softcap, check_supported, output_head
    from hkd.models.device import full_parameter, to_device
    from hkd.models.layermap import LayerMapConfig, build_layer_map, layer_metrics
    from hkd.models.loading import load_tokenizer
    from hkd.models.taps import QKV, enable_taps
    from hkd.models.view import ModelView, SparseTargets, TapRequest
    from hkd.plugin.hookspecs import hookimpl, hookspec
    from hkd.plugin.manager import build_manager
    from hkd.plugin.stage import Stage, StageContext, StageSpec, StepState
    from hkd.sampling.augment import PromptTransform, PromptTransformSpec, TransformContext
    from hkd.sampling.backends import (GenerationBackend, GenerationBackendSpec, GenerationContext, PromptBatch,
                                       SamplingParams, build_generation_backend, get_generation_backend, sync_weights)
    from hkd.sampling.hf_sampler import Samples, sample
    from hkd.sampling.verify import (Verdict, Verifier, VerifierConfig, VerifierSpec, answer_extractor,
                                     build_verifier, compile_pattern)
    from hkd.train.seeding import derive_seed


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:  # not cached: a monkeypatch on the defining module is what `from hkd import` sees
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hkd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
