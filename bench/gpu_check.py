"""The parts of the GPU check; ``bench/gpu_check.sh`` runs each under its own time limit.

    python3 bench/gpu_check.py PART --jsonl OUT/gpu-check.jsonl [--small]

Every part appends one JSON line per thing it checked or measured, as it goes, to ``--jsonl``
(``{"part": ..., "status": "ok" | "fail" | "error" | "skipped", ...}``), so what a part measured
before its time limit killed it is kept. ``--small``: tiny shapes, for the dry run on a CPU
(Triton through its interpreter, wall-clock timers instead of CUDA events); what needs a GPU
(Liger-Kernel, the copy bandwidth, the 2**31-entry case, MFU) writes ``"status": "skipped"`` with
the reason. Without ``--small`` and without CUDA every GPU part is skipped, saying so.

Parts (the letters of the check's plan):

* ``setup``: ``pip install --no-index --no-deps --no-build-isolation -e .`` (not with ``--small``)
  and Liger-Kernel from its wheel in ``bench/wheels/`` into ``--liger-dir`` (``pip --target``, or
  the wheel unzipped when pip cannot).
* ``env`` (a): Python, the packages and their versions, CUDA, the GPU; what is missing is named.
* ``correctness`` (b): the ``triton`` backends against an fp64 reference written here (not hkd's):
  V = 128256 with the GPU's launch configuration (several blocks per row), every divergence, T in
  {1, 2.5}, the hard-label term, logits offset by 1e4, a tensor of more than 2**31 entries (int64
  offsets), the fused LM head over 3 row chunks (loss, grad_h, grad_W), and under bf16 autocast. Each case also gives
  the ``torch`` backend's error at the same dtype as a yardstick. Cases run in ``--jobs``
  processes at once (Triton compiles on the CPU, one kernel variant after another).
* ``softmax`` (c): softmax-KL forward and backward timed apart with CUDA events at
  4096 x 128256 bf16, for hkd's backends, eager torch and Liger-Kernel in one process: GB/s,
  and the bytes per entry the time is worth at the measured copy bandwidth against the bound
  of 6 (read both logits, write the gradient, once each).
* ``fused`` (d): the fused LM head + loss at N = 4096 and 8192 (H = 4096, V = 128256, bf16):
  time, TFLOPS (8 N H V: two logits GEMMs, grad_h and grad_W) and peak memory after warm-up,
  ``triton`` vs Liger vs ``chunked`` in one process, and Liger's published times.
* ``train`` (e): one training step of a 1.0B-parameter Llama-shaped student (V = 128256,
  bf16-mixed) through ``bench/loop.py``, ``--fused on`` or ``off``: tokens/s and MFU.
* ``pytest-record`` (f): the result of the kernel tests, from their log and exit status.
* ``summary``: the table (``summary.txt``) and the result file ``gpu-check-DATE.json`` (command,
  date, device, versions, every record), to be committed under ``bench/results/gpu-check/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WHEELS = Path(os.environ.get("GPU_CHECK_WHEELS", BENCH / "wheels"))  # the variable: tests
sys.path.insert(0, str(BENCH))

LIGER_VERSION = "0.8.5"
# Liger-Kernel's published LigerFusedLinearJSD forward + backward on an H100 (bf16, H=4096, V=128256)
LIGER_PUBLISHED_MS = {4096: 144.0, 8192: 182.6}
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")
TEMPERATURES = (1.0, 2.5)
OFFSET = 1e4
INT32_ENTRIES = 2**31
NO_CUDA = "no CUDA"
# norm-relative error allowed against fp64, by what is compared; the torch backend's error at
# the same dtype is recorded beside each case as the yardstick
TOL = {"loss": 1e-4, "grad float32": 1e-4, "grad bfloat16": 1e-2, "fused float32": 1e-4, "fused bfloat16": 3e-2}

SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "vocab": 128256, "rows": 32, "block_v": None,
        "fused": {"n": 320, "hidden": 1024, "chunk": 128},
        "softmax": {"n": 4096, "vocab": 128256, "reps": 10, "warmup": 2,
                    "backends": ["triton", "liger", "eager", "chunked"]},
        "fused_speed": {"shapes": [(4096, 4096, 128256), (8192, 4096, 128256)], "reps": 3, "warmup": 1,
                        "backends": ["triton", "liger", "chunked"]},
        "train": {"hidden": 2560, "layers": 8, "student_hidden": 2048, "student_layers": 8, "vocab": 128256,
                  "batch_size": 40, "length": 128, "steps": 2, "rounds": 1},
        "jobs": 4,
    },
    "small": {
        "vocab": 300, "rows": 6, "block_v": 64,
        "fused": {"n": 40, "hidden": 16, "chunk": 16},
        "softmax": {"n": 32, "vocab": 1000, "reps": 2, "warmup": 1,
                    "backends": ["triton", "liger", "eager", "chunked"]},
        "fused_speed": {"shapes": [(32, 16, 400)], "reps": 2, "warmup": 1, "backends": ["triton", "liger", "chunked"]},
        "train": {"hidden": 32, "layers": 2, "student_hidden": 16, "student_layers": 1, "vocab": 512,
                  "batch_size": 2, "length": 24, "steps": 1, "rounds": 1},
        "jobs": 2,  # the workers' path, as on the GPU
    },
}

# (distribution, import name, needed by): what the check imports; "optional" ones only cost their rows
PACKAGES = [("torch", "torch", "everything"), ("triton", "triton", "the triton backends"),
            ("transformers", "transformers", "hkd"), ("pluggy", "pluggy", "hkd"), ("einops", "einops", "hkd"),
            ("safetensors", "safetensors", "hkd"), ("pyyaml", "yaml", "hkd"), ("tqdm", "tqdm", "hkd"),
            ("pytest", "pytest", "the kernel tests"), ("hypothesis", "hypothesis", "the kernel tests")]
OPTIONAL = [("liger-kernel", "liger_kernel", "the Liger rows"),
            ("pytest-xdist", "xdist", "the kernel tests in parallel")]


# --------------------------------------------------------------------------- output


class Sink:
    """Appends one JSON line per record to ``path`` (one ``write`` each, so processes may share
    the file) and echoes it to stdout."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None

    def emit(self, part: str, **fields: Any) -> dict[str, Any]:
        record = {"part": part, **fields}
        line = json.dumps(record, default=str) + "\n"
        if self.path is not None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        print(line, end="", flush=True)
        return record


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path``; a line cut short by a killed writer is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        with contextlib.suppress(ValueError):
            if line.strip():
                records.append(json.loads(line))
    return records


