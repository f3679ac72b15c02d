"""Distillation loss kernels with swappable backends: see :mod:`hkd.kernels.ops`.

This folder installs as ``hkd.kernels``. Run from a checkout (``python -m ...`` puts the
repository root on ``sys.path``) it is also reachable as top-level ``kernels`` — the name of
the Hugging Face package that ``transformers`` probes for at import. In that case it stays
inert and looks absent (no ``__file__``), so ``transformers`` does not mistake it for theirs.
"""

if __name__ == "hkd.kernels":
    from hkd.kernels.ops import (  # noqa: F401
        OPS,
        KernelBackend,
        backends,
        distill_loss,
        fused_linear_distill_loss,
        get_backend,
        register_backend,
        sparse_distill_loss,
    )

    __all__ = ["OPS", "KernelBackend", "backends", "distill_loss", "fused_linear_distill_loss", "get_backend",
               "register_backend", "sparse_distill_loss"]
else:
    __file__ = None  # type: ignore[assignment]
