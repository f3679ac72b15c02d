"""``hkd demo --quick`` end to end: THE SLOWEST TEST in the suite (about a minute on 2 CPU cores).

It checks the plumbing, not the quality (quick mode trains far too little for that; the full
demo and ``bench/quality.py`` measure quality): the table, ``results.json``, the per-sub-run
configs, metrics and models, the loss plot, and that a second run reuses the cached teacher.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from hkd.config import Config, from_dict
from hkd.demo import DemoSettings, prepare_data, prepare_teacher
from hkd.models import load_model
from hkd.config import ModelConfig

ROWS = ["teacher", "student: SFT on answer-only data", "student: SFT on distilled data", "student: after structure",
        "student: after feature", "student: after decision", "student: after rl"]


@pytest.mark.slow
def test_demo_quick_end_to_end_slowest(tmp_path, subprocess_env):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "hkd.cli", "demo", "--quick", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, env=subprocess_env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ROWS:  # the printed table has one line per model
        assert any(line.startswith(name) for line in proc.stdout.splitlines()), (name, proc.stdout)

    results = json.loads((out / "results.json").read_text())
    assert [row["model"] for row in results["rows"]] == ROWS
    for row in results["rows"]:
        assert 0.0 <= row["pass@1"] <= 1.0
        assert row["model"] == "teacher" or row["params_vs_teacher"] <= 0.25
        model, tokenizer = load_model(ModelConfig(path=row["path"]), "model")  # every model loads back
        assert sum(p.numel() for p in model.parameters()) == row["params"] and tokenizer is not None
    assert results["settings"] == json.loads(json.dumps(DemoSettings.quick().__dict__))

    for sub in ("teacher", "students/answer_only", "students/sft_distilled", "students/progressive_rl"):
        config = yaml.safe_load((out / sub / "config.yaml").read_text())
        from_dict(Config, config)  # a valid config: the sub-run can be repeated with hkd distill
        metrics = [json.loads(line) for line in (out / sub / "metrics.jsonl").read_text().splitlines()]
        assert metrics and all(m["loss"] == m["loss"] for m in metrics)  # no NaN
    rl_metrics = [json.loads(line) for line in (out / "students/progressive_rl/metrics.jsonl").read_text().splitlines()]
    assert {m["phase"] for m in rl_metrics} == {0, 1, 2, 3} and "metric/reward" in rl_metrics[-1]
    distilled = [json.loads(line) for line in (out / "data/distilled.jsonl").read_text().splitlines()]
    assert all(line["verdicts"]["exact_answer"]["passed"] for line in distilled)

    plot = out / "losses.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plot skipped: matplotlib is not installed" in proc.stdout
    else:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second run finds the teacher it trained and does not train it again
    stamp = out / "teacher" / "demo-teacher.json"
    before = stamp.stat().st_mtime_ns
    settings = DemoSettings.quick()
    assert prepare_teacher(settings, out, prepare_data(settings, out), progress=False) == out / "teacher" / "final"
    assert stamp.stat().st_mtime_ns == before
