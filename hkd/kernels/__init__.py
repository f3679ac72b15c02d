"""Distillation loss kernels with swappable backends: see :mod:`hkd.kernels.ops`.

One file per op (reference, Triton kernel, launcher, ``autograd.Function``); the registry picks
a backend per op. The lowest layer: imports torch, Triton and :mod:`hkd.errors`, nothing else of hkd.
"""

from hkd.kernels.ops import (  # noqa: F401
    OPS,
    KernelBackend,
    backends,
    check_request,
    distill_loss,
    fused_linear_distill_loss,
    get_backend,
    register_backend,
    sparse_distill_loss,
)

__all__ = ["OPS", "KernelBackend", "backends", "check_request", "distill_loss", "fused_linear_distill_loss",
           "get_backend", "register_backend", "sparse_distill_loss"]
