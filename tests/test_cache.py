"""Offline teacher cache: training from it equals training from the live teacher; mismatches are refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from hkd.teachers.cache import TeacherCache, build_cache
from hkd.cli import main
from hkd.config import Config, from_dict
from hkd.errors import HkdError
from hkd.train.loop import distill
from hkd.models.loading import build_preset, char_tokenizer
from hkd.plugins.logits import LogitsStage, LogitsStageConfig
from hkd.plugin.stage import StageContext
from hkd import SparseTargets, TapRequest

VOCAB = len(char_tokenizer())


@pytest.fixture
def raw(raw_config, model_dirs):
    """Feature then decision phases (the stages a cache can serve), teacher and student from disk."""
    raw_config["teacher"] = {"path": str(model_dirs["teacher"])}
    raw_config["student"] = {"path": str(model_dirs["student"])}
    raw_config["data"] = {"kind": "synthetic", "num_examples": 12, "batch_size": 4, "max_length": 40}
    raw_config["schedule"]["phases"] = [
        {"name": "feature", "steps": 2, "stages": {"hidden": 1.0}},
        {"name": "decision", "steps": 2, "stages": {"hidden": 0.5, "logits": 1.0}},
    ]
    raw_config["schedule"]["temperature"] = {"kind": "linear", "start": 2.0, "end": 1.0}
    raw_config["optim"]["grad_accum"] = 2
    return raw_config


def cache_for(raw, path, **options):
    options = {"top_k": VOCAB, "examples_per_shard": 5, "progress": False, "work_dir": path.parent / "work"} | options
    return build_cache(from_dict(Config, copy.deepcopy(raw)), path, **options)


def final_student(result):
    return load_file(str(result.final_dir / "model.safetensors"))


def test_training_from_a_full_vocabulary_cache_equals_the_live_teacher(raw, tmp_path):
    index = cache_for(raw, tmp_path / "cache")
    meta = json.loads(index.read_text())
    assert [s["num_examples"] for s in meta["shards"]] == [5, 5, 2] and meta["layers"] == [0, 2, 4]  # embeddings + uniform map
    live = distill(from_dict(Config, raw), tmp_path / "live")
    cached = distill(from_dict(Config, dict(raw, teacher_cache=str(tmp_path / "cache"))), tmp_path / "cached")
    for key in ("loss/hidden", "loss/logits", "loss"):
        assert cached.last_metrics[key] == pytest.approx(live.last_metrics[key], rel=1e-4)
    a, b = final_student(live), final_student(cached)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "cached" / "models" / "teacher").exists()  # the teacher was never loaded or written


def test_cache_reader_keeps_few_shards_open_and_serves_stored_rows(raw, tmp_path):
    cache_for(raw, tmp_path / "cache", top_k=7)
    cache = TeacherCache(tmp_path / "cache", max_open_shards=1)
    counts = []
    for example in (0, 6, 11):  # three different shards
        _, begin, end = cache._shard(example)
        counts.append(end - begin)
    assert len(cache._open) == 1
    mask = torch.zeros(3, max(counts) + 2, dtype=torch.bool)
    for row, count in enumerate(counts):
        mask[row, 1: 1 + count] = True
    batch = {"loss_mask": mask, "example_index": torch.tensor([0, 6, 11])}
    view = cache.view(batch, TapRequest(hidden={4}, sparse_logits=True))
    sparse = {"teacher_topk_values": view.sparse.values, "teacher_topk_ids": view.sparse.ids}
    shard = load_file(str(tmp_path / "cache" / "shard-00002.safetensors"))
    begin, end = shard["offsets"][1].item(), shard["offsets"][2].item()  # example 11 = shard 2, local 1
    torch.testing.assert_close(sparse["teacher_topk_values"][2, 1: 1 + counts[2]], shard["topk_values"][begin:end])
    assert torch.equal(sparse["teacher_topk_ids"][2, 1: 1 + counts[2]], shard["topk_ids"][begin:end].long())
    assert view.hidden_states[4].shape == (3, mask.shape[1], 64) and view.hidden_states[2] is None
    assert sparse["teacher_topk_values"][:, 0].abs().sum() == 0 and len(cache._open) == 1


@pytest.mark.parametrize("change,named", [
    (lambda r: r["teacher"].update(path=None, preset="tiny-llama", preset_overrides={"intermediate_size": 96}),
     "built for a different setup: teacher config"),
    (lambda r: r["data"].update(num_examples=11), "built for a different setup: data"),
    # checked for every TapRequest field: the stage and what is missing are named
    (lambda r: r["stages"]["hidden"].update(layer_map={"strategy": "explicit", "pairs": [[1, 1], [2, 3]]}),
     r"stage 'hidden' needs the teacher's hidden \(layers \[1, 3\] \(available: \[0, 2, 4\]\)\)"),
])
def test_a_cache_for_another_setup_is_refused_naming_the_difference(raw, tmp_path, change, named):
    cache_for(raw, tmp_path / "cache")
    changed = copy.deepcopy(raw)
    change(changed)
    changed["teacher_cache"] = str(tmp_path / "cache")
    with pytest.raises(HkdError, match=named):
        distill(from_dict(Config, changed), tmp_path / "run")


def test_other_weights_and_unfinished_caches_are_refused(raw, tmp_path, model_dirs):
    cache_for(raw, tmp_path / "cache")
    other = tmp_path / "teacher2"
    other.mkdir()
    for f in model_dirs["teacher"].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(other / "model.safetensors"))
    weights["lm_head.weight"] += 0.01
    from safetensors.torch import save_file

    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    changed = dict(copy.deepcopy(raw), teacher_cache=str(tmp_path / "cache"))
    changed["teacher"] = {"path": str(other)}
    with pytest.raises(HkdError, match="teacher weights differ"):
        distill(from_dict(Config, changed), tmp_path / "run")
    (tmp_path / "cache" / "index.json").unlink()
    with pytest.raises(HkdError, match="has no index.json"):
        TeacherCache(tmp_path / "cache")


def test_sparse_targets_are_renormalised_within_the_top_k():
    model = build_preset("tiny-llama", {"num_hidden_layers": 1})
    stage = LogitsStage(LogitsStageConfig(alpha=0.0), StageContext("logits", model, model, {}, "stages.logits"))
    torch.manual_seed(0)
    student_logits, teacher_logits = torch.randn(2, 3, VOCAB), torch.randn(2, 3, VOCAB)
    labels = torch.tensor([[5, -100, 7], [8, 9, -100]])
    values, ids = teacher_logits.topk(4, dim=-1)
    # the view's targets sit one position left of the student logits they are compared with
    targets = SparseTargets(torch.nn.functional.pad(ids, (0, 0, 0, 1)), torch.nn.functional.pad(values, (0, 0, 0, 1)))
    loss = stage.sparse_loss(student_logits, targets, labels, temperature=2.0)
    keep = labels != -100
    p = (values[keep] / 2).softmax(-1).double()
    log_q = (student_logits[keep] / 2).double().log_softmax(-1).gather(-1, ids[keep])
    expected = 4 * (p * (p.log() - log_q)).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    offline = StageContext("logits", model, model, {}, "stages.logits", teacher_serves=TapRequest(sparse_logits=True))
    with pytest.raises(HkdError, match="top-k logits only, so use forward_kl"):
        LogitsStage(LogitsStageConfig(divergence="jsd"), offline)


def test_cli_cache_teacher_and_attention_stage_refusal(raw, tmp_path, capsys):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(dict(raw, teacher_cache="cache")))
    assert main(["cache-teacher", str(path), "--top-k", "5", "--no-hidden", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert meta["top_k"] == 5 and meta["layers"] == [] and "teacher cache written" in capsys.readouterr().out
    raw["schedule"]["phases"][0]["stages"] = {"attention": 1.0}
    path.write_text(yaml.safe_dump(raw))
    assert main(["cache-teacher", str(path), "--out", str(tmp_path / "c2"), "--no-progress"]) == 2
    assert "needs the teacher's attention" in capsys.readouterr().err
