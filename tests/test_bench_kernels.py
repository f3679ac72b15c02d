"""bench/kernel_speed.py: the fused_linear op's loss check, worker rows and table (tiny shapes, in-process)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import load_bench_script


@pytest.fixture(scope="module")
def bench() -> Any:
    return load_bench_script("kernel_speed")


def test_fused_backends_agree_with_eager(bench: Any) -> None:
    checks = bench.fused_check(["eager", "torch", "chunked", "no-such-backend"], 40, 16, 300, "float32")
    ref = checks["eager"]["loss"]
    assert ref > 0
    for backend in ("torch", "chunked"):
        assert checks[backend]["loss"] == pytest.approx(ref, rel=1e-5)
    assert "no-such-backend" in checks["no-such-backend"]["error"]


def test_fused_worker_row(bench: Any) -> None:
    row = bench.fused_worker("chunked", 40, 16, 300, "float32", 1)
    assert {k: row[k] for k in ("backend", "N", "H", "V", "dtype")} == {
        "backend": "chunked", "N": 40, "H": 16, "V": 300, "dtype": "float32"}
    assert row["input_bytes"] == 4 * (2 * 40 * 16 + 2 * 300 * 16)
    assert row["time_s"] > 0
    assert row["loss"] == pytest.approx(bench.fused_check(["eager"], 40, 16, 300, "float32")["eager"]["loss"], rel=1e-5)


def test_mismatched_loss_is_not_timed(bench: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "check_one", lambda backends, shape, dtype: {
        "eager": {"loss": 1.0}, "chunked": {"loss": 1.01}, "liger": {"error": "RuntimeError: 0 active drivers"}})
    timed = []
    monkeypatch.setattr(bench, "run_one", lambda backend, shape, dtype, reps, op: timed.append(backend) or {
        "backend": backend, "N": shape[0], "H": shape[1], "V": shape[2], "dtype": dtype, "time_s": 1.0,
        "extra_bytes": 2**30, "input_bytes": 1, "loss": 1.0})
    rows = bench.run_fused_shape(["eager", "chunked", "liger"], (8, 4, 16), "float32", 1)
    assert timed == ["eager"]
    assert "loss check failed" in rows[1]["error"] and rows[2]["error"] == "RuntimeError: 0 active drivers"
    lines = bench.table(rows, bench.OPS["fused_linear"]).splitlines()
    assert lines[0].split()[:3] == ["N", "H", "V"]
    assert "unavailable: loss check failed" in lines[2]


def test_distill_table_format(bench: Any) -> None:
    rows = [{"backend": "eager", "N": 1024, "V": 32000, "time_s": 2.0, "extra_bytes": 2**30},
            {"backend": "chunked", "N": 1024, "V": 32000, "time_s": 1.0, "extra_bytes": 2**29},
            {"backend": "liger", "N": 1024, "V": 32000, "error": "RuntimeError: no driver"}]
    assert bench.table(rows) == (
        "     N       V  backend   time s  x eager  extra GiB  x eager\n"
        "  1024   32000    eager    2.000     1.00      1.000    1.000\n"
        "  1024   32000  chunked    1.000     0.50      0.500    0.500\n"
        "  1024   32000    liger  unavailable: RuntimeError: no driver")


def test_grid_shapes_match_the_op(bench: Any) -> None:
    assert bench.parse_grid("8192x4096x128256,2x3x4", "fused_linear") == [(8192, 4096, 128256), (2, 3, 4)]
    assert bench.parse_grid("4096x128256", "distill_loss") == [(4096, 128256)]
    with pytest.raises(ValueError, match="NxHxV"):
        bench.parse_grid("4096x128256", "fused_linear")


def test_table_compares_with_liger_when_it_ran(bench: Any) -> None:
    # catches: a table that only compares with eager (the goals are stated against Liger)
    rows = [{"backend": "eager", "N": 8, "V": 16, "time_s": 4.0, "extra_bytes": 2**30},
            {"backend": "liger", "N": 8, "V": 16, "time_s": 2.0, "extra_bytes": 2**29},
            {"backend": "triton", "N": 8, "V": 16, "time_s": 0.5, "extra_bytes": 2**29},
            {"backend": "triton", "N": 9, "V": 16, "time_s": 0.5, "extra_bytes": 2**29}]
    lines = bench.table(rows).splitlines()
    assert lines[0].split()[-1] == "liger"
    assert [line.split()[-1] for line in lines[1:]] == ["2.00", "1.00", "0.25", "-"]
