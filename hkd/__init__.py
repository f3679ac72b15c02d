"""hkd: progressive hierarchical knowledge distillation for transformer models.

The public API for plugin authors lives here, as ``pytest.hookimpl`` does for pytest::

    from hkd import hookimpl, Stage, StageSpec, StageContext, StepState, TapRequest, ModelView

Names are imported on first use, so ``import hkd`` (and ``hkd --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "hookimpl": "hkd.hookspecs",
    "hookspec": "hkd.hookspecs",
    "Stage": "hkd.stage",
    "StageSpec": "hkd.stage",
    "StageContext": "hkd.stage",
    "StepState": "hkd.stage",
    "TapRequest": "hkd.view",
    "ModelView": "hkd.view",
    "SparseTargets": "hkd.view",
    "QKV": "hkd.taps",
    "Verdict": "hkd.verify",
    "Verifier": "hkd.verify",
    "VerifierSpec": "hkd.verify",
    "KernelBackend": "hkd.kernels.registry",
    "GenerationBackend": "hkd.generation",
    "GenerationBackendSpec": "hkd.generation",
    "GenerationContext": "hkd.generation",
    "SamplingParams": "hkd.generation",
    "Samples": "hkd.sampling",
    "get_generation_backend": "hkd.generation",
    "build_generation_backend": "hkd.generation",
    "PromptTransformSpec": "hkd.augment",
    "TransformContext": "hkd.augment",
    "HkdError": "hkd.errors",
    "ConfigError": "hkd.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from hkd.augment import PromptTransformSpec, TransformContext
    from hkd.errors import ConfigError, HkdError
    from hkd.generation import (GenerationBackend, GenerationBackendSpec, GenerationContext, SamplingParams,
                                build_generation_backend, get_generation_backend)
    from hkd.hookspecs import hookimpl, hookspec
    from hkd.kernels.registry import KernelBackend
    from hkd.sampling import Samples
    from hkd.stage import Stage, StageContext, StageSpec, StepState
    from hkd.taps import QKV
    from hkd.verify import Verdict, Verifier, VerifierSpec
    from hkd.view import ModelView, SparseTargets, TapRequest


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'hkd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
