"""Time forward+backward and peak extra memory of the distill-loss backends against eager torch.

    python bench/kernel_speed.py                       # CPU: a small grid; CUDA: N {1k,4k,16k} x V {32k,128k,256k}
    python bench/kernel_speed.py --grid 4096x128256    # explicit N x V list, comma separated
    python bench/kernel_speed.py --backends eager,chunked --dtype float32
    python bench/kernel_speed.py --op fused_linear     # CPU: N x H x V 1024x1024x{32000,128256}; CUDA: 8192x4096x128256
    python bench/kernel_speed.py --op fused_linear --grid 8192x4096x128256   # explicit N x H x V list
    bench/gpu_check.sh OUTDIR                     # the prepared GPU run: tests + both headline shapes

Every (backend, shape) runs in a fresh subprocess, one at a time, so peaks do not mix:

* memory: on CUDA ``max_memory_allocated`` minus what is allocated once the inputs exist; on CPU
  peak RSS (``ru_maxrss``) minus RSS after the inputs are allocated and touched. Both include
  the student gradient, so this is "what the loss adds on top of the two logit tensors".
* time: median of ``--reps`` forward+backward calls after one warm-up (synchronised on CUDA);
  ``cpu_s`` is the median CPU time of the same calls (all threads), steadier than wall-clock
  time when other jobs share the machine.

The table gives time and memory relative to eager and, when Liger ran, time relative to Liger's
(``x liger`` < 1 is faster). The JSON file is rewritten after every row, so a run stopped by a
time limit keeps what it measured.

``--op distill_loss`` (default): ``eager`` is ``log_softmax`` + ``kl_div`` (forward KL at T=2,
mean over rows, T^2 scaled); ``liger`` is Liger-Kernel's ``LigerJSD(beta=0)`` (forward KL on
log-probs, so it also pays for the two ``log_softmax`` calls) when liger-kernel imports and runs
here. The hkd backends compute the same loss through :func:`hkd.kernels.distill_loss`. A table
with ratios vs eager goes to stdout and JSON (device, date, command, op, rows) to
``bench/results/kernels/kernels-{cpu,cuda}-<time>.json``.

``--op fused_linear``: the loss of the LM-head logits from hidden states ``[N, H]`` and LM-head
weights ``[V, H]`` (student and teacher, same H; weights scaled by 1/sqrt(H) so the logits are
O(1)). ``eager`` is ``h_s @ W_s.T`` and ``h_t @ W_t.T`` (teacher under ``no_grad``), then the
eager loss above; ``liger`` is Liger-Kernel's ``LigerFusedLinearJSD(jsd_beta=0, temperature=2)``
times T^2 (its default ``accum_dtype``); the hkd backends call
:func:`hkd.kernels.fused_linear_distill_loss`. Gradients go to ``h_s`` and ``W_s``; memory is
what the loss adds on top of the four inputs, gradients included. Before timing a shape, one
subprocess computes every backend's loss on its first ``min(N, 256)`` rows of fresh inputs and a
backend more than 1e-3 (relative) away from eager's is not timed (an error row says why); the
timed rows also carry the full-size loss and the table shows its relative difference to
eager's. JSON goes to ``bench/results/kernels/kernels-fused-linear-{cpu,cuda}-<time>.json``.
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
# N x H x V. GPU: Llama-3-8B-sized LM head at 8k tokens (Liger-Kernel publishes ~183 ms on H100 for
# LigerFusedLinearJSD there). CPU: a 2048-row V=128256 shape takes over a minute per call on 2 cores.
FUSED_GPU_GRID = [(8192, 4096, 128256)]
FUSED_CPU_GRID = [(1024, 1024, 32000), (1024, 1024, 128256)]
TEMPERATURE = 2.0
CHECK_ROWS = 256  # rows of the pre-timing loss check (fused_linear)
LOSS_RTOL = 1e-3
OPS = {"distill_loss": ("N", "V"), "fused_linear": ("N", "H", "V")}  # op -> shape keys


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system): on a shared machine whose other jobs
    stretch the wall-clock time, this moves much less (``cpu_s`` in the rows)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def loss_fn(backend: str) -> Any:
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


def fused_loss_fn(backend: str) -> Any:
    """``fn(h_s, W_s, h_t, W_t) -> scalar`` forward KL(P_t || P_s) at T, mean over rows, T^2 scaled."""
    import torch
    import torch.nn.functional as F

    if backend == "eager":
        def eager(hs: Any, ws: Any, ht: Any, wt: Any) -> Any:
            with torch.no_grad():
                log_pt = F.log_softmax((ht @ wt.T).float() / TEMPERATURE, -1)
            log_ps = F.log_softmax((hs @ ws.T).float() / TEMPERATURE, -1)
            return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * TEMPERATURE**2
        return eager
    if backend == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD

        # jsd_beta=0: forward KL(P_t || P_s) of the tempered distributions, mean over rows, not T^2 scaled
        jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=TEMPERATURE)
        return lambda hs, ws, ht, wt: jsd(hs, ws, ht, wt, None) * TEMPERATURE**2
    from hkd.kernels import fused_linear_distill_loss

    return lambda hs, ws, ht, wt: fused_linear_distill_loss(hs, ws, ht, wt, temperature=TEMPERATURE, backend=backend)


def fused_inputs(n: int, hidden: int, vocab: int, dtype: Any, device: str) -> tuple[Any, Any, Any, Any]:
    """Student/teacher hidden states ``[n, hidden]`` and LM heads ``[vocab, hidden]`` (scaled in place,
    so no transient copy raises the CPU peak before the baseline is taken)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    hs = torch.randn(n, hidden, device=device, dtype=dtype, generator=gen).requires_grad_()
    ws = torch.randn(vocab, hidden, device=device, dtype=dtype, generator=gen).mul_(hidden**-0.5).requires_grad_()
    ht = torch.randn(n, hidden, device=device, dtype=dtype, generator=gen)
    wt = torch.randn(vocab, hidden, device=device, dtype=dtype, generator=gen).mul_(hidden**-0.5)
    return hs, ws, ht, wt


