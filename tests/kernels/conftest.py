"""Kernel test fixtures. ``TRITON_INTERPRET`` is set by the root conftest (before triton is
imported) when there is no GPU, so the Triton backends run on the CPU through the interpreter.
"""

from __future__ import annotations

import pytest

from hkd.kernels import registry


@pytest.fixture
def clean_registry():
    """Backends a test registers are removed afterwards."""
    saved = {op: dict(table) for op, table in registry._BACKENDS.items()}
    yield registry
    registry._BACKENDS.clear()
    registry._BACKENDS.update(saved)