def first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return (text.splitlines() or [type(exc).__name__])[0][:300]


# --------------------------------------------------------------------------- torch helpers


def torch_here() -> tuple[Any, str]:
    """torch and the device; without CUDA, Triton runs through its interpreter (set before triton is imported)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy's overflow notes under the interpreter
        return torch, "cpu"
    return torch, "cuda"


def gpu_skipped(sink: Sink, part: str, small: bool, device: str) -> bool:
    """Without CUDA only ``--small`` runs a GPU part (at tiny sizes); else one skipped line."""
    if device == "cuda" or small:
        return False
    sink.emit(part, status="skipped", reason=f"{NO_CUDA}: this part measures the GPU "
                                             "(bench/gpu_check.sh --small runs it at tiny sizes on a CPU)")
    return True


def rel_err(a: Any, b: Any) -> float:
    """``||a - b|| / ||b||`` in fp64 (0 when both are 0)."""
    a, b = a.detach().double(), b.detach().double()
    denom = float(b.norm())
    diff = float((a - b).norm())
    return diff / denom if denom > 0 else diff


def ref_rows(torch: Any, s: Any, t: Any, labels: Any = None, *, divergence: str = "forward_kl", beta: float = 0.5,
             skew: float = 0.1, temperature: float = 1.0, alpha: float = 0.0, ignore_index: int = -100) -> Any:
    """Per-row loss in fp64, written from the definitions (``P = softmax(z / T)``, p student, q teacher):
    forward KL(q||p), reverse KL(p||q), JSD beta KL(q||m) + (1-beta) KL(p||m) with m = beta q + (1-beta) p
    (forward / reverse KL at beta 0 / 1), skew KL(q || a q + (1-a) p), skew reverse KL(p || a p + (1-a) q);
    times (1 - alpha) T^2, plus alpha CE(z_s, label) at T = 1; ignored rows 0."""
    F = torch.nn.functional
    log_p = F.log_softmax(s.double() / temperature, -1)
    log_q = F.log_softmax(t.double() / temperature, -1)

    def kl(log_a: Any, log_b: Any) -> Any:
        a = log_a.exp()
        return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)

    def log_mix(weight_q: float) -> Any:  # log(w q + (1 - w) p), 0 < w < 1
        return torch.logaddexp(log_q + math.log(weight_q), log_p + math.log(1 - weight_q))

    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if divergence.startswith("skew_") and skew == 0.0:
        divergence = divergence[len("skew_"):]
    if divergence == "forward_kl":
        soft = kl(log_q, log_p)
    elif divergence == "reverse_kl":
        soft = kl(log_p, log_q)
    elif divergence == "jsd":
        log_m = log_mix(beta)
        soft = beta * kl(log_q, log_m) + (1 - beta) * kl(log_p, log_m)
    elif divergence == "skew_forward_kl":
        soft = kl(log_q, log_mix(skew))
    elif divergence == "skew_reverse_kl":
        soft = kl(log_p, log_mix(1 - skew))
    else:
        raise ValueError(divergence)
    loss = (1 - alpha) * temperature**2 * soft
    if alpha > 0:
        loss = loss + alpha * F.cross_entropy(s.double(), labels.clamp_min(0), reduction="none")
    if labels is not None:
        loss = torch.where(labels != ignore_index, loss, torch.zeros_like(loss))
    return loss


@contextlib.contextmanager
def module_attrs(module: Any, **values: Any) -> Iterator[None]:
    """Set module attributes (kernel overrides) for the block, then put them back."""
    saved = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


def autocast_or_not(torch: Any, device: str, on: bool) -> Any:
    return torch.autocast(device, dtype=torch.bfloat16) if on else contextlib.nullcontext()


# --------------------------------------------------------------------------- setup (install)


def part_setup(args: argparse.Namespace, sink: Sink) -> int:
    if args.small:
        sink.emit("setup", what="install hkd", status="skipped", reason="--small: the project as installed here")
    else:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
               "-e", str(ROOT)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        sink.emit("setup", what="install hkd", status="ok" if proc.returncode == 0 else "error",
                  command=" ".join(cmd[1:]), **({} if proc.returncode == 0 else {
                      "reason": " | ".join(tail) + " (the tree is on PYTHONPATH, so hkd still imports)"}))
    wheels = sorted(WHEELS.glob(f"liger_kernel-{LIGER_VERSION}-*.whl")) or sorted(WHEELS.glob("liger_kernel-*.whl"))
    if not wheels:
        sink.emit("setup", what="liger-kernel", status="skipped",
                  reason="no liger_kernel wheel in bench/wheels/: run bench/gpu_check.sh --prep where pip reaches "
                         "a registry, and carry bench/wheels to the GPU machine (the Liger rows say they are missing)")
        return 0
    wheel, target = wheels[-1], Path(args.liger_dir)
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target), str(wheel)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    method = "pip install --no-index --no-deps --target"
    if proc.returncode != 0:  # a pure-Python wheel is a zip of the package: unpacked, it imports the same
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target)
        method = f"unzipped (pip failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:120]})"
    sink.emit("setup", what="liger-kernel", status="ok", wheel=wheel.name, target=str(target), method=method)
    return 0


# --------------------------------------------------------------------------- a: environment


def version_of(distribution: str, module: str) -> tuple[str | None, str | None]:
    """(version, None) when ``module`` imports, else (None, why not)."""
    if importlib.util.find_spec(module) is None:
        return None, "not installed"
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001 - recorded
        return None, f"does not import: {first_line(exc)}"
    try:
        return importlib.metadata.version(distribution), None
    except importlib.metadata.PackageNotFoundError:
        return getattr(sys.modules[module], "__version__", "importable, version unknown"), None


def part_env(args: argparse.Namespace, sink: Sink) -> int:
    info: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable,
                            "python_on_path": shutil.which("python") or "absent (the check runs python3)",
                            "machine": platform.machine(), "cpu_count": os.cpu_count()}
    missing, packages = [], {}
    for dist, module, needed_by in PACKAGES + OPTIONAL:
        version, why = version_of(dist, module)
        packages[dist] = version or why
        if version is None:
            optional = ", optional" if (dist, module, needed_by) in OPTIONAL else ""
            missing.append(f"{dist} ({why}; needed by {needed_by}{optional})")
    hkd_version, why = version_of("hkd", "hkd")
    if hkd_version is None:
        missing.append(f"hkd ({why})")
    else:
        hkd = sys.modules["hkd"]
        packages["hkd"] = f"{hkd_version} from {Path(hkd.__file__ or '?').parent}"
    info["packages"] = packages
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=torch.cuda.get_device_name(0),
                        capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                        multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                        gpus=torch.cuda.device_count())
        else:
            missing.append("CUDA (torch.cuda.is_available() is False: the GPU parts run only with --small, at tiny "
                           "sizes)")
    smi = shutil.which("nvidia-smi")
    if smi:
        proc = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = proc.stdout.strip() or proc.stderr.strip()[:200]
    else:
        info["nvidia_smi"] = "absent"
    required_missing = [m for m in missing if ", optional" not in m and not m.startswith("CUDA")]
    sink.emit("env", status="fail" if required_missing else "ok", missing=missing, **info)
    return 0


# --------------------------------------------------------------------------- b: correctness against fp64


def correctness_cases(small: bool) -> list[dict[str, Any]]:
    """Every case, most important first (with ``--jobs``, :func:`deal` says which worker runs which)."""
    sz = SIZES["small" if small else "full"]
    v, n = sz["vocab"], sz["rows"]
    cases: list[dict[str, Any]] = []
    for divergence in DIVERGENCES:
        for temperature in TEMPERATURES:
            cases.append({"kind": "logits", "divergence": divergence, "temperature": temperature, "n": n, "vocab": v,
                          "dtype": "bfloat16"})
    cases.append({"kind": "logits", "divergence": "forward_kl", "temperature": 2.5, "alpha": 0.3, "n": n, "vocab": v,
                  "dtype": "bfloat16", "note": "hard-label term, ignored rows"})
    cases.append({"kind": "int64", "divergence": "forward_kl", "temperature": 1.0, "vocab": v, "dtype": "bfloat16",
                  "n": INT32_ENTRIES // v + 16})
    fz = sz["fused"]
    for dtype, temperature in (("bfloat16", 2.5), ("float32", 1.0)):
        cases.append({"kind": "fused", "divergence": "forward_kl", "temperature": temperature, "vocab": v,
                      "dtype": dtype, **fz})
    for divergence in ("forward_kl", "reverse_kl"):
        for temperature in TEMPERATURES:
            cases.append({"kind": "logits", "divergence": divergence, "temperature": temperature, "n": n, "vocab": v,
                          "dtype": "float32", "offset": OFFSET})
    cases.append({"kind": "logits", "divergence": "jsd", "temperature": 2.5, "n": n, "vocab": v, "dtype": "float32",
                  "autocast": True, "note": "fp32 logits inside bf16 autocast"})
    cases.append({"kind": "fused", "divergence": "forward_kl", "temperature": 2.5, "vocab": v, "dtype": "float32",
                  "autocast": True, **fz, "note": "fp32 hidden states and heads inside bf16 autocast"})
    for i, case in enumerate(cases):
        case["id"] = i
    return cases


def case_name(case: dict[str, Any]) -> str:
    parts = [case["kind"], case["divergence"], f"T={case['temperature']:g}", case["dtype"], f"V={case['vocab']}"]
    if case.get("alpha"):
        parts.append(f"alpha={case['alpha']:g}")
    if case.get("offset"):
        parts.append(f"offset={case['offset']:g}")
    if case.get("autocast"):
        parts.append("autocast")
    if case["kind"] == "fused":
        parts.append(f"N={case['n']} H={case['hidden']} {math.ceil(case['n'] / case['chunk'])} chunks")
    if case["kind"] == "int64":
        parts.append(f"N={case['n']} ({case['n'] * case['vocab'] / 2**31:.3f} x 2**31 entries)")
    return " ".join(parts)


def logits_errors(torch: Any, device: str, case: dict[str, Any], backend: str) -> dict[str, float]:
    """The row losses and the student gradient of ``distill_loss`` (``reduction="none"``, per-row
    upstream weights) against fp64."""
    from hkd.kernels import distill_loss

    dtype = getattr(torch, case["dtype"])
    n, v = case["n"], case["vocab"]
    gen = torch.Generator(device=device).manual_seed(1000 + case["id"])
    s = (torch.randn(n, v, device=device, generator=gen) * 2 + case.get("offset", 0.0)).to(dtype)
    t = (torch.randn(n, v, device=device, generator=gen) * 2 + case.get("offset", 0.0)).to(dtype)
    labels = None
    if case.get("alpha"):
        labels = torch.randint(0, v, (n,), device=device, generator=gen)
        labels[::3] = -100
    weights = torch.rand(n, device=device, generator=gen) + 0.5
    options = dict(divergence=case["divergence"], temperature=case["temperature"], alpha=case.get("alpha", 0.0))
    leaf = s.clone().requires_grad_()
    with autocast_or_not(torch, device, case.get("autocast", False)):
        rows = distill_loss(leaf, t, labels=labels, reduction="none", backend=backend, **options)
    (rows.float() * weights).sum().backward()
    s64 = s.double().requires_grad_()
    rows64 = ref_rows(torch, s64, t, labels, **options)
    (rows64 * weights.double()).sum().backward()
    return {"loss": rel_err(rows, rows64), "grad": rel_err(leaf.grad, s64.grad)}


def int64_errors(torch: Any, device: str, case: dict[str, Any]) -> dict[str, Any]:
    """More than 2**31 entries: a few rows at both ends (the last ones past the int32 range) against fp64."""
    from hkd.kernels import distill_loss

    n, v = case["n"], case["vocab"]
    gen = torch.Generator(device=device).manual_seed(7)
    s = torch.randn(n, v, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    t = torch.randn(n, v, device=device, dtype=torch.bfloat16, generator=gen)
    rows = distill_loss(s, t, reduction="none", backend="triton", temperature=case["temperature"])
    rows.sum().backward()
    idx = torch.tensor([0, 1, n // 2, n - 2, n - 1], device=device)
    s64 = s.detach()[idx].double().requires_grad_()
    rows64 = ref_rows(torch, s64, t[idx], temperature=case["temperature"])
    rows64.sum().backward()
    out = {"loss": rel_err(rows[idx], rows64), "grad": rel_err(s.grad[idx], s64.grad),
           "all_finite": bool(torch.isfinite(rows).all()), "entries": n * v,
           "last_row_offset": (n - 1) * v}
    del s, t, rows
    return out


def fused_errors(torch: Any, device: str, case: dict[str, Any], backend: str) -> dict[str, float]:
    """``fused_linear_distill_loss`` (mean over rows) over ``n`` rows in chunks of ``chunk``: the loss,
    grad_h and grad_W against the fp64 logits and loss."""
    from hkd.kernels import fused_linear_distill_loss, fused_linear_kl

    dtype = getattr(torch, case["dtype"])
    n, h, v = case["n"], case["hidden"], case["vocab"]
    gen = torch.Generator(device=device).manual_seed(2000 + case["id"])
    hs = torch.randn(n, h, device=device, generator=gen).to(dtype)
    ws = (torch.randn(v, h, device=device, generator=gen) * h**-0.5 * 3).to(dtype)
    ht = torch.randn(n, h, device=device, generator=gen).to(dtype)
    wt = (torch.randn(v, h, device=device, generator=gen) * h**-0.5 * 3).to(dtype)
    options = dict(divergence=case["divergence"], temperature=case["temperature"])
    h_leaf, w_leaf = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    # on the CPU the GEMM (row chunk) path is forced, so the dry run takes the chunks the GPU takes
    overrides = {"CHUNK_ROWS": case["chunk"], **({"GEMM_PATH": True} if device == "cpu" else {})}
    with module_attrs(fused_linear_kl, **overrides), autocast_or_not(torch, device, case.get("autocast", False)):
        loss = fused_linear_distill_loss(h_leaf, w_leaf, ht, wt, backend=backend, **options)
    loss.backward()
    h64, w64 = hs.double().requires_grad_(), ws.double().requires_grad_()
    loss64 = ref_rows(torch, h64 @ w64.T, ht.double() @ wt.double().T, **options).mean()
    loss64.backward()
    return {"loss": rel_err(loss, loss64), "grad_h": rel_err(h_leaf.grad, h64.grad),
            "grad_W": rel_err(w_leaf.grad, w64.grad)}


def run_case(torch: Any, device: str, case: dict[str, Any], small: bool) -> dict[str, Any]:
    """One case's record: the triton backend's errors, the torch backend's (yardstick), tolerances, status."""
    record: dict[str, Any] = {"case": case["id"], "name": case_name(case)}
    if case.get("note"):
        record["note"] = case["note"]
    if case["kind"] == "int64" and (device != "cuda" or small):
        return {**record, "status": "skipped",
                "reason": f"{NO_CUDA if device != 'cuda' else '--small'}: needs about 13 GB of GPU memory "
                          "(tests/kernels/test_compile.py checks the int64 offsets symbolically)"}
    fused = case["kind"] == "fused"
    low = case["dtype"] == "bfloat16" or case.get("autocast", False)
    precision = "bfloat16" if low else "float32"
    if fused:
        tol = {"loss": TOL[f"fused {precision}"], "grad_h": TOL[f"fused {precision}"],
               "grad_W": TOL[f"fused {precision}"]}
    else:
        tol = {"loss": TOL["loss"], "grad": TOL[f"grad {'bfloat16' if case['dtype'] == 'bfloat16' else 'float32'}"]}
    start = time.perf_counter()
    try:
        if case["kind"] == "int64":
            errors = int64_errors(torch, device, case)
        elif fused:
            errors = fused_errors(torch, device, case, "triton")
        else:
            errors = logits_errors(torch, device, case, "triton")
    except Exception as exc:  # noqa: BLE001 - the case's record says what broke
        return {**record, "status": "error", "reason": first_line(exc),
                "seconds": round(time.perf_counter() - start, 2)}
    seconds = time.perf_counter() - start
    if case["kind"] != "int64":
        try:
            yardstick = (fused_errors(torch, device, case, "torch") if fused
                         else logits_errors(torch, device, case, "torch"))
            record["torch_backend"] = yardstick
        except Exception as exc:  # noqa: BLE001
            record["torch_backend"] = {"error": first_line(exc)}
    bad = [k for k, limit in tol.items() if not errors[k] <= limit]  # NaN fails
    if errors.get("all_finite") is False:
        bad.append("all_finite")
    return {**record, "status": "fail" if bad else "ok", "errors": errors, "tolerance": tol,
            **({"over_tolerance": bad} if bad else {}), "seconds": round(seconds, 2)}


