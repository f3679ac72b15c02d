"""The teacher on its own torchrun ranks (``teacher.placement: ranks``, hkd/train/placement.py).

Under torchrun (gloo, CPU, one thread per process so both sides compute alike) from the repo root:
1 student rank + 1 teacher rank equal one colocated process bit for bit (losses and final student),
the student process never opens or builds the teacher's weights, a teacher rank that dies is named
and ``--resume`` continues bit-exact, and a signalled stop is agreed on by every rank.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hkd.config import Config, ConfigError, from_dict
from hkd.models.view import ModelView, SparseTargets, TapRequest
from hkd.teachers.ranked import decode_view, encode_view, pack, unpack
from hkd.train.placement import layout
from tests.conftest import BASE_CONFIG, REPO_ROOT


def ranked_config(**teacher: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE_CONFIG)  # attention (q/k/v), hidden states and full logits, 2 micro-batches a step
    raw["schedule"]["phases"][2]["steps"] = 3
    raw["train"].update(checkpoint_every=3, device="cpu")
    raw["teacher"].update(placement="ranks", **teacher)
    return raw


def colocated(raw: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for key in ("placement", "ranks", "transfer", "top_k", "run_ahead", "timeout_s"):
        raw["teacher"].pop(key, None)
    return raw


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ, OMP_NUM_THREADS="1", **extra)  # the same threads on both sides: the same bits
    out.pop("HKD_DEBUG", None)
    return out


def hkd(raw: dict[str, Any], out: Path, tmp: Path, *, procs: int = 2, probe: bool = False, resume: bool = False,
        timeout: int = 300, **extra: str) -> subprocess.CompletedProcess[str]:
    config = tmp / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    module = "tests.ranked_probe" if probe else "hkd.cli"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    cmd = launcher + ["-m", module, "distill", str(config), "--out", str(out), "--no-progress"] \
        + (["--resume"] if resume else [])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(**extra), cwd=REPO_ROOT)


def losses(run: Path) -> list[tuple[int, float, float]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["loss"], m["grad_norm"]) for m in lines]


def same_student(a: Path, b: Path) -> bool:
    left, right = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The colocated run: one process, the same config without placement."""
    tmp = tmp_path_factory.mktemp("colocated")
    proc = hkd(colocated(ranked_config()), tmp / "colocated", tmp, procs=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "colocated"


# --------------------------------------------------------------------------- under torchrun


@pytest.mark.slow
def test_ranked_teacher_equals_colocated_and_students_never_hold_it(reference, tmp_path):
    # catches: a ranked view that differs from the colocated one in any bit (a wrong layer, q/k/v or mask,
    # a dtype cast, a micro-batch sent to the wrong step), and a student process that loads the teacher
    proc = hkd(ranked_config(), tmp_path / "ranked", tmp_path, probe=True, HKD_PROBE_DIR=str(tmp_path / "probe"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "ranked") == losses(reference)  # == on floats: bit for bit
    assert same_student(tmp_path / "ranked", reference)
    student = json.loads((tmp_path / "probe" / "rank0.json").read_text())
    teacher = json.loads((tmp_path / "probe" / "rank1.json").read_text())
    teacher_dir = str((tmp_path / "ranked" / "models" / "teacher").resolve())
    assert any(p.startswith(teacher_dir) for p in teacher["opened"])  # the probe sees weight loads
    assert not any(p.startswith(teacher_dir) for p in student["opened"]), student["opened"]
    assert student["teacher_weightless"] is True  # the students' teacher is its architecture on meta only
    assert student["forwards"] == 0 and teacher["forwards"] == 14  # 7 steps x 2 micro-batches, each once


@pytest.mark.slow
def test_dead_teacher_rank_is_named_and_resume_is_exact(reference, tmp_path):
    # catches: a student that hangs or dies with a bare traceback when its teacher rank dies, and a resume
    # whose teacher ranks start from step 0 (or a shifted micro-batch) instead of the checkpoint's step
    run = tmp_path / "crash"
    proc = hkd(ranked_config(), run, tmp_path, probe=True, HKD_PROBE_DIE_AT="9")  # step 5's first micro-batch
    assert proc.returncode != 0
    assert "hkd: error: teacher rank 1 (teacher, 1 of 1) stopped answering" in proc.stderr, proc.stderr[-3000:]
    # step 3's regular checkpoint; with step 4's micro-batches already sent ahead (run_ahead), the students may
    # also finish step 4 before torchrun's signal arrives and checkpoint it on the way out: timing, not a bug
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert saved in (["step-00000003"], ["step-00000003", "step-00000004"]), saved
    proc = hkd(ranked_config(), run, tmp_path, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(run) == losses(reference)
    assert same_student(run, reference)


@pytest.mark.slow
def test_signalled_students_and_teacher_stop_together(reference, tmp_path):
    # catches: a teacher rank that keeps computing (or blocks sending) after the students stopped, so the
    # job hangs or the teacher exits with an error; and a resume after such a stop that is not exact
    run = tmp_path / "stopped"
    proc = hkd(ranked_config(), run, tmp_path, probe=True, HKD_PROBE_STOP_AFTER="4",
               HKD_PROBE_DIR=str(tmp_path / "probe"))
    assert "hkd: stopped by signal after step 4" in proc.stderr, proc.stderr[-3000:]
    assert "hkd: error" not in proc.stderr, proc.stderr[-3000:]  # the teacher rank ended cleanly too
    teacher = json.loads((tmp_path / "probe" / "rank1.json").read_text())
    assert teacher["forwards"] <= 2 * 4 + 2 + 1  # at most run_ahead (2) + 1 micro-batches beyond the students
    proc = hkd(ranked_config(), run, tmp_path, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(run) == losses(reference)
    assert same_student(run, reference)


OTHER_TEACHER = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
                 "num_key_value_heads": 2}


@pytest.mark.slow
def test_two_teachers_each_on_its_own_rank_equal_colocated(tmp_path):
    # catches: views of one teacher handed to the other's stages, or a second teacher whose plan (segments)
    # or receiver is wired to the first teacher's ranks
    raw = ranked_config()
    raw["teachers"] = [{"preset": "tiny-llama", "preset_overrides": OTHER_TEACHER, "seed": 7, "weight": 3.0,
                        "placement": "ranks"}]
    raw["stages"]["logits"] = {"alpha": 0.2, "teachers": "mixture"}
    ranked = hkd(raw, tmp_path / "ranked", tmp_path, procs=3)
    assert ranked.returncode == 0, ranked.stderr[-3000:]
    raw_colocated = colocated(raw)
    raw_colocated["teachers"][0].pop("placement")
    single = hkd(raw_colocated, tmp_path / "colocated", tmp_path, procs=1)
    assert single.returncode == 0, single.stderr[-3000:]
    assert losses(tmp_path / "ranked") == losses(tmp_path / "colocated")
    assert same_student(tmp_path / "ranked", tmp_path / "colocated")


@pytest.mark.slow
def test_two_student_ranks_and_two_teacher_ranks_equal_one_process(tmp_path):
    # catches: a teacher rank serving the wrong student rank (r % ranks), micro-batches of one student sent to
    # another, student collectives that include the teacher ranks (a hang), or gradients averaged over them
    raw = ranked_config(ranks=2)
    raw["train"]["checkpoint_every"] = 0
    ranked = hkd(raw, tmp_path / "ranked", tmp_path, procs=4)  # 2 student ranks x 2 micro-batches
    assert ranked.returncode == 0, ranked.stderr[-3000:]
    single_raw = colocated(raw)
    single_raw["optim"]["grad_accum"] = 4  # one process, the same 4 micro-batches per step
    single = hkd(single_raw, tmp_path / "single", tmp_path, procs=1)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = losses(tmp_path / "ranked"), losses(tmp_path / "single")
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == list(range(1, 8))
    for (_, loss_a, _), (_, loss_b, _) in zip(a, b):  # all-reduce order: equal up to float rounding
        assert loss_a == pytest.approx(loss_b, rel=1e-5, abs=1e-7)
    left = load_file(tmp_path / "ranked" / "final" / "model.safetensors")
    right = load_file(tmp_path / "single" / "final" / "model.safetensors")
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_topk_transfer_equals_the_offline_cache_of_the_same_k(tmp_path):
    # catches: top-k targets that differ from the cache's (other rows, a log-normaliser at another
    # temperature, values after a cast), or full logits sent although transfer: topk
    from hkd.teachers.cache import build_cache

    raw = colocated(ranked_config())
    raw["schedule"]["phases"] = [{"name": "feature", "steps": 2, "stages": {"hidden": 1.0}},
                                 {"name": "decision", "steps": 3, "stages": {"hidden": 0.5, "logits": 1.0}}]
    raw["schedule"]["temperature"] = {"kind": "constant", "start": 2.0}
    raw["train"]["checkpoint_every"] = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the teacher's targets as the cache holds them (built beside its preset teacher)
        build_cache(from_dict(Config, copy.deepcopy(raw)), tmp_path / "cache", top_k=8, work_dir=tmp_path / "cached",
                    progress=False)
    finally:
        torch.set_num_threads(threads)
    cached = dict(copy.deepcopy(raw), teacher_cache=str(tmp_path / "cache"))
    proc = hkd(cached, tmp_path / "cached", tmp_path, procs=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranked = copy.deepcopy(raw)
    ranked["teacher"].update(placement="ranks", transfer="topk", top_k=8)
    proc = hkd(ranked, tmp_path / "ranked", tmp_path, probe=True, HKD_PROBE_DIR=str(tmp_path / "probe"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(tmp_path / "ranked"), losses(tmp_path / "cached")
    for (step_a, loss_a, _), (step_b, loss_b, _) in zip(a, b):  # equal bits here; the cache batches the
        assert step_a == step_b and loss_a == pytest.approx(loss_b, rel=1e-6)  # teacher differently, so 1e-6
    left = load_file(tmp_path / "ranked" / "final" / "model.safetensors")
    right = load_file(tmp_path / "cached" / "final" / "model.safetensors")
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- refused by name, no torchrun


@pytest.mark.parametrize("change, key", [
    (lambda raw: raw["train"].update(parallel="fsdp"), "train.parallel"),
    (lambda raw: raw["eval"].update(every=2) if "eval" in raw else raw.update(eval={"every": 2}), "eval.every"),
    (lambda raw: raw.update(teacher_cache="/nowhere"), "teacher_cache"),
    (lambda raw: raw.update(teachers=[{"preset": "tiny-llama", "seed": 3}]), "teacher.placement"),
])
def test_unsupported_combinations_are_refused_by_key(change, key):
    # catches: a combination the ranked teacher does not run starting anyway (hanging torchrun, or wrong results)
    raw = ranked_config()
    change(raw)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        layout(from_dict(Config, raw), world=2, rank=0)


def test_world_without_a_student_rank_is_refused():
    # catches: a job where every rank is a teacher rank (or more teacher ranks than students to serve)
    with pytest.raises(ConfigError, match=r"teacher\.ranks: 1 teacher rank\(s\) leave no student rank.*WORLD_SIZE=1"):
        layout(from_dict(Config, ranked_config()), world=1, rank=0)
    with pytest.raises(ConfigError, match=r"teacher\.ranks: 2 teacher ranks for 1 student rank"):
        layout(from_dict(Config, ranked_config(ranks=2)), world=3, rank=0)
    lay = layout(from_dict(Config, ranked_config(ranks=2)), world=5, rank=4)
    assert (lay.students, lay.teachers, lay.teacher) == (3, [[3, 4]], (0, 1))
    assert lay.served(0, 1) == [1] and lay.serving(0, 2) == 3


def test_placement_keys_need_placement_ranks():
    # catches: teacher.ranks or teacher.transfer silently ignored on a colocated teacher
    raw = colocated(ranked_config())
    raw["teacher"]["transfer"] = "topk"
    with pytest.raises(ConfigError, match=r"teacher\.transfer: applies to teacher\.placement: ranks"):
        from_dict(Config, raw)


# --------------------------------------------------------------------------- the wire


def test_pack_round_trip_keeps_bits_and_dtypes():
    # catches: a payload offset that misaligns a later tensor or a dtype that comes back reinterpreted
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int32), "c": torch.tensor([True, False]),
               "d": torch.randn(2, 3).to(torch.bfloat16), "e": torch.arange(4, dtype=torch.int64)}
    buffer = pack(list(tensors.values()), torch.device("cpu"))
    specs = [[k, str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()]
    back = unpack(buffer, specs)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_topk_view_matches_the_cache_layout():
    # catches: top-k rows scattered to other positions than the cache's (loss_mask, row-major), a missing
    # log-normaliser, or logits sent in full when only top-k was asked
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    batch = {"loss_mask": mask, "input_ids": torch.zeros(2, 5, dtype=torch.long)}
    request = TapRequest(sparse_logits=True, sparse_logsumexp=True)
    meta, tensors = encode_view(ModelView(logits=logits), batch, request, top_k=3, temperature=2.0)
    assert "logits" not in tensors and tensors["topk_values"].shape == (5, 3)
    view = decode_view(meta, tensors, batch, request)
    sparse = view.sparse
    assert isinstance(sparse, SparseTargets) and sparse.temperature == 2.0 and view.logits is None
    top = logits[mask].topk(3, dim=-1)
    assert torch.equal(sparse.values[mask], top.values) and torch.equal(sparse.ids[mask], top.indices)
    assert torch.equal(sparse.values[~mask], torch.zeros(5, 3))
    assert sparse.logsumexp is not None
    torch.testing.assert_close(sparse.logsumexp[mask], (logits[mask] / 2.0).logsumexp(-1), rtol=0, atol=0)
