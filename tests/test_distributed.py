"""Two ranks under torchrun (gloo, CPU) equal one process with the same global batch.

``ddp`` replicates both models; ``fsdp`` shards teacher and student with FSDP2.
"""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from hkd.config import Config, from_dict
from hkd.train.loop import distill
from tests.conftest import REPO_ROOT


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_ranks_match_single_process(parallel, raw_config, tmp_path, subprocess_env):
    raw_config["train"]["parallel"] = parallel
    raw_config["schedule"]["phases"][2]["steps"] = 3
    raw_config["train"]["checkpoint_every"] = 3
    raw_config["optim"]["grad_accum"] = 1  # per rank: 2 ranks x 1 micro-batch
    raw_config["stages"]["hidden"]["log_layers"] = True  # metrics every micro-batch reports (metric/layer/...)
    config_path = tmp_path / "ddp.yaml"
    config_path.write_text(yaml.safe_dump(raw_config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "hkd.cli", "distill", str(config_path), "--out", str(tmp_path / "ddp"), "--no-progress"]
    # from the repository root, as the README runs it: no folder there may shadow a dependency's module
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]

    raw_config["optim"]["grad_accum"] = 2  # one process, the same 2 micro-batches per step
    single = distill(from_dict(Config, raw_config), tmp_path / "single")

    ddp_lines = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    single_lines = [json.loads(l) for l in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert len(ddp_lines) == len(single_lines) == 7  # rank 0 alone wrote the log
    for a, b in zip(ddp_lines, single_lines):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        # catches: metrics logged from rank 0's micro-batches only (the mean over both ranks' is one process's)
        metrics = {k for k in b if k.startswith("metric/")}
        assert {k for k in a if k.startswith("metric/")} == metrics
        for key in metrics:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert any(k.startswith("metric/layer/") for line in single_lines for k in line)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(single.final_dir).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["step-00000006", "step-00000007"]
