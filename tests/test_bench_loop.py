"""bench/loop.py: both loops train the same models on the same batches, and the result file is complete."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import load_bench_script


@pytest.mark.parametrize("fused", [False, True])
def test_bare_loop_computes_the_same_update_as_train_step(tmp_path, fused):
    # catches: a baseline doing less (or other) work than the hkd step it is compared with (fused LM head too)
    bench = load_bench_script("loop")
    args = bench.argparse.Namespace(hidden=32, layers=2, batch_size=2, length=24, precision="fp32", fused=fused,
                                    vocab=300 if fused else None)
    config = bench.make_config(args, "cpu")
    assert config.stages["logits"]["fused"] is fused
    ours = bench.build_run(config, tmp_path / "a")
    bare = bench.build_run(config, tmp_path / "b")
    metrics = bench.train_step(ours, 0)
    bench.bare_step(bare, 0)
    assert metrics["loss/logits"] > 0
    for a, b in zip(ours.student.parameters(), bare.student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_result_file_has_both_rates_and_the_overhead(tmp_path, capsys):
    bench = load_bench_script("loop")
    out = tmp_path / "loop.json"
    assert bench.main(["--hidden", "32", "--layers", "2", "--batch-size", "2", "--length", "24", "--steps", "1",
                       "--rounds", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["tokens_per_s"]) == {"hkd", "bare"} and all(v > 0 for v in result["tokens_per_s"].values())
    assert result["overhead"] == pytest.approx(result["tokens_per_s"]["bare"] / result["tokens_per_s"]["hkd"] - 1)
    assert "overhead" in capsys.readouterr().out


def test_vocab_and_student_size_reach_the_models(tmp_path):
    # catches: --vocab / --student-* flags that the GPU check passes but the models never get, or models
    # written again for the second run (minutes at a billion parameters)
    bench = load_bench_script("loop")
    args = bench.argparse.Namespace(hidden=32, layers=4, student_hidden=16, student_layers=1, vocab=1000,
                                    batch_size=2, length=24, precision="fp32", fused=True)
    models = bench.write_models(args, tmp_path / "models")
    written = (tmp_path / "models" / "student" / "model.safetensors").stat().st_mtime_ns
    assert bench.write_models(args, tmp_path / "models") == models  # the same recipe: kept, not written again
    assert (tmp_path / "models" / "student" / "model.safetensors").stat().st_mtime_ns == written
    run = bench.build_run(bench.make_config(args, "cpu", models), tmp_path / "run")
    student, teacher = run.student.config, run.teachers[0].model.config
    assert (student.vocab_size, teacher.vocab_size) == (1000, 1000)
    assert (student.hidden_size, student.num_hidden_layers, teacher.hidden_size, teacher.num_hidden_layers) == (
        16, 1, 32, 4)