def part_correctness(args: argparse.Namespace, sink: Sink) -> int:
    torch, device = torch_here()
    if gpu_skipped(sink, "correctness", args.small, device):
        return 0
    cases = correctness_cases(args.small)
    only = None if args.only is None else {int(i) for i in args.only.split(",") if i}
    jobs = args.jobs or SIZES["small" if args.small else "full"]["jobs"]
    if only is None and jobs > 1:
        return correctness_workers(args, sink, cases, jobs)
    from hkd.kernels import softmax_kl

    block_v = SIZES["small" if args.small else "full"]["block_v"]  # small: several blocks per row at V=300
    with module_attrs(softmax_kl, **({"BLOCK_V": block_v} if block_v else {})):
        for case in cases:
            if only is not None and case["id"] not in only:
                continue
            sink.emit("correctness", **run_case(torch, device, case, args.small))
            if device == "cuda":
                torch.cuda.empty_cache()
    return 0


def variant(case: dict[str, Any]) -> tuple[str, str, bool]:
    """The softmax-KL kernel variant a case compiles (Triton specialises on the divergence, the
    logits' dtype and the hard-label term): bf16 logits under autocast, fp32 otherwise."""
    low = case["dtype"] == "bfloat16" or (case["kind"] == "fused" and case.get("autocast", False))
    return case["divergence"], "bfloat16" if low else "float32", bool(case.get("alpha"))


