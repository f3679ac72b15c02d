"""Forward+backward time of each divergence of ``hkd.kernels.distill_loss``, per backend.

    python bench/divergences.py                          # CPU: 512 x 32000 fp32, torch + chunked, seeds 0-2
    python bench/divergences.py --shape 4096x128256 --backends chunked,triton --dtype bfloat16   # a GPU

For each seed (fresh random logits, scale 2, T=2, 20% ignored rows, alpha=0.1) and backend, every
divergence is timed back to back: one warm-up call, then the median of ``--reps`` forward+backward
calls, as wall time and as this process's CPU time (steadier on a shared machine). The summary
gives mean +- std over seeds and each divergence's time relative to ``forward_kl`` on the same
backend and seed. JSON goes to ``bench/results/divergences/divergences-{cpu,cuda}-<time>.json``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hkd.kernels import distill_loss  # noqa: E402

DIVERGENCES = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.5}),
               ("skew_forward_kl", {"skew": 0.1}), ("skew_reverse_kl", {"skew": 0.1})]


def time_call(fn: Any, reps: int, device: str) -> tuple[float, float]:
    """Median wall and CPU seconds of ``reps`` calls after one warm-up."""
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    walls, cpus = [], []
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        fn()
        sync()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="512x32000", help="N x V")
    parser.add_argument("--backends", default=None, help="comma separated (default: torch,chunked on CPU, "
                                                        "chunked,triton on CUDA)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "divergences"), help="folder")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        n, vocab = (int(x) for x in args.shape.lower().split("x"))
    except ValueError:
        parser.error(f"--shape must be NxV (two integers), got {args.shape!r}")
    backends = (args.backends or ("chunked,triton" if device == "cuda" else "torch,chunked")).split(",")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    rows = []
    for seed in range(args.seeds):
        gen = torch.Generator().manual_seed(seed)
        s = (torch.randn(n, vocab, generator=gen) * 2).to(dtype).to(device)
        t = (torch.randn(n, vocab, generator=gen) * 2).to(dtype).to(device)
        labels = torch.randint(0, vocab, (n,), generator=gen)
        labels[torch.rand(n, generator=gen) < 0.2] = -100
        labels = labels.to(device)
        for backend in backends:
            for divergence, extra in DIVERGENCES:
                x = s.clone().requires_grad_()

                def step() -> None:
                    x.grad = None
                    distill_loss(x, t, labels=labels, divergence=divergence, temperature=2.0, alpha=0.1,
                                 backend=backend, **extra).backward()

                wall, cpu = time_call(step, args.reps, device)
                rows.append({"seed": seed, "backend": backend, "divergence": divergence, **extra,
                             "wall_s": wall, "cpu_s": cpu})
                print(f"seed {seed} {backend:8s} {divergence:16s} wall {wall:.3f}s cpu {cpu:.3f}s", flush=True)
    summary = []
    for backend in backends:
        for divergence, _ in DIVERGENCES:
            mine = [r for r in rows if r["backend"] == backend and r["divergence"] == divergence]
            base = {r["seed"]: r for r in rows if r["backend"] == backend and r["divergence"] == "forward_kl"}
            entry: dict[str, Any] = {"backend": backend, "divergence": divergence}
            for key in ("wall_s", "cpu_s"):
                values = [r[key] for r in mine]
                ratios = [r[key] / base[r["seed"]][key] for r in mine]
                entry[key] = [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0]
                entry[f"{key}_vs_forward_kl"] = [statistics.mean(ratios),
                                                 statistics.stdev(ratios) if len(ratios) > 1 else 0.0]
            summary.append(entry)
            print(f"{backend:8s} {divergence:16s} cpu {entry['cpu_s'][0]:.3f} +- {entry['cpu_s'][1]:.3f} s  "
                  f"x forward_kl {entry['cpu_s_vs_forward_kl'][0]:.2f} +- {entry['cpu_s_vs_forward_kl'][1]:.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = out / f"divergences-{device}-{stamp}.json"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from provenance import header

    path.write_text(json.dumps({
        **header("divergences.py", None), "device_kind": device,
        "machine": (torch.cuda.get_device_name() if device == "cuda"
                    else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"),
        "shape": [n, vocab], "dtype": str(dtype), "temperature": 2.0, "alpha": 0.1, "rows": rows, "summary": summary,
    }, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
