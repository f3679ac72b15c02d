"""hkd init-student: students cut from their teacher compute what the teacher's own code computes.

The references are the teacher's own forward passes: with the dropped blocks removed from its
module list, or on a teacher whose pruned units were made inert (zero channels, zero value
heads, zero neurons, an identity block), where removing them must change nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hkd.tasks.arith import make_problems
from hkd.cli import main
from hkd.config import ModelConfig
from hkd.errors import ConfigError, HkdError
from hkd.commands.init_student import InitOptions, init_student
from hkd.models.layermap import build_layer_map
from hkd.models.loading import load_model, write_preset

from tests.conftest import TEACHER


def _calibration(path: Path) -> Path:
    lines = [json.dumps({"prompt": p.prompt, "completion": p.worked_solution()}) for p in make_problems(64, 2, 3)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(4, 100, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model_dir: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model, _ = load_model(ModelConfig(path=str(model_dir)), "model")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_every_k_keeps_last_block_of_each_group_and_matches_teacher_without_dropped_blocks(tmp_path: Path) -> None:
    # catches: wrong block renumbering (student block s loading teacher block s), a dropped final
    # norm/LM head, an off-by-one in every:K, and a layer map that does not name the kept blocks
    teacher_dir = write_preset("tiny-llama", tmp_path / "teacher", TEACHER, seed=1)
    out = tmp_path / "student"
    assert main(["init-student", "--teacher", str(teacher_dir), "--out", str(out), "--layers", "every:2"]) == 0
    record = json.loads((out / "hkd-init.json").read_text())
    assert record["teacher_blocks"] == [1, 3]
    assert record["layer_map"] == [[0, 0], [1, 2], [2, 4]]

    teacher, _ = load_model(ModelConfig(path=str(teacher_dir)), "teacher")
    teacher.eval()
    teacher.model.layers = torch.nn.ModuleList([teacher.model.layers[1], teacher.model.layers[3]])
    for new_index, block in enumerate(teacher.model.layers):  # the KV-cache slot follows the position
        block.self_attn.layer_idx = new_index
    teacher.config.num_hidden_layers = 2
    batch = _batch()
    with torch.no_grad():
        expected = teacher(**batch).logits
    torch.testing.assert_close(_logits(out, batch), expected, rtol=0, atol=1e-6)

    # the recorded map is what stages use with strategy init (and auto); without a record, auto is uniform
    assert build_layer_map("init", 2, 4, student_dir=out) == [(1, 2), (2, 4)]
    assert build_layer_map("auto", 2, 4, include_embeddings=True, student_dir=out) == [(0, 0), (1, 2), (2, 4)]
    assert build_layer_map("auto", 2, 4, student_dir=teacher_dir) == [(1, 2), (2, 4)]
    with pytest.raises(ConfigError, match="hkd-init.json"):
        build_layer_map("init", 2, 4, student_dir=teacher_dir)


def test_pruning_removes_exactly_the_inert_units(tmp_path: Path) -> None:
    # catches: slicing rows where columns are meant (or the reverse), ranking by the wrong end
    # (keeping the least active units), mixing up query heads and key/value groups under GQA,
    # and a missing RMSNorm rescale (pruning channels changes the norm's mean over channels)
    teacher_dir = write_preset("tiny-llama", tmp_path / "teacher", TEACHER, seed=1)
    teacher, tokenizer = load_model(ModelConfig(path=str(teacher_dir)), "teacher")
    g = torch.Generator().manual_seed(5)
    dead_channels = torch.randperm(64, generator=g)[:16]
    dead_neurons = []
    with torch.no_grad():
        teacher.model.embed_tokens.weight[:, dead_channels] = 0
        for index, block in enumerate(teacher.model.layers):
            block.self_attn.o_proj.weight[dead_channels] = 0
            block.mlp.down_proj.weight[dead_channels] = 0
            block.self_attn.v_proj.weight[16:32] = 0  # key/value head 1 -> query heads 2 and 3 output zero
            neurons = torch.randperm(128, generator=g)[:64]
            block.mlp.up_proj.weight[neurons] = 0
            dead_neurons.append(set(neurons.tolist()))
            if index == 1:  # block 1 becomes the identity: it adds nothing to the residual stream
                block.self_attn.o_proj.weight.zero_()
                block.mlp.down_proj.weight.zero_()
    teacher.save_pretrained(teacher_dir)
    options = InitOptions(layers="importance:3", hidden=48, intermediate=64, heads=2,
                          data=str(_calibration(tmp_path / "calib.jsonl")), prompt_field="prompt", batches=2)
    out = init_student(teacher_dir, tmp_path / "student", options)
    record = json.loads((out / "hkd-init.json").read_text())
    assert record["teacher_blocks"] == [0, 2, 3]
    assert record["heads"] == [[0, 1]] * 3
    assert record["sizes"] == {"layers": 3, "hidden": 48, "intermediate": 64, "heads": 2, "kv_heads": 1, "head_dim": 16}
    student, _ = load_model(ModelConfig(path=str(out)), "student")
    for s, b in enumerate([0, 2, 3]):  # the kept neurons are the live ones, in the teacher's order
        kept = teacher.model.layers[b].mlp.up_proj.weight.abs().sum(1).nonzero().squeeze(1)
        assert set(kept.tolist()).isdisjoint(dead_neurons[b])
        torch.testing.assert_close(student.model.layers[s].mlp.up_proj.weight,
                                   teacher.model.layers[b].mlp.up_proj.weight[kept][:, _live(dead_channels)])
    batch = _batch()
    teacher.eval()
    with torch.no_grad():
        expected = teacher(**batch).logits
    torch.testing.assert_close(_logits(out, batch), expected, rtol=1e-4, atol=1e-4)
    assert tokenizer is not None and (out / "tokenizer.json").is_file()


def _live(dead: torch.Tensor) -> torch.Tensor:
    return torch.tensor(sorted(set(range(64)) - set(dead.tolist())))


def test_refusals_name_the_problem(tmp_path: Path) -> None:
    # catches: silently writing a model that cannot keep its sharing, GQA groups split by --heads,
    # activation-based choices made without calibration data, and overwriting a foreign directory
    teacher_dir = write_preset("tiny-llama", tmp_path / "teacher", TEACHER, seed=1)
    cases = [
        (InitOptions(share_layers=2), "ALBERT"),
        (InitOptions(heads=3), "multiple of 2"),
        (InitOptions(layers="importance:2"), "--data"),
        (InitOptions(hidden=128), "1..64"),
        (InitOptions(layers="3,1"), "increasing"),
        (InitOptions(layers="0,4"), "0-based"),
        (InitOptions(layers="every:x"), "integer"),
    ]
    for options, message in cases:
        with pytest.raises(HkdError, match=message):
            init_student(teacher_dir, tmp_path / "student", options)
    with pytest.raises(HkdError, match="not written by init-student"):
        init_student(teacher_dir, tmp_path, InitOptions(layers="every:2"))


def test_feature_and_attention_stages_map_the_layers_the_student_was_cut_from(tmp_path: Path) -> None:
    # catches: stages that ignore hkd-init.json and pair blocks uniformly (here 1->2, 2->4)
    # although the student's blocks are the teacher's blocks 1 and 3
    from hkd.plugins.attention import AttentionStage, AttentionStageConfig
    from hkd.plugins.hidden import HiddenStage, HiddenStageConfig
    from hkd.plugin.stage import StageContext

    teacher_dir = write_preset("tiny-llama", tmp_path / "teacher", TEACHER, seed=1)
    out = init_student(teacher_dir, tmp_path / "student", InitOptions(layers="0,2"))
    teacher, _ = load_model(ModelConfig(path=str(teacher_dir)), "teacher")
    student, _ = load_model(ModelConfig(path=str(out)), "student")
    context = StageContext("hidden", teacher, student, {}, "stages.hidden")
    assert HiddenStage(HiddenStageConfig(include_embeddings=True), context).layer_map == [(0, 0), (1, 1), (2, 3)]
    assert AttentionStage(AttentionStageConfig(), context).layer_map == [(1, 1), (2, 3)]