def deal(cases: list[dict[str, Any]], jobs: int) -> list[list[int]]:
    """Case ids per worker: the cases of one kernel variant together (each variant is compiled
    once, by one worker), variants in order of first appearance to the least loaded worker."""
    by_variant: dict[tuple[str, str, bool], list[int]] = {}
    for case in cases:
        by_variant.setdefault(variant(case), []).append(case["id"])
    groups: list[list[int]] = [[] for _ in range(jobs)]
    for ids in by_variant.values():
        min(groups, key=len).extend(ids)
    return [sorted(g) for g in groups]


def correctness_workers(args: argparse.Namespace, sink: Sink, cases: list[dict[str, Any]], jobs: int) -> int:
    """Deal the cases out to ``jobs`` processes (Triton compiles each kernel variant on the CPU, one
    after another within a process); a case no worker reported is recorded as an error."""
    groups = deal(cases, jobs)
    base = [sys.executable, __file__, "correctness", "--jsonl", str(sink.path)] + (["--small"] if args.small else [])
    procs = [subprocess.Popen(base + ["--only", ",".join(map(str, g)), "--jobs", "1"]) for g in groups if g]
    codes = [p.wait() for p in procs]
    seen = {r.get("case") for r in read_records(sink.path)} if sink.path else set()
    for case in cases:
        if case["id"] not in seen:
            sink.emit("correctness", case=case["id"], name=case_name(case), status="error",
                      reason=f"its worker exited (status {codes}) before reporting it")
    return 0