def measure(loss: Any, grads: list[Any], reps: int) -> dict[str, Any]:
    """Time ``loss().backward()`` (median of ``reps`` after a warm-up) and its peak extra memory.

    ``grads``: the tensors whose ``.grad`` is reset before each call. Memory is the peak minus
    what is in use when called (the inputs exist): on CUDA allocated bytes, on CPU RSS.
    """
    import torch

    cuda = torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    sync()
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times, first = [], [], float("nan")
    for i in range(reps + 1):  # the first call is a warm-up
        for t in grads:
            t.grad = None
        sync()
        start, cpu_start = time.perf_counter(), cpu_seconds()
        out = loss()
        out.backward()
        sync()
        if i:
            times.append(time.perf_counter() - start)
            cpu_times.append(cpu_seconds() - cpu_start)
        else:
            first = out.item()
        del out
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"time_s": statistics.median(times), "cpu_s": statistics.median(cpu_times), "extra_bytes": peak - base,
            "loss": first}


def worker(backend: str, n: int, vocab: int, dtype_name: str, reps: int) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fn = loss_fn(backend)
    gen = torch.Generator(device=device).manual_seed(0)
    student = torch.randn(n, vocab, device=device, dtype=getattr(torch, dtype_name), generator=gen).requires_grad_()
    teacher = torch.randn(n, vocab, device=device, dtype=getattr(torch, dtype_name), generator=gen)
    result = measure(lambda: fn(student, teacher), [student], reps)
    del result["loss"]  # this op's rows never carried it
    return {"backend": backend, "N": n, "V": vocab, "dtype": dtype_name, **result,
            "input_bytes": 2 * student.numel() * student.element_size()}


