"""Time forward+backward and peak extra memory of the distill-loss backends against eager torch.

    python bench/kernels.py                       # CPU: a small grid; CUDA: N {1k,4k,16k} x V {32k,128k,256k}
    python bench/kernels.py --grid 4096x128256    # explicit N x V list, comma separated
    python bench/kernels.py --backends eager,chunked --dtype float32

Every (backend, shape) runs in a fresh subprocess, one at a time, so peaks do not mix:

* memory: on CUDA ``max_memory_allocated`` minus what is allocated once the inputs exist; on CPU
  peak RSS (``ru_maxrss``) minus RSS after the inputs are allocated and touched. Both include
  the student gradient, so this is "what the loss adds on top of the two logit tensors".
* time: median of ``--reps`` forward+backward calls after one warm-up (synchronised on CUDA).

``eager`` is ``log_softmax`` + ``kl_div`` (forward KL at T=2, mean over rows, T^2 scaled);
``liger`` is Liger-Kernel's ``LigerJSD(beta=0)`` (forward KL on log-probs, so it also pays for
the two ``log_softmax`` calls) when liger-kernel imports and runs here. The hkd backends compute
the same loss through :func:`hkd.kernels.distill_loss`. A table with ratios vs eager goes to
stdout and JSON (device, date, command, rows) to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GPU_GRID = [(n, v) for n in (1024, 4096, 16384) for v in (32000, 128256, 256000)]
CPU_GRID = [(1024, 32000), (4096, 128256)]
TEMPERATURE = 2.0


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def loss_fn(backend: str) -> Any:
    import torch
    import torch.nn.functional as F

    if backend == "eager":
        def eager(s: Any, t: Any) -> Any:
            log_ps = F.log_softmax(s.float() / TEMPERATURE, -1)
            log_pt = F.log_softmax(t.float() / TEMPERATURE, -1)
            return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * TEMPERATURE**2
        return eager
    if backend == "liger":
        from liger_kernel.transformers import LigerJSD

        jsd = LigerJSD(beta=0.0)  # beta=0: forward KL(P_t || P_s)
        return lambda s, t: jsd(F.log_softmax(s.float() / TEMPERATURE, -1),
                                F.log_softmax(t.float() / TEMPERATURE, -1)) * TEMPERATURE**2
    from hkd.kernels import distill_loss

    return lambda s, t: distill_loss(s, t, temperature=TEMPERATURE, backend=backend)


def worker(backend: str, n: int, vocab: int, dtype_name: str, reps: int) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, dtype_name)
    fn = loss_fn(backend)
    gen = torch.Generator(device=device).manual_seed(0)
    student = torch.randn(n, vocab, device=device, dtype=dtype, generator=gen).requires_grad_()
    teacher = torch.randn(n, vocab, device=device, dtype=dtype, generator=gen)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    sync()
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(reps + 1):  # the first call is a warm-up
        student.grad = None
        sync()
        start = time.perf_counter()
        fn(student, teacher).backward()
        sync()
        if i:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"backend": backend, "N": n, "V": vocab, "dtype": dtype_name, "time_s": statistics.median(times),
            "extra_bytes": peak - base, "input_bytes": 2 * student.numel() * student.element_size()}


def run_one(backend: str, n: int, vocab: int, dtype: str, reps: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", backend, str(n), str(vocab), dtype, str(reps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"backend": backend, "N": n, "V": vocab, "dtype": dtype, "error": reason[:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]]) -> str:
    eager = {(r["N"], r["V"]): r for r in rows if r["backend"] == "eager" and "error" not in r}
    lines = [f"{'N':>6} {'V':>7} {'backend':>8} {'time s':>8} {'x eager':>8} {'extra GiB':>10} {'x eager':>8}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['N']:>6} {r['V']:>7} {r['backend']:>8}  unavailable: {r['error']}")
            continue
        e = eager.get((r["N"], r["V"]))
        t_ratio = f"{r['time_s'] / e['time_s']:.2f}" if e else "-"
        m_ratio = f"{r['extra_bytes'] / e['extra_bytes']:.3f}" if e and e["extra_bytes"] > 0 else "-"
        lines.append(f"{r['N']:>6} {r['V']:>7} {r['backend']:>8} {r['time_s']:>8.3f} {t_ratio:>8} "
                     f"{r['extra_bytes'] / 2**30:>10.3f} {m_ratio:>8}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", help="comma-separated NxV shapes (default: GPU or CPU grid)")
    parser.add_argument("--backends", default="eager,liger,torch,chunked,triton")
    parser.add_argument("--dtype", help="float32 | bfloat16 (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        backend, n, vocab, dtype, reps = args.worker
        print(json.dumps(worker(backend, int(n), int(vocab), dtype, int(reps))))
        return

    import torch

    cuda = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    grid = ([tuple(int(x) for x in s.split("x")) for s in args.grid.split(",")] if args.grid
            else GPU_GRID if cuda else CPU_GRID)
    rows = []
    for n, vocab in grid:
        for backend in args.backends.split(","):
            rows.append(run_one(backend, n, vocab, dtype, args.reps))
            print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    now = dt.datetime.now(dt.timezone.utc)
    print(f"\n{device}, {dtype}, forward+backward, median of {args.reps}\n{table(rows)}")
    out = Path(args.out) / f"kernels-{'cuda' if cuda else 'cpu'}-{now:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "date": now.isoformat(), "command": " ".join(sys.argv),
                               "torch": torch.__version__, "dtype": dtype, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
