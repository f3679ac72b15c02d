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


def sparse_rows64(s: Tensor, ids: Tensor, values: Tensor, lse: Tensor | None = None, labels: Tensor | None = None, *,
                  temperature: float = 1.0, tail: str = "renormalize", alpha: float = 0.0, scale_t2: bool = True,
                  ignore_index: int = -100) -> Tensor:
    """Per-row loss against top-k targets in fp64, written with probabilities (not hkd's log-space
    formulas): the bucket tail is m * (r / m) ** (1 / T) with r = 1 - sum exp(v - lse), m = V - k."""
    vocab, k = s.shape[-1], ids.shape[-1]
    log_ps = torch.log_softmax(s.double() / temperature, -1)
    v = values.double()
    if tail == "renormalize":
        w = torch.softmax(v / temperature, -1)
    else:
        q1 = (v - lse.double()[:, None]).exp()
        r = (1 - q1.sum(-1)).clamp_min(0)
        m = vocab - k
        w = torch.cat([q1 ** (1 / temperature), (m * (r / m) ** (1 / temperature))[:, None]], -1)
        w = w / w.sum(-1, keepdim=True)
    q = w[:, :k]
    soft = torch.where(q > 0, q * (q.log() - log_ps.gather(-1, ids)), torch.zeros_like(q)).sum(-1)
    if tail == "bucket":
        outside = torch.ones_like(log_ps, dtype=torch.bool).scatter(-1, ids, False)
        p_tail = (log_ps.exp() * outside).sum(-1)
        qt = w[:, k]
        soft = soft + torch.where(qt > 0, qt * (qt.log() - p_tail.log()), torch.zeros_like(qt))
    loss = (1 - alpha) * soft * (temperature**2 if scale_t2 else 1.0)
    if alpha > 0:
        loss = loss + alpha * torch.nn.functional.cross_entropy(s.double(), labels.clamp_min(0), reduction="none")
    if labels is not None:
        loss = torch.where(labels != ignore_index, loss, torch.zeros_like(loss))
    return loss
