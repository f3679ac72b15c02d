"""Kernel tests run the Triton backends on CPU through the interpreter when there is no GPU.

``TRITON_INTERPRET`` is read when a function is decorated with ``@triton.jit``, and
``triton.language``'s own reductions (``tl.sum``, ``tl.max``, ...) are ``@triton.jit``
functions decorated when triton is first imported. The root conftest imports transformers,
which imports triton before this file runs, so those functions are compiled-mode
``JITFunction`` objects the interpreter refuses to call ("Cannot call @triton.jit'd outside of
the scope of a kernel"). We set the variable and re-wrap them as interpreted functions; hkd's
own kernels are imported lazily, after this, so they are interpreted already.
"""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from hkd.kernels import registry


def _interpret_triton_language() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" not in sys.modules:
        return  # imported later, with the variable set
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for name, module in list(sys.modules.items()):
        if name.startswith("triton.language") and isinstance(module, types.ModuleType):
            for attr, value in list(vars(module).items()):
                if isinstance(value, JITFunction):
                    setattr(module, attr, InterpretedFunction(value.fn))


if not torch.cuda.is_available():
    _interpret_triton_language()


@pytest.fixture
def clean_registry():
    """Backends a test registers are removed afterwards."""
    saved = {op: dict(table) for op, table in registry._BACKENDS.items()}
    yield registry
    registry._BACKENDS.clear()
    registry._BACKENDS.update(saved)
