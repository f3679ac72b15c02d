"""bench/gpu_check.sh and bench/gpu_check.py: the one GPU call, proven on the CPU first.

The slow test runs the whole script in its dry-run mode (``--small``: tiny shapes, Triton
through its interpreter) and checks that every part wrote its JSON lines; the others check
the plan, the preparation step, the fp64 reference, the log parsing and the summary table
with the fields only a GPU run produces.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import load_bench_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
PARTS = ["setup", "env", "correctness", "softmax", "fused", "train-unfused", "train-fused", "pytest", "summary"]


@pytest.fixture(scope="module")
def gc() -> Any:
    return load_bench_script("gpu_check")


def plan(out: Path) -> list[str]:
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if line.startswith("== ")]


def test_the_plan_fits_eight_minutes_with_the_tests_last(tmp_path: Path) -> None:
    # catches: a part added without a time limit, limits that overrun the 8-minute call, tests that are not last
    steps = plan(tmp_path / "out")
    assert [s.split()[1] for s in steps] == PARTS
    caps = {s.split()[1]: int(s.split("limit ")[1].split("s)")[0]) for s in steps}
    # the plan gives each part the time it would get if every part before used all of its own
    assert sum(caps.values()) <= 470 and caps["pytest"] >= 40, caps  # 8 minutes with 10 s to spare
    assert "python3 bench/gpu_check.py" in steps[0] and all("python " not in s for s in steps)
    assert "python3 -m pytest -x --tb=short" in steps[-2] and "tests/kernels" in steps[-2]
    assert not (tmp_path / "out" / "gpu-check.jsonl").exists()  # a plan runs nothing


@pytest.mark.parametrize("args", [[], ["--bogus", "x"], ["a", "b"], ["--prep", "x"]])
def test_the_script_needs_one_output_dir(args: list[str]) -> None:
    # catches: a typo on the GPU machine running something other than what was meant
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage: bench/gpu_check.sh" in proc.stderr


def test_prep_keeps_a_wheel_it_already_has(tmp_path: Path) -> None:
    # catches: a preparation step that asks the registry again (or fails offline) when the wheel is there
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "liger_kernel-0.8.5-py3-none-any.whl").write_bytes(b"")
    env = {"PATH": "/usr/bin:/bin", "GPU_CHECK_WHEELS": str(wheels), "PYTHON": "false"}  # pip would fail
    for _ in range(2):
        proc = subprocess.run(["bash", str(SCRIPT), "--prep"], capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr
        assert "already there" in proc.stdout
    assert (ROOT / ".gitignore").read_text().count("bench/wheels/") == 1


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.0), (2.5, 0.3)])
def test_the_fp64_reference_is_hkds_definition(gc: Any, divergence: str, temperature: float, alpha: float) -> None:
    # catches: a reference written wrong, which would fail (or pass) every GPU case for the wrong reason
    from hkd.kernels import distill_loss

    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 40, generator=gen, dtype=torch.float64) * 2, torch.randn(5, 40, generator=gen,
                                                                                    dtype=torch.float64) * 2
    labels = torch.tensor([3, -100, 7, 0, 39])
    options = dict(divergence=divergence, temperature=temperature, alpha=alpha)
    expected = distill_loss(s, t, labels=labels, reduction="none", backend="torch", **options)
    torch.testing.assert_close(gc.ref_rows(torch, s, t, labels, **options), expected, rtol=1e-10, atol=1e-12)


def test_pytest_logs_are_read_for_counts_failures_and_time_limits(gc: Any) -> None:
    # catches: a test run stopped by its time limit or failing at the first test reported as a pass
    done = gc.parse_pytest("....  [100%]\n15 passed, 2 skipped in 1.92s\n", 0)
    assert done["status"] == "ok" and done["counts"] == {"passed": 15, "skipped": 2} and done["seconds"] == 1.92
    failed = gc.parse_pytest("..F\nFAILED tests/kernels/test_a.py::test_b - AssertionError\n"
                             "==== 1 failed, 2 passed, 1 warning in 3.50s ====\n", 1)
    assert failed["status"] == "fail" and failed["failures"] == [
        "FAILED tests/kernels/test_a.py::test_b - AssertionError"] and failed["counts"]["failed"] == 1
    cut = gc.parse_pytest("....s.....           [ 10%]\n..F", 124)
    assert cut["status"] == "timeout" and cut["progress"] == {"percent": 10, "passed": 9, "failed": 0, "errors": 0,
                                                              "skipped": 1}
    assert gc.parse_pytest("", 5)["reason"] == "no tests collected"


def gpu_records() -> list[dict[str, Any]]:
    """What a GPU run writes (fields the CPU dry run never produces: CUDA memory, bandwidth, Liger, MFU)."""
    end = {"event": "end", "status": "ok", "rc": 0, "seconds": 10, "limit_s": 100}
    soft = {"N": 4096, "V": 128256, "dtype": "bfloat16", "status": "ok", "bound_bytes_per_entry": 6}
    fused = {"N": 8192, "H": 4096, "V": 128256, "dtype": "bfloat16", "status": "ok"}
    return [
        {"part": "env", "status": "ok", "missing": [], "gpu": "NVIDIA H100 80GB HBM3", "python": "3.12.3",
         "packages": {"torch": "2.11.0", "triton": "3.6.0", "liger-kernel": "0.8.5"}},
        {"part": "env", **end},
        {"part": "correctness", "case": 0, "name": "logits forward_kl T=1 bfloat16 V=128256", "status": "ok",
         "errors": {"loss": 1e-7, "grad": 2e-3}, "tolerance": {"loss": 1e-4, "grad": 1e-2},
         "torch_backend": {"loss": 1e-7, "grad": 1.5e-3}},
        {"part": "correctness", "case": 1, "name": "fused forward_kl", "status": "fail",
         "errors": {"loss": 0.1, "grad_h": 0.2, "grad_W": math.nan}, "tolerance": {"loss": 0.03, "grad_h": 0.03,
                                                                                  "grad_W": 0.03},
         "over_tolerance": ["loss", "grad_h", "grad_W"]},
        {"part": "correctness", "case": 2, "name": "int64", "status": "error", "reason": "OutOfMemoryError: ..."},
        {"part": "softmax", "what": "copy bandwidth", "status": "ok", "GBps": 3000.0},
        {"part": "softmax", "backend": "triton", **soft, "fwd_ms": 1.0, "bwd_ms": 1.5, "total_ms": 2.5,
         "fwd_GBps": 2100.0, "bwd_GBps": 2100.0, "bytes_per_entry": 14.3, "x_bound": 2.38, "extra_gib": 1.0},
        {"part": "softmax", "backend": "liger", **soft, "fwd_ms": 4.0, "bwd_ms": 6.0, "total_ms": 10.0,
         "fwd_GBps": 500.0, "bwd_GBps": 500.0, "bytes_per_entry": 57.0, "x_bound": 9.5, "extra_gib": 6.0},
        {"part": "softmax", "backend": "eager", **soft, "status": "error", "reason": "OutOfMemoryError"},
        {"part": "fused", "backend": "triton", **fused, "fwd_ms": 60.0, "bwd_ms": 30.0, "total_ms": 90.0,
         "TFLOPS": 382.0, "extra_gib": 1.5, "liger_published_ms": 182.6, "x_liger_published": 0.49},
        {"part": "fused", "backend": "liger", **fused, "fwd_ms": 170.0, "bwd_ms": 10.0, "total_ms": 180.0,
         "TFLOPS": 191.0, "extra_gib": 3.0, "liger_published_ms": 182.6, "x_liger_published": 0.99},
        {"part": "train", "fused": False, "status": "ok", "tokens_per_s": 30000.0, "bare_tokens_per_s": 30500.0,
         "overhead": 0.0167, "mfu": 0.31, "student_params": 1_030_000_000, "teacher_params": 1_440_000_000,
         "peak_gib": 60.2},
        {"part": "train", "fused": True, "status": "error", "reason": "OutOfMemoryError: CUDA out of memory"},
        {"part": "pytest", "rc": 124, "status": "timeout", "failures": [],
         "progress": {"percent": 40, "passed": 100, "failed": 0, "errors": 0, "skipped": 2}},
    ]


def test_the_summary_reads_what_only_a_gpu_run_writes(gc: Any) -> None:
    # catches: a summary that crashes (or drops a column) on GPU-only fields the CPU dry run cannot exercise
    text = "\n".join(gc.summary_lines(gpu_records()))
    assert "NVIDIA H100 80GB HBM3" in text and "copy bandwidth 3000 GB/s" in text
    triton = next(line for line in text.splitlines() if line.strip().startswith("triton") and "2.38" in line)
    assert triton.split()[-2:] == ["0.25", "1.00"]  # x liger, extra GiB
    fused = next(line for line in text.splitlines() if "8192 x 4096 x 128256" in line and "triton" in line)
    assert fused.split()[-5:] == ["382", "1.50", "0.50", "182.6", "0.49"]
    assert "eager: error: OutOfMemoryError" in text and "int64: error: OutOfMemoryError" in text
    assert "fused head on: error: OutOfMemoryError" in text and "31.0%" in text and "1.03B" in text
    assert "ok 1, fail 1, error 1" in text and "nan" in text
    assert "kernel tests: timeout: stopped by its time limit at 40%: 100 passed" in text


def test_a_worker_that_dies_leaves_its_cases_named(gc: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # catches: correctness cases silently missing from the results when a worker process crashes
    class Dead:
        def __init__(self, cmd: list[str]) -> None:
            self.cmd = cmd

        def wait(self) -> int:
            return -9

    monkeypatch.setattr(gc.subprocess, "Popen", Dead)
    sink = gc.Sink(tmp_path / "out.jsonl")
    sink.emit("correctness", case=0, name="reported", status="ok")
    cases = gc.correctness_cases(small=True)
    args = gc.argparse.Namespace(small=True)
    gc.correctness_workers(args, sink, cases, jobs=3)
    records = gc.read_records(tmp_path / "out.jsonl")
    assert sorted(r["case"] for r in records) == [c["id"] for c in cases]
    assert all("worker exited" in r["reason"] for r in records[1:])


def test_each_kernel_variant_is_compiled_by_one_worker(gc: Any) -> None:
    # catches: workers compiling the same kernel variant at once (the compile time they are there to save)
    cases = gc.correctness_cases(small=False)
    groups = gc.deal(cases, 4)
    assert sorted(i for g in groups for i in g) == [c["id"] for c in cases] and all(groups)
    owners = {}
    for worker, ids in enumerate(groups):
        for i in ids:
            assert owners.setdefault(gc.variant(cases[i]), worker) == worker


def test_every_correctness_case_the_issue_asks_for_is_there(gc: Any) -> None:
    # catches: a case dropped from the GPU check (each is one line of the issue's list)
    cases = gc.correctness_cases(small=False)
    logits = [c for c in cases if c["kind"] == "logits" and c["vocab"] == 128256]
    assert {(c["divergence"], c["temperature"]) for c in logits if c["dtype"] == "bfloat16"} == {
        (d, t) for d in gc.DIVERGENCES for t in (1.0, 2.5)}
    assert any(c.get("offset") == 1e4 for c in logits) and any(c.get("alpha") for c in logits)
    (big,) = [c for c in cases if c["kind"] == "int64"]
    assert big["n"] * big["vocab"] > 2**31
    fused = [c for c in cases if c["kind"] == "fused"]
    assert all(math.ceil(c["n"] / c["chunk"]) == 3 for c in fused) and any(c.get("autocast") for c in fused)
    assert any(c.get("autocast") for c in logits)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run stands in for a GPU: on one, run the check itself")
def test_the_dry_run_on_a_cpu_writes_every_part(tmp_path: Path) -> None:
    # catches: a part that breaks on its first run, found on the GPU machine instead of here
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--small", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "gpu-check.jsonl").read_text().splitlines()]
    ends = {r["part"]: r for r in records if r.get("event") == "end"}
    assert list(ends) == PARTS and all(r["status"] == "ok" for r in ends.values()), ends
    parts = {r["part"] for r in records if "event" not in r}
    assert parts == {"setup", "env", "correctness", "softmax", "fused", "train", "pytest"}
    cases = [r for r in records if r["part"] == "correctness" and "event" not in r]
    assert len(cases) == len({r["case"] for r in cases}) == 20
    assert all(r["status"] == "ok" for r in cases if r["case"] != 11), cases
    skipped = [r for r in records if r.get("status") == "skipped" and r["part"] != "setup" and "event" not in r]
    assert skipped and all(r["reason"].startswith("no CUDA") for r in skipped)  # CUDA-only: said so, not failed
    backends = {"softmax": {"triton", "liger", "eager", "chunked"}, "fused": {"triton", "liger", "chunked"}}
    for part, names in backends.items():
        assert {r["backend"] for r in records if r["part"] == part and "backend" in r} == names
    assert {r["fused"] for r in records if r["part"] == "train" and r["status"] == "ok"} == {False, True}
    assert next(r for r in records if r["part"] == "pytest" and "event" not in r)["counts"]["passed"] > 0
    (result,) = out.glob("gpu-check-small-*.json")
    data = json.loads(result.read_text())
    assert data["command"] == f"bash bench/gpu_check.sh --small {out}" and data["device"].startswith("cpu: ")
    assert {"python", "torch", "transformers", "triton", "hkd", "liger_kernel"} <= set(data["versions"])
    summary = (out / "summary.txt").read_text()
    assert "correctness vs fp64" in summary and "training step" in summary and "kernel tests: ok: " in summary
    assert len(list(out.iterdir())) <= 8  # what the GPU machine sends back: at most 8 files
