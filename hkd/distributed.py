"""Data-parallel training over ``torch.distributed`` (launched by torchrun or accelerate).

Each rank runs the whole teacher and student on its own share of the micro-batches. After
backward the gradients are summed across ranks with one all-reduce over a flat buffer
(what DDP does, minus the compute/communication overlap — hkd's forward goes through the
model body and taps, which DDP's wrapper would not see). Losses are normalised by the
*global* token count, so N ranks x A micro-batches equal one process with N*A micro-batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group torchrun/accelerate describe in the environment; no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    if not info.enabled:
        return values
    buffer = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(buffer)
    return buffer.tolist()


def sync_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Sum gradients over ranks (each rank's loss is already divided by the global token count).

    Parameters without a gradient (stages inactive this phase) are left without one on every
    rank alike, so AdamW skips them exactly as it would in a single process.
    """
    if not info.enabled:
        return
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in with_grad])  # type: ignore[union-attr]
    dist.all_reduce(flat)
    offset = 0
    for p in with_grad:
        n = p.numel()
        p.grad = flat[offset: offset + n].view_as(p).clone()
        offset += n


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
