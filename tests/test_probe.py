"""``hkd probe``: every teacher layer x every student layer, checked against independent formulas."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from hkd.config import Config, from_dict
from hkd.errors import HkdError
from hkd.train.loop import distill
from hkd.commands.probe import linear_cka, probe
from hkd.commands.report import build_report
from hkd.cli import main


def hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA through Gram matrices and the centring matrix H (the paper's definition)."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def write_run(raw_config: dict, run_dir) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(from_dict(Config, raw_config).to_dict()))


def test_linear_cka_matches_the_gram_matrix_definition_and_its_invariances():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 8, generator=gen), torch.randn(50, 5, generator=gen)
    y = y + x[:, :5]  # related, not identical
    assert linear_cka(x, y) == pytest.approx(hsic_cka(x.double().numpy(), y.double().numpy()), rel=1e-9)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
    assert linear_cka(3.0 * x @ rotation, y) == pytest.approx(linear_cka(x, y), rel=1e-6)
    assert linear_cka(x, x) == pytest.approx(1.0)


def test_a_student_identical_to_the_teacher_matches_it_on_the_diagonal(raw_config, tmp_path):
    raw_config["student"] = copy.deepcopy(raw_config["teacher"])  # same preset, sizes and seed
    write_run(raw_config, tmp_path / "run")
    result = json.loads(probe(tmp_path / "run", step=0, batches=2, progress=False).read_text())
    cka, kl = np.array(result["hidden_cka"]), np.array(result["attention_kl"])
    assert cka.shape == (5, 5) and kl.shape == (4, 4)  # layers 0..4 / blocks 1..4
    np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.diag(kl), 0.0, atol=1e-6)
    assert (kl[~np.eye(4, dtype=bool)] > 0).all()  # different layers attend differently
    assert result["mapped"]["hidden"] == [[0, 0], [1, 1], [2, 2], [3, 3], [4, 4]]
    assert result["tokens"] > 0 and result["step"] == 0


def test_probe_reads_checkpoints_and_the_report_draws_it(raw_config, tmp_path):
    raw_config["train"]["checkpoint_every"] = 1
    distill(from_dict(Config, raw_config), tmp_path / "run")
    initial = json.loads(probe(tmp_path / "run", step=0, batches=1, progress=False).read_text())
    newest = json.loads(probe(tmp_path / "run", batches=1, progress=False).read_text())
    assert newest["step"] == 6 and newest["hidden_cka"] != initial["hidden_cka"]  # trained weights were loaded
    assert newest["mapped"] == {"hidden": [[0, 0], [1, 2], [2, 4]], "attention": [[1, 2], [2, 4]]}
    with pytest.raises(HkdError, match=r"no checkpoint for step 3 .* available: \[5, 6\] \(or 0\)"):
        probe(tmp_path / "run", step=3, progress=False)
    page = build_report(tmp_path / "run").read_text()
    assert 'id="probe_step_00000000"' in page and 'id="probe_step_00000006"' in page


def test_cli_probe_errors_are_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "hkd.cli", "probe", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "config.yaml' does not exist" in done.stderr


def test_probe_final_reads_the_finished_model_without_checkpoints(raw_config, tmp_path, capsys):
    # catches: --final probing the initial weights (or the newest checkpoint) instead of final/,
    # and a run without final/ ending in a traceback
    import shutil

    raw_config["train"]["checkpoint_every"] = 1
    distill(from_dict(Config, raw_config), tmp_path / "run")
    newest = json.loads(probe(tmp_path / "run", batches=1, progress=False).read_text())
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # what a benchmark does to save disk
    out = probe(tmp_path / "run", batches=1, progress=False, final=True)
    final = json.loads(out.read_text())
    assert out.name == "final.json" and final["final"] is True
    np.testing.assert_allclose(final["hidden_cka"], newest["hidden_cka"], atol=1e-6)  # final/ is the last step
    initial = json.loads(probe(tmp_path / "run", step=0, batches=1, progress=False).read_text())
    assert final["hidden_cka"] != initial["hidden_cka"]
    assert main(["probe", str(tmp_path / "run"), "--final", "--batches", "1", "--no-progress"]) == 0
    assert "hidden-state CKA (1 = same), final/" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "run" / "final")
    with pytest.raises(HkdError, match=r"probe --final: .*final' holds no model"):
        probe(tmp_path / "run", batches=1, progress=False, final=True)
