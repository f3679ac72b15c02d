"""Host-to-device copies that do not make the host wait.

Everything the training step builds on the host (batches, re-tokenised rows, cached teacher
targets) reaches the device through :func:`to_device`: on CUDA the host tensor is pinned and
copied ``non_blocking``, so the copy is queued behind the kernels already running instead of
stalling the host until the device catches up. Elsewhere it is a plain ``.to(device)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """``tensor`` on ``device``; a CPU tensor bound for CUDA goes through pinned memory, asynchronously.

    Safe to drop the host tensor right after the call: pinned blocks come from torch's caching
    host allocator, which keeps them until the copy queued on the current stream has finished.
    """
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=True)
    return tensor.to(device)


def batch_to_device(batch: dict[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    """Every tensor of a micro-batch through :func:`to_device`."""
    return {key: to_device(value, device) for key, value in batch.items()}


def full_parameter(tensor: Tensor | None) -> Tensor | None:
    """The whole of a parameter FSDP2 keeps sharded (a ``DTensor``), for code that uses a module's weight
    without calling the module (the fused LM head reads ``lm_head.weight``); a plain tensor as it is.

    The gather is differentiable: the gradient that reaches the whole weight is averaged over the ranks
    and scattered back to each rank's shard, as FSDP reduces the gradients of its own forwards (the loop
    multiplies every loss by the world size to undo that average). Memory: one whole weight while it is
    in use, which is what FSDP's own unshard of the module would hold. A collective: every rank must
    make the same calls.
    """
    from torch.distributed.tensor import DTensor, Partial

    if isinstance(tensor, DTensor):
        return tensor.full_tensor(grad_placements=[Partial("avg")] * tensor.device_mesh.ndim)
    return tensor
