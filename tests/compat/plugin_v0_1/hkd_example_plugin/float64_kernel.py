"""A ``distill_loss`` backend as hkd 0.1's docs defined one: the reference in float64.

Its function has the 0.1 backend signature (docs/plugins.md, "Writing a kernel backend"):
``fn(student [N, V], teacher [N, V], labels [N] or None, *, ignore_index, divergence, beta,
temperature, scale_t2, alpha) -> [N]``. ``skew`` came later; this function does not take it.
"""

from __future__ import annotations

from hkd import KernelBackend, hookimpl
from hkd.kernels.reference import row_losses

CALLS: list[dict] = []  # the options of every call (for the compatibility test)


def float64_rows(student, teacher, labels, *, ignore_index, divergence, beta, temperature, scale_t2, alpha):
    """The reference computed in float64: slow, for checking another backend's precision."""
    CALLS.append(dict(ignore_index=ignore_index, divergence=divergence, beta=beta, temperature=temperature,
                      scale_t2=scale_t2, alpha=alpha))
    return row_losses(student.double(), teacher.double(), labels, ignore_index=ignore_index, divergence=divergence,
                      beta=beta, temperature=temperature, scale_t2=scale_t2, alpha=alpha).to(student.dtype)


@hookimpl
def hkd_add_kernel_backends() -> list[KernelBackend]:
    return [KernelBackend(
        op="distill_loss",
        name="float64_v0",
        fn=float64_rows,
        priority=50,                                # auto prefers higher: above the built-ins, so auto picks it
        is_available=lambda: (True, ""),            # (ok, reason shown by `hkd kernels` when not)
        supports=None,                              # auto's per-call check of the input tensors
    )]
