"""Data-parallel training over ``torch.distributed`` (launched by torchrun or accelerate).

Each rank works on its own share of the micro-batches; losses are normalised by the
*global* token count and multiplied by the world size, and gradients are *averaged* over
ranks, so N ranks x A micro-batches equal one process with N*A micro-batches.

* ``ddp``: every rank holds whole models; after backward one all-reduce over a flat buffer
  averages the gradients (what DDP does, minus the compute/communication overlap: hkd's
  forward goes through the model body and taps, which DDP's wrapper would not see).
* ``fsdp``: teacher and student are sharded with FSDP2 ``fully_shard`` (each transformer
  block, the body, the LM head), so a teacher larger than one device fits; FSDP averages
  their gradients itself and only the stages' own parameters go through the all-reduce.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

try:  # private, but the only way to keep output_hidden_states working on FSDP-wrapped classes
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY as _registry

    _CAN_RECORD_REGISTRY: Any = _registry
except ImportError:  # pragma: no cover - older/newer transformers
    _CAN_RECORD_REGISTRY = None


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # the process group the ranks train in: None is the whole torchrun world; with the teacher on
    # its own ranks (hkd.train.placement), the student ranks' group, numbered 0..world_size-1
    group: Any = None

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
    dist.all_reduce(buffer, group=info.group)
    return buffer.tolist()


def union_names(names: Iterable[str], info: DistInfo) -> list[str]:
    """The sorted union of every rank's ``names``, the same list on every rank: a vector keyed by it
    lines up across ranks even when a rank reported a metric the others did not."""
    mine = sorted(set(names))
    if not info.enabled:
        return mine
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, mine, group=info.group)
    return sorted(set().union(*gathered))


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def shard_model(model: Any, reshard_after_forward: bool) -> None:
    """FSDP2: shard every transformer block, then the body, then the LM head (if any).

    hkd calls the body and the LM head separately, so each is its own FSDP unit. The student
    keeps its gathered parameters from forward to backward (``reshard_after_forward=False``,
    ZeRO-2-like) because stages take tensors from *inside* blocks (q/k/v taps) whose backward
    bypasses FSDP's hooks on block outputs; the frozen teacher never runs backward and is
    resharded right after each block, which is what lets it exceed one device.
    """
    from hkd.models.loading import decoder_body

    body = decoder_body(model)
    blocks = next(
        (m for m in body.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == model.config.num_hidden_layers),
        None,
    )
    for block in blocks if blocks is not None else []:
        fully_shard(block, reshard_after_forward=reshard_after_forward)
    recordable = _CAN_RECORD_REGISTRY.get(body) if _CAN_RECORD_REGISTRY is not None else None
    fully_shard(body, reshard_after_forward=reshard_after_forward)
    if recordable:
        # transformers finds what output_hidden_states records by the model's class name, and
        # fully_shard swaps the class for an FSDP subclass: register the same recipe for it
        _CAN_RECORD_REGISTRY[body] = recordable
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None:
        fully_shard(lm_head, reshard_after_forward=reshard_after_forward)


def tied_output_head(model: Any) -> torch.nn.Module | None:
    """The output head whose weight is the input embeddings' (``tie_word_embeddings``), or ``None``."""
    get_out, get_in = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    head = get_out() if callable(get_out) else None
    embeddings = get_in() if callable(get_in) else None
    if head is None or embeddings is None:
        return None
    return head if getattr(head, "weight", None) is getattr(embeddings, "weight", False) else None


def fsdp_refusal(student: Any) -> str | None:
    """Why ``train.parallel: fsdp`` cannot train ``student``, or ``None``.

    A student whose output head shares its weight with the input embeddings (``tie_word_embeddings``:
    small Llama/Qwen/Gemma checkpoints, BERT's masked-LM decoder) cannot: :func:`shard_model` shards the
    body (which holds the embeddings) and the head as separate units, and sharding replaces the body's
    parameter, so the head would silently train its own copy. (A frozen teacher's copy never changes,
    so tied teachers are fine.)"""
    head = tied_output_head(student)
    if head is None:
        return None
    return (f"train.parallel: fsdp: the student ({type(student).__name__}) ties its output head's weight to its "
            "input embeddings (tie_word_embeddings), which hkd's FSDP units (the body and the head sharded "
            "apart) would untie; use train.parallel: ddp, or a student with tie_word_embeddings: false")


def sync_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Average gradients over ranks, except FSDP-sharded ones (FSDP already reduced those).

    Ranks first agree on which parameters have a gradient: one whose backward was skipped (its
    total had no gradient) joins with zeros where another rank has one. Parameters without a
    gradient anywhere (stages inactive this phase) stay without one on every rank alike, so
    AdamW skips them exactly as it would in a single process.
    """
    if not info.enabled:
        return
    plain = [p for p in params if not is_sharded(p)]
    has_grad = torch.tensor([p.grad is not None for p in plain], dtype=torch.int32, device=_device_of(plain))
    dist.all_reduce(has_grad, group=info.group)
    with_grad = [p for p, anywhere in zip(plain, has_grad.tolist()) if anywhere]
    if not with_grad:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in with_grad])
    dist.all_reduce(flat, group=info.group)
    flat /= info.world_size
    offset = 0
    for p in with_grad:
        n = p.numel()
        p.grad = flat[offset: offset + n].view_as(p).clone()
        offset += n


def _device_of(params: list[torch.nn.Parameter]) -> torch.device:
    return params[0].device if params else torch.device("cpu")


def all_reduce_tensor(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a device tensor over ranks without reading it on the host (identity in one process)."""
    if info.enabled:
        dist.all_reduce(values, group=info.group)
    return values


def shutdown_distributed() -> None:
    """Leave the process group explicitly: gloo can abort the process when torn down at exit.

    No barrier: after a failure on one rank the others must not wait for it.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier(group=info.group)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global-norm clipping over plain and FSDP-sharded gradients together; returns the norm.

    No host read: a non-finite norm scales the gradients to NaN, and the loop, which reads the
    norm once per step, then skips the optimizer step.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=_device_of(params))
    norms = [torch.linalg.vector_norm(g) for g in grads]
    squares = [(n.full_tensor() if is_sharded(n) else n).float().pow(2) for n in norms]
    total = torch.stack(squares).sum().sqrt()
    if max_norm > 0:
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        with torch.no_grad():  # a sharded gradient is scaled through its local shard: the scale never leaves the device
            local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
            for g in local:
                g.mul_(scale.to(g.device))
    return total