# --------------------------------------------------------------------------- timing


def time_fwd_bwd(torch: Any, fn: Callable[[], Any], leaves: list[Any], reps: int, warmup: int) -> dict[str, Any]:
    """Median forward and backward times of ``fn().backward()``, timed apart (CUDA events on a GPU,
    ``perf_counter`` on a CPU), and the peak memory the calls add, measured after the warm-up
    (gradients included: they are reset before each call)."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        for x in leaves:
            x.grad = None
        fn().backward()
    for x in leaves:
        x.grad = None
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    marks: list[Any] = []
    loss = None
    for _ in range(reps):
        for x in leaves:
            x.grad = None
        if cuda:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            events[0].record()
            out = fn()
            events[1].record()
            out.backward()
            events[2].record()
            marks.append(events)
        else:
            t0 = time.perf_counter()
            out = fn()
            t1 = time.perf_counter()
            out.backward()
            marks.append((t0, t1, time.perf_counter()))
        if loss is None:
            loss = out.detach()
        del out
    if cuda:
        torch.cuda.synchronize()
        fwd = [a.elapsed_time(b) for a, b, _ in marks]
        bwd = [b.elapsed_time(c) for _, b, c in marks]
    else:
        fwd = [(b - a) * 1e3 for a, b, _ in marks]
        bwd = [(c - b) * 1e3 for _, b, c in marks]
    result: dict[str, Any] = {"fwd_ms": statistics.median(fwd), "bwd_ms": statistics.median(bwd),
                              "total_ms": statistics.median([f + b for f, b in zip(fwd, bwd)]),
                              "timer": "cuda events" if cuda else "perf_counter (CPU: not a GPU number)",
                              "loss": float(loss) if loss is not None else None}
    if cuda:
        result["extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def copy_bandwidth(torch: Any) -> float:
    """Device-to-device copy speed in bytes/s, counting bytes read and written (1 GiB, mean of 10)."""
    x = torch.empty(2**28, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * x.element_size() * 10 / (start.elapsed_time(end) / 1e3)


def liger_unavailable(device: str) -> str | None:
    if device != "cuda":
        return f"{NO_CUDA}: Liger-Kernel's kernels need a GPU"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (no wheel in bench/wheels/: bench/gpu_check.sh --prep)"
    return None


def free(torch: Any) -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- c: softmax-KL speed


def part_softmax(args: argparse.Namespace, sink: Sink) -> int:
    torch, device = torch_here()
    if gpu_skipped(sink, "softmax", args.small, device):
        return 0
    import kernel_speed

    cfg = SIZES["small" if args.small else "full"]["softmax"]
    n, v, dtype = cfg["n"], cfg["vocab"], torch.bfloat16
    entries, size = n * v, dtype.itemsize
    bound = 3 * size  # read student and teacher logits, write the gradient: once each
    copy_bps = None
    if device == "cuda":
        copy_bps = copy_bandwidth(torch)
        sink.emit("softmax", what="copy bandwidth", status="ok", GBps=copy_bps / 1e9, bytes=2 * 2**30)
    else:
        sink.emit("softmax", what="copy bandwidth", status="skipped",
                  reason=f"{NO_CUDA}: bytes per entry are not derived")
    gen = torch.Generator(device=device).manual_seed(0)
    student = torch.randn(n, v, device=device, dtype=dtype, generator=gen).requires_grad_()
    teacher = torch.randn(n, v, device=device, dtype=dtype, generator=gen)
    shape = {"N": n, "V": v, "dtype": "bfloat16", "temperature": kernel_speed.TEMPERATURE}
    for backend in cfg["backends"]:
        if backend == "liger" and (why := liger_unavailable(device)):
            sink.emit("softmax", backend=backend, **shape, status="skipped", reason=why)
            continue
        try:
            fn = kernel_speed.loss_fn(backend)
            r = time_fwd_bwd(torch, functools.partial(fn, student, teacher), [student], cfg["reps"], cfg["warmup"])
        except Exception as exc:  # noqa: BLE001 - that backend's row says why
            sink.emit("softmax", backend=backend, **shape, status="error", reason=first_line(exc))
            free(torch)
            continue
        row = {"backend": backend, **shape, "status": "ok", **r,
               "fwd_GBps": 2 * size * entries / (r["fwd_ms"] / 1e3) / 1e9,
               "bwd_GBps": 3 * size * entries / (r["bwd_ms"] / 1e3) / 1e9, "bound_bytes_per_entry": bound}
        if copy_bps:
            row["bytes_per_entry"] = r["total_ms"] / 1e3 * copy_bps / entries
            row["x_bound"] = row["bytes_per_entry"] / bound
        sink.emit("softmax", **row)
        free(torch)
    return 0


# --------------------------------------------------------------------------- d: fused LM head speed


def part_fused(args: argparse.Namespace, sink: Sink) -> int:
    torch, device = torch_here()
    if gpu_skipped(sink, "fused", args.small, device):
        return 0
    import kernel_speed

    cfg = SIZES["small" if args.small else "full"]["fused_speed"]
    for n, h, v in cfg["shapes"]:
        shape = {"N": n, "H": h, "V": v, "dtype": "bfloat16", "temperature": kernel_speed.TEMPERATURE}
        published = LIGER_PUBLISHED_MS.get(n) if (h, v) == (4096, 128256) else None
        try:
            inputs: tuple[Any, ...] = kernel_speed.fused_inputs(n, h, v, torch.bfloat16, device)  # h_s, W_s, h_t, W_t
        except Exception as exc:  # noqa: BLE001
            sink.emit("fused", **shape, status="error", reason=f"inputs: {first_line(exc)}")
            continue
        for backend in cfg["backends"]:
            if backend == "liger" and (why := liger_unavailable(device)):
                sink.emit("fused", backend=backend, **shape, status="skipped", reason=why)
                continue
            try:
                fn = kernel_speed.fused_loss_fn(backend)
                r = time_fwd_bwd(torch, functools.partial(fn, *inputs), list(inputs[:2]), cfg["reps"], cfg["warmup"])
            except Exception as exc:  # noqa: BLE001
                sink.emit("fused", backend=backend, **shape, status="error", reason=first_line(exc))
                free(torch)
                continue
            row = {"backend": backend, **shape, "status": "ok", **r,
                   "TFLOPS": 8 * n * h * v / (r["total_ms"] / 1e3) / 1e12}
            if published:
                row["liger_published_ms"] = published
                row["x_liger_published"] = r["total_ms"] / published
            sink.emit("fused", **row)
            free(torch)
        inputs = ()  # freed before the next shape's
        free(torch)
    return 0


# --------------------------------------------------------------------------- e: one training step


def part_train(args: argparse.Namespace, sink: Sink) -> int:
    torch, device = torch_here()
    fused = args.fused == "on"
    if device != "cuda" and not args.small:
        sink.emit("train", fused=fused, status="skipped", reason=f"{NO_CUDA}: this part measures the GPU "
                                                                "(bench/gpu_check.sh --small runs it at tiny sizes)")
        return 0
    spec = importlib.util.spec_from_file_location("bench_loop", BENCH / "loop.py")
    assert spec is not None and spec.loader is not None
    loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop)
    cfg = SIZES["small" if args.small else "full"]["train"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "loop.json"
        argv = [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]
        argv += ["--precision", "bf16-mixed" if device == "cuda" else "fp32"]
        if args.work:  # the models written by the first training part are loaded by the second
            argv += ["--models", str(Path(args.work) / "models")]
        argv += ["--out", str(out)]
        argv += ["--fused"] if fused else []
        start = time.perf_counter()
        try:
            loop.main(argv)
            result = json.loads(out.read_text())
        except Exception as exc:  # noqa: BLE001
            sink.emit("train", fused=fused, status="error", reason=first_line(exc),
                      command=re.sub(r" --(models|out) \S+", "", "python bench/loop.py " + " ".join(argv)))
            return 0
    rate = result["tokens_per_s"]
    mfu = result.get("mfu")
    sink.emit("train", fused=fused, status="ok", tokens_per_s=rate["hkd"], bare_tokens_per_s=rate["bare"],
              overhead=result["overhead"], mfu=mfu["hkd"] if mfu else None, bare_mfu=mfu["bare"] if mfu else None,
              **({} if mfu else {"mfu_reason": f"{NO_CUDA}: MFU is for the GPU"}),
              peak_tflops=result.get("peak_tflops"), precision=result["precision"], vocab=result["vocab"],
              student_params=result["student_params"], teacher_params=result["teacher_params"],
              peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
              seconds=round(time.perf_counter() - start, 1),
              command=re.sub(r" --(models|out) \S+", "", result["command"]))
    return 0


# --------------------------------------------------------------------------- f: the kernel tests


SUMMARY_LINE = re.compile(r"^(=+ )?(?P<body>\d+ [a-z]+.*?) in (?P<seconds>[\d.]+)s\b")
COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)")
PROGRESS = re.compile(r"^(?P<marks>[.FEsxX]+)\s+\[\s*(?P<pct>\d+)%\]")


def parse_pytest(text: str, rc: int) -> dict[str, Any]:
    """Counts, time and failures from a ``pytest -q`` log; after a time limit, how far it got."""
    out: dict[str, Any] = {"rc": rc}
    for line in text.splitlines():
        m = SUMMARY_LINE.match(line.strip())
        if m:
            out["counts"] = {word.rstrip("s") if word.startswith("error") or word.startswith("warning") else word:
                             int(k) for k, word in COUNT.findall(m["body"])}
            out["seconds"] = float(m["seconds"])
    out["failures"] = [line.strip() for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))][:10]
    if rc in (124, 137):
        marks = "".join(m["marks"] for m in map(PROGRESS.match, text.splitlines()) if m)
        pct = [int(m["pct"]) for m in map(PROGRESS.match, text.splitlines()) if m]
        out["status"] = "timeout"
        out["progress"] = {"percent": pct[-1] if pct else 0, "passed": marks.count("."),
                           "failed": marks.count("F"), "errors": marks.count("E"), "skipped": marks.count("s")}
    elif rc == 0:
        out["status"] = "ok"
    elif rc == 1:
        out["status"] = "fail"
    else:
        out["status"] = "error"
        out["reason"] = {2: "interrupted", 3: "internal error", 4: "usage error", 5: "no tests collected"}.get(
            rc, f"exit {rc}")
    return out


def part_pytest_record(args: argparse.Namespace, sink: Sink) -> int:
    log = Path(args.log or "pytest.log")
    text = log.read_text(errors="replace") if log.exists() else ""
    sink.emit("pytest", **parse_pytest(text, args.rc), command=args.command, log=log.name)
    return 0


# --------------------------------------------------------------------------- summary


def fmt(x: Any, spec: str | None = None) -> str:
    """A number for the table: ``spec`` if given, else 4 significant digits without an exponent."""
    if x is None:
        return "-"
    if not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if spec:
        return format(x, spec)
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def params(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def not_ok(rows: list[dict[str, Any]], label: Callable[[dict[str, Any]], str]) -> list[str]:
    """One line per record that did not run: what, its status and why."""
    return [f"  {label(r)}: {r['status']}: {r.get('reason', '')}" for r in rows if r["status"] in ("error", "skipped")]


def summary_lines(records: list[dict[str, Any]]) -> list[str]:
    """The short table: each part's status and time, then each measurement's headline numbers."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if "event" not in r:  # the script's own line per part (status, seconds) is the parts table
            by.setdefault(r["part"], []).append(r)
    env = next((r for r in by.get("env", []) if "packages" in r), {})
    pk = env.get("packages", {})
    lines = [f"GPU check: {env.get('gpu', 'no GPU')} | torch {pk.get('torch', '?')} | triton {pk.get('triton', '?')} | "
             f"liger-kernel {pk.get('liger-kernel', '?')} | python {env.get('python', '?')}"]
    if env.get("missing"):
        lines.append("missing: " + "; ".join(env["missing"]))
    lines += not_ok(by.get("setup", []), lambda r: f"setup {r.get('what')}")
    ends = [r for r in records if r.get("event") == "end"]
    if ends:
        lines += ["", "parts:"] + columns([["part", "status", "seconds", "limit s"]] + [
            [r["part"], r["status"], fmt(r.get("seconds")), fmt(r.get("limit_s"))] for r in ends])

    cases = sorted((r for r in by.get("correctness", []) if "name" in r), key=lambda r: r.get("case", 0))
    if cases:
        statuses = {k: sum(r["status"] == k for r in cases) for k in ("ok", "fail", "error", "skipped")}
        lines += ["", "correctness vs fp64 (norm-relative errors; torch: the torch backend at the same dtype): "
                  + ", ".join(f"{k} {v}" for k, v in statuses.items() if v)]
        rows = [["case", "status", "loss", "grad|grad_h", "grad_W", "torch loss", "torch grad", "tol"]]
        for r in cases:
            if r["status"] not in ("ok", "fail"):
                continue
            e, y = r["errors"], r.get("torch_backend", {})
            rows.append([r["name"], r["status"], fmt(e.get("loss"), ".1e"), fmt(e.get("grad", e.get("grad_h")), ".1e"),
                         fmt(e.get("grad_W"), ".1e"), fmt(y.get("loss"), ".1e"),
                         fmt(y.get("grad", y.get("grad_h")), ".1e"), fmt(max(r["tolerance"].values()), ".0e")])
        lines += columns(rows) + not_ok(cases, lambda r: r["name"])

    softmax = by.get("softmax", [])
    measured = [r for r in softmax if "backend" in r]
    if measured:
        copy = next((r for r in softmax if r.get("what") == "copy bandwidth"), {})
        first = measured[0]
        lines += ["", f"softmax-KL forward + backward, {first['N']} x {first['V']} {first['dtype']}, ms "
                      f"(copy bandwidth {fmt(copy.get('GBps'), '.0f')} GB/s; "
                      f"bound {first.get('bound_bytes_per_entry', 6)} "
                      "B/entry; B/entry = time x copy bandwidth / entries; GB/s counts the bytes a pass must move: "
                      "forward both logits, backward both and the gradient):"]
        ok = [r for r in measured if r["status"] == "ok"]
        liger = next((r for r in ok if r["backend"] == "liger"), None)
        if ok:
            lines += columns([["backend", "fwd", "bwd", "total", "fwd GB/s", "bwd GB/s", "B/entry", "x bound",
                               "x liger", "extra GiB"]] + [
                [r["backend"], fmt(r["fwd_ms"]), fmt(r["bwd_ms"]), fmt(r["total_ms"]), fmt(r["fwd_GBps"], ".0f"),
                 fmt(r["bwd_GBps"], ".0f"), fmt(r.get("bytes_per_entry"), ".1f"), fmt(r.get("x_bound"), ".2f"),
                 fmt(r["total_ms"] / liger["total_ms"], ".2f") if liger else "-", fmt(r.get("extra_gib"), ".2f")]
                for r in ok])
        lines += not_ok(measured + ([copy] if copy else []), lambda r: r.get("backend", "copy bandwidth"))

    fused = [r for r in by.get("fused", []) if "N" in r]
    if fused:
        lines += ["", "fused LM head + forward KL, forward + backward, bf16, ms (TFLOPS counts 8 N H V):"]
        ok = [r for r in fused if r["status"] == "ok"]
        table = [["N x H x V", "backend", "fwd", "bwd", "total", "TFLOPS", "extra GiB", "x liger", "liger published",
                  "x published"]]
        for r in ok:
            liger = next((x for x in ok if x["backend"] == "liger" and x["N"] == r["N"]), None)
            table.append([f"{r['N']} x {r['H']} x {r['V']}", r["backend"], fmt(r["fwd_ms"]), fmt(r["bwd_ms"]),
                          fmt(r["total_ms"]), fmt(r["TFLOPS"], ".0f"), fmt(r.get("extra_gib"), ".2f"),
                          fmt(r["total_ms"] / liger["total_ms"], ".2f") if liger else "-",
                          fmt(r.get("liger_published_ms")), fmt(r.get("x_liger_published"), ".2f")])
        lines += (columns(table) if ok else []) + not_ok(
            fused, lambda r: f"{r['N']} x {r['H']} x {r['V']} {r.get('backend', '(inputs)')}")

    train = by.get("train", [])
    if train:
        lines += ["", "training step (bench/loop.py; MFU = (6 student + 2 teacher params) x tokens/s / peak; "
                      "peak GiB: both loops' models resident):"]
        ok = [r for r in train if r["status"] == "ok"]
        if ok:
            lines += columns([["fused head", "tokens/s", "MFU", "bare tokens/s", "overhead", "student", "teacher",
                               "peak GiB"]] + [
                ["on" if r["fused"] else "off", fmt(r["tokens_per_s"], ".0f"),
                 f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-", fmt(r["bare_tokens_per_s"], ".0f"),
                 f"{100 * r['overhead']:+.1f}%", params(r["student_params"]), params(r["teacher_params"]),
                 fmt(r.get("peak_gib"), ".1f")] for r in ok])
        lines += not_ok(train, lambda r: f"fused head {'on' if r.get('fused') else 'off'}")

    for run in by.get("pytest", []):
        counts = ", ".join(f"{v} {k}" for k, v in run.get("counts", {}).items())
        if "progress" in run:
            counts = f"stopped by its time limit at {run['progress']['percent']}%: " + ", ".join(
                f"{v} {k}" for k, v in run["progress"].items() if k != "percent")
        lines += ["", f"kernel tests: {run['status']}: {counts or run.get('reason', '')}"
                      + (f" in {run['seconds']:g} s" if run.get("seconds") else "")]
        lines += [f"  {f}" for f in run.get("failures", [])]
    return lines