def fused_worker(backend: str, n: int, hidden: int, vocab: int, dtype_name: str, reps: int) -> dict[str, Any]:
    """One fused-linear measurement in this (fresh) process; ``loss`` is the warm-up call's value."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fn = fused_loss_fn(backend)
    hs, ws, ht, wt = fused_inputs(n, hidden, vocab, getattr(torch, dtype_name), device)
    result = measure(lambda: fn(hs, ws, ht, wt), [hs, ws], reps)
    return {"backend": backend, "N": n, "H": hidden, "V": vocab, "dtype": dtype_name, **result,
            "input_bytes": sum(t.numel() * t.element_size() for t in (hs, ws, ht, wt))}


def fused_check(backends: list[str], n: int, hidden: int, vocab: int, dtype_name: str) -> dict[str, dict[str, Any]]:
    """Each backend's loss on the same small inputs (forward only): ``{backend: {"loss": x} | {"error": why}}``."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hs, ws, ht, wt = fused_inputs(n, hidden, vocab, getattr(torch, dtype_name), device)
    out: dict[str, dict[str, Any]] = {}
    for backend in backends:
        try:
            out[backend] = {"loss": fused_loss_fn(backend)(hs, ws, ht, wt).item()}
        except Exception as e:  # noqa: BLE001 - recorded as that backend's row
            out[backend] = {"error": (f"{type(e).__name__}: {e}".strip().splitlines() or [type(e).__name__])[0][:200]}
    return out


def shape_row(op: str, shape: tuple[int, ...]) -> dict[str, int]:
    return dict(zip(OPS[op], shape))


