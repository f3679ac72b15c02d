"""An fp64 reference written independently of hkd.kernels (plain log_softmax math, autograd),
and what the kernel tests run on."""

from __future__ import annotations

import torch
from torch import Tensor

BACKENDS = ["torch", "chunked", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum p (log p - log q) per row, 0 log 0 = 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def rows64(s: Tensor, t: Tensor, labels: Tensor | None = None, *, divergence: str = "forward_kl", beta: float = 0.5,
           temperature: float = 1.0, scale_t2: bool = True, alpha: float = 0.0, ignore_index: int = -100) -> Tensor:
    """Per-row loss of [N, V] logits in fp64 (s must be an fp64 leaf or a function of one)."""
    log_ps = torch.log_softmax(s.double() / temperature, -1)
    log_pt = torch.log_softmax(t.double() / temperature, -1)
    if divergence == "jsd" and beta == 0:
        divergence = "forward_kl"
    if divergence == "jsd" and beta == 1:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        soft = kl(log_pt, log_ps)
    elif divergence == "reverse_kl":
        soft = kl(log_ps, log_pt)
    else:
        log_m = (beta * log_pt.exp() + (1 - beta) * log_ps.exp()).log()
        soft = beta * kl(log_pt, log_m) + (1 - beta) * kl(log_ps, log_m)
    loss = (1 - alpha) * soft * (temperature**2 if scale_t2 else 1.0)
    if alpha > 0:
        ce = torch.nn.functional.cross_entropy(s.double(), labels.clamp_min(0), reduction="none")
        loss = loss + alpha * ce
    if labels is not None:
        loss = loss * (labels != ignore_index)
    return loss


def reduce64(rows: Tensor, labels: Tensor | None, reduction: str, ignore_index: int = -100) -> Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    count = rows.numel() if labels is None else int((labels != ignore_index).sum())
    return rows.sum() / max(count, 1)