def recorded_commit() -> str | None:
    """The commit ``--prep`` recorded beside the wheels (the GPU machine's copy of the tree has no git)."""
    path = WHEELS / "source-commit.txt"
    return path.read_text().strip() if path.exists() else None


def part_summary(args: argparse.Namespace, sink: Sink) -> int:
    from provenance import cpu_name, dated_name, versions

    records = read_records(args.jsonl)
    lines = summary_lines(records)
    out = Path(args.out)
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    env = next((r for r in records if r["part"] == "env" and "packages" in r), {})
    vers = versions()
    if "unrecorded" in vers["hkd"] and recorded_commit():
        vers["hkd"] = vers["hkd"].replace("unrecorded", f"{recorded_commit()}, recorded by --prep")
    vers["liger_kernel"] = env.get("packages", {}).get("liger-kernel", "unrecorded")
    vers["cuda"] = env.get("torch_cuda") or "none"
    device = f"cuda: {env['gpu']}" if env.get("gpu") else f"cpu: {cpu_name()}, {os.cpu_count()} cores"
    result = {"command": args.command, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "device": device, "versions": vers, "mode": "small" if args.small else "full",
              "nvidia_smi": env.get("nvidia_smi"), "records": records, "summary": lines}
    path = out / dated_name("gpu-check", "-small" if args.small else "")
    path.write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {path} and {out / 'summary.txt'}")
    return 0