def run_one(backend: str, shape: tuple[int, ...], dtype: str, reps: int, op: str = "distill_loss") -> dict[str, Any]:
    flag = "--worker" if op == "distill_loss" else "--fused-worker"
    cmd = [sys.executable, __file__, flag, backend, *map(str, shape), dtype, str(reps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"backend": backend, **shape_row(op, shape), "dtype": dtype, "error": reason[:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_one(backends: list[str], shape: tuple[int, ...], dtype: str) -> dict[str, dict[str, Any]]:
    """Run :func:`fused_check` in a subprocess on the first ``CHECK_ROWS`` rows of ``shape``; a crash
    of the whole check (e.g. out of memory) is reported for every backend."""
    n, hidden, vocab = shape
    cmd = [sys.executable, __file__, "--fused-check", ",".join(backends), str(min(n, CHECK_ROWS)), str(hidden),
           str(vocab), dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {b: {"error": f"loss check crashed: {reason}"[:200]} for b in backends}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_fused_shape(backends: list[str], shape: tuple[int, ...], dtype: str, reps: int,
                    on_row: Any = None) -> list[dict[str, Any]]:
    """Check every backend's loss against eager's at small size, then time those that agree
    (``on_row()`` is called after each row is appended)."""
    checks = check_one(backends, shape, dtype)
    ref = checks.get("eager", {}).get("loss")
    rows = []
    for backend in backends:
        check = checks[backend]
        if "error" in check:  # it cannot run here (or crashed): the timed run would fail the same way
            row = {"backend": backend, **shape_row("fused_linear", shape), "dtype": dtype, "error": check["error"]}
        elif ref is not None and abs(check["loss"] - ref) > LOSS_RTOL * abs(ref):
            row = {"backend": backend, **shape_row("fused_linear", shape), "dtype": dtype,
                   "error": f"loss check failed at N={min(shape[0], CHECK_ROWS)}: {check['loss']:.6g} vs eager "
                            f"{ref:.6g} (rel {abs(check['loss'] - ref) / abs(ref):.1e} > {LOSS_RTOL:g}); not timed"}
        else:
            row = run_one(backend, shape, dtype, reps, op="fused_linear")
            row["loss_checked"] = ref is not None  # False: eager could not run, nothing to compare with
        rows.append(row)
        print(json.dumps(row), flush=True)
        if on_row is not None:
            on_row()
    return rows


WIDTHS = {"N": 6, "H": 5, "V": 7}


def table(rows: list[dict[str, Any]], keys: tuple[str, ...] = ("N", "V")) -> str:
    """Ratios vs eager per shape; with ``H`` in ``keys`` (fused_linear) also the loss's relative
    difference to eager's at full size."""
    def shape(r: dict[str, Any]) -> str:
        return " ".join(f"{r[k]:>{WIDTHS[k]}}" for k in keys)

    with_loss = "H" in keys
    eager = {tuple(r[k] for k in keys): r for r in rows if r["backend"] == "eager" and "error" not in r}
    liger = {tuple(r[k] for k in keys): r for r in rows if r["backend"] == "liger" and "error" not in r}
    lines = [f"{shape({k: k for k in keys})} {'backend':>8} {'time s':>8} {'x eager':>8} {'extra GiB':>10} "
             f"{'x eager':>8}" + (f" {'loss rel diff':>13}" if with_loss else "")
             + (f" {'x liger':>8}" if liger else "")]
    for r in rows:
        if "error" in r:
            lines.append(f"{shape(r)} {r['backend']:>8}  unavailable: {r['error']}")
            continue
        e = eager.get(tuple(r[k] for k in keys))
        t_ratio = f"{r['time_s'] / e['time_s']:.2f}" if e else "-"
        m_ratio = f"{r['extra_bytes'] / e['extra_bytes']:.3f}" if e and e["extra_bytes"] > 0 else "-"
        line = (f"{shape(r)} {r['backend']:>8} {r['time_s']:>8.3f} {t_ratio:>8} "
                f"{r['extra_bytes'] / 2**30:>10.3f} {m_ratio:>8}")
        if with_loss:
            diff = f"{abs(r['loss'] - e['loss']) / abs(e['loss']):.1e}" if e and e.get("loss") else "-"
            line += f" {diff:>13}"
        if liger:  # time relative to Liger's on the same shape (< 1: faster than Liger)
            lg = liger.get(tuple(r[k] for k in keys))
            line += f" {r['time_s'] / lg['time_s']:>8.2f}" if lg else f" {'-':>8}"
        lines.append(line)
    return "\n".join(lines)


def parse_grid(text: str, op: str) -> list[tuple[int, ...]]:
    keys = OPS[op]
    grid = [tuple(int(x) for x in s.split("x")) for s in text.split(",")]
    for shape in grid:
        if len(shape) != len(keys):
            raise ValueError(f"--op {op} takes {'x'.join(keys)} shapes, got {'x'.join(map(str, shape))}")
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=list(OPS), default="distill_loss",
                        help="distill_loss (logits in) or fused_linear (hidden states + LM heads in)")
    parser.add_argument("--grid", help="comma-separated NxV shapes, NxHxV for --op fused_linear "
                                       "(default: GPU or CPU grid)")
    parser.add_argument("--backends", default="eager,liger,torch,chunked,triton")
    parser.add_argument("--dtype", help="float32 | bfloat16 (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels"), help="folder")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--fused-worker", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--fused-check", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        backend, n, vocab, dtype, reps = args.worker
        print(json.dumps(worker(backend, int(n), int(vocab), dtype, int(reps))))
        return
    if args.fused_worker:
        backend, n, hidden, vocab, dtype, reps = args.fused_worker
        print(json.dumps(fused_worker(backend, int(n), int(hidden), int(vocab), dtype, int(reps))))
        return
    if args.fused_check:
        backends, n, hidden, vocab, dtype = args.fused_check
        print(json.dumps(fused_check(backends.split(","), int(n), int(hidden), int(vocab), dtype)))
        return

    import torch

    cuda = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    fused = args.op == "fused_linear"
    try:
        grid = (parse_grid(args.grid, args.op) if args.grid
                else (FUSED_GPU_GRID if cuda else FUSED_CPU_GRID) if fused else GPU_GRID if cuda else CPU_GRID)
    except ValueError as e:
        parser.error(str(e))
    backends = args.backends.split(",")
    device = torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    now = dt.datetime.now(dt.timezone.utc)
    name = f"kernels-{'fused-linear-' if fused else ''}{'cuda' if cuda else 'cpu'}-{now:%Y%m%d-%H%M%S}.json"
    out = Path(args.out) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from provenance import header

    provenance = header("kernel_speed.py", None, f"cuda: {device}" if cuda else None)

    def save() -> None:  # after every row: a run cut short by a time limit keeps what it measured
        out.write_text(json.dumps({**provenance, "date": now.isoformat(timespec="seconds"),
                                   "torch": torch.__version__, "op": args.op, "dtype": dtype, "rows": rows}, indent=1))

    for shape in grid:
        if fused:
            rows.extend(run_fused_shape(backends, shape, dtype, args.reps, on_row=save))
            continue
        for backend in backends:
            rows.append(run_one(backend, shape, dtype, args.reps))
            print(json.dumps(rows[-1]), flush=True)
            save()
    save()
    what = f"fused LM head + forward KL at T={TEMPERATURE:g}, " if fused else ""
    print(f"\n{device}, {dtype}, {what}forward+backward, median of {args.reps}\n{table(rows, OPS[args.op])}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
