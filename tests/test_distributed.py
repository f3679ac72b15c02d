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


def _torchrun(raw, out, tmp_path, env):
    config_path = tmp_path / f"{out.name}.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "hkd.cli", "distill", str(config_path), "--out", str(out), "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)


def _lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final_state(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("suite", ["decoder", "teachers", "encoder"])
def test_every_stage_on_two_ranks_under_ddp_and_fsdp_matches_one_process(suite, tmp_path, subprocess_env):
    # catches: a stage that breaks or drifts under data parallelism or FSDP2 sharding: the fused LM head on
    # sharded head weights, the on-policy copy refreshed with copy_ from shards, samples or MLM masks seeded by
    # the rank (so 2 ranks drew other samples than 1 process), several teachers sharded, the uld teacher's own
    # forward, the sentence and mlm stages on encoders -- each phase 2 steps; 2 ranks x 1 micro-batch against
    # 1 process x 2 micro-batches, losses every step and the final student
    from tests.stage_runs import SUITES, suite_config

    raw = suite_config(suite, tmp_path / "files")
    runs = {}
    for parallel in ("ddp", "fsdp"):
        raw["train"]["parallel"] = parallel
        proc = _torchrun(raw, tmp_path / parallel, tmp_path, subprocess_env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[parallel] = _lines(tmp_path / parallel)
    raw["optim"]["grad_accum"] = 2
    raw["train"]["parallel"] = "ddp"
    distill(from_dict(Config, raw), tmp_path / "single")
    single = _lines(tmp_path / "single")
    # the RL stage samples prompts_per_step prompts per rank (its documented contract), so 2 ranks see other
    # prompts than 1 process: its phase (the last) is compared between DDP and FSDP only
    rl_steps = {line["step"] for line in single if "loss/rl" in line}
    assert len(single) == 2 * len(SUITES[suite][0]) == len(runs["ddp"]) == len(runs["fsdp"])
    for ddp, fsdp, one in zip(runs["ddp"], runs["fsdp"], single):
        assert ddp["tokens"] == fsdp["tokens"] == one["tokens"]
        assert fsdp["loss"] == pytest.approx(ddp["loss"], rel=1e-4, abs=1e-6), (ddp, fsdp)
        if one["step"] not in rl_steps:
            assert ddp["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-6), (ddp, one)
    ddp_state, fsdp_state = _final_state(tmp_path / "ddp"), _final_state(tmp_path / "fsdp")
    assert ddp_state.keys() == fsdp_state.keys()
    for key in ddp_state:
        torch.testing.assert_close(fsdp_state[key], ddp_state[key], rtol=1e-4, atol=1e-5, msg=key)
    if not rl_steps:
        one_state = _final_state(tmp_path / "single")
        for key in one_state:
            torch.testing.assert_close(ddp_state[key], one_state[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_a_tied_student_under_fsdp_is_refused_by_name(tmp_path, subprocess_env):
    # catches: FSDP silently untying a student's head from its embeddings (the body's units replace the embedding
    # parameter, the head keeps training the old tensor): the run must stop at start-up naming train.parallel
    from tests.stage_runs import suite_config

    from transformers import BertForMaskedLM

    from hkd.models.loading import wordpiece_tokenizer

    raw = suite_config("encoder", tmp_path / "files", parallel="fsdp")

    student = BertForMaskedLM.from_pretrained(raw["student"]["path"])
    student.config.tie_word_embeddings = True
    student.tie_weights()
    student.save_pretrained(tmp_path / "tied")
    wordpiece_tokenizer().save_pretrained(tmp_path / "tied")
    raw["student"]["path"] = str(tmp_path / "tied")
    proc = _torchrun(raw, tmp_path / "tied-run", tmp_path, subprocess_env)
    assert proc.returncode != 0
    assert "train.parallel: fsdp: the student (BertForMaskedLM) ties its output head" in proc.stderr
    assert not (tmp_path / "tied-run" / "metrics.jsonl").exists()


def test_fsdp_refusal_names_only_a_tied_student():
    # catches: a refusal that misses tied heads (BERT's decoder, tie_word_embeddings) or refuses untied ones
    from hkd.models.loading import build_preset
    from hkd.train.distributed import fsdp_refusal

    untied = build_preset("tiny-llama", {"num_hidden_layers": 1}, seed=0)
    tied = build_preset("tiny-llama", {"num_hidden_layers": 1, "tie_word_embeddings": True}, seed=0)
    assert fsdp_refusal(untied) is None and fsdp_refusal(build_preset("tiny-bert", {"num_hidden_layers": 1})) is None
    assert "train.parallel: fsdp" in (fsdp_refusal(tied) or "")


def test_clipping_sharded_gradients_reads_nothing_on_the_host(monkeypatch):
    # catches: clip_gradients calling .item() per FSDP-sharded gradient (a device sync each on a GPU), or
    # scaling a shard by the wrong factor
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from hkd.train.distributed import clip_gradients

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain, sharded = torch.nn.Linear(4, 3), torch.nn.Linear(4, 5)
        fully_shard(sharded)
        loss = plain(torch.ones(2, 4)).pow(2).sum() * 10 + sharded(torch.ones(2, 4)).pow(2).sum() * 10
        loss.backward()
        grads = [(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                 for p in (*plain.parameters(), *sharded.parameters())]
        expected_norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))
        reads = []
        for name in ("item", "tolist", "__float__", "__bool__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: reads.append(_n) or _o(self, *a))
        norm = clip_gradients([*plain.parameters(), *sharded.parameters()], max_norm=1.0)
        monkeypatch.undo()
        assert reads == []
        torch.testing.assert_close(norm, expected_norm)
        clipped = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                   for p in (*plain.parameters(), *sharded.parameters())]
        for got, want in zip(clipped, grads):
            torch.testing.assert_close(got, want / (expected_norm + 1e-6))
    finally:
        dist.destroy_process_group()