# --------------------------------------------------------------------------- main


PARTS: dict[str, Callable[[argparse.Namespace, Sink], int]] = {
    "setup": part_setup, "env": part_env, "correctness": part_correctness, "softmax": part_softmax,
    "fused": part_fused, "train": part_train, "pytest-record": part_pytest_record, "summary": part_summary,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=list(PARTS))
    parser.add_argument("--jsonl", required=True, help="the JSON-lines file every part appends to")
    parser.add_argument("--small", action="store_true", help="tiny shapes: the dry run on a CPU")
    parser.add_argument("--liger-dir", default=str(Path(tempfile.gettempdir()) / "gpu-check-liger"),
                        help="setup: where Liger-Kernel's wheel is installed (put it on PYTHONPATH)")
    parser.add_argument("--jobs", type=int, help="correctness: processes at once (default 4, 2 with --small)")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # correctness: comma-separated case ids (a worker)
    parser.add_argument("--fused", choices=["on", "off"], default="off", help="train: the fused LM head")
    parser.add_argument("--work", help="train: a scratch folder the parts share (the models, written once)")
    parser.add_argument("--log", help="pytest-record: the pytest log")
    parser.add_argument("--rc", type=int, default=0, help="pytest-record: pytest's exit status (124: time limit)")
    parser.add_argument("--command", default="", help="pytest-record, summary: the command line to record")
    parser.add_argument("--out", help="summary: the folder for summary.txt and the result file")
    args = parser.parse_args(argv)
    return PARTS[args.part](args, Sink(args.jsonl))


if __name__ == "__main__":
    raise SystemExit(main())
