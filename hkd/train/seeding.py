"""Seeds, in one place: the run's global seed and seeds derived from it for sub-tasks."""

from __future__ import annotations

import hashlib
import random

import torch


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (CPU and every CUDA device)."""
    random.seed(seed)
    torch.manual_seed(seed)


def derive_seed(base: int, key: str) -> int:
    """A 63-bit seed that depends only on the base seed and ``key`` (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(f"{base}:{key}".encode()).digest()[:8], "big") >> 1
