import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from hkd.config import ModelConfig
from hkd.errors import HkdError
from hkd.models.loading import check_compatible, load_model, write_preset


def test_preset_round_trips_through_from_pretrained(model_dirs, tmp_path):
    model, tokenizer = load_model(ModelConfig(path=str(model_dirs["student"])), "student")
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert tokenizer.decode(tokenizer("12+34=46", add_special_tokens=False)["input_ids"]) == "12+34=46"
    again = AutoModelForCausalLM.from_pretrained(model_dirs["student"])
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_preset_in_run_dir_is_written_once(tmp_path):
    spec = ModelConfig(preset="tiny-qwen2", preset_overrides={"num_hidden_layers": 1}, seed=3)
    first, _ = load_model(spec, "teacher", tmp_path)
    assert (tmp_path / "models" / "teacher" / "model.safetensors").is_file()
    second, _ = load_model(spec, "teacher", tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))


def test_preset_dir_from_another_recipe_is_refused_not_reused(tmp_path):
    load_model(ModelConfig(preset="tiny-llama", preset_overrides={"num_hidden_layers": 1}, seed=3), "teacher", tmp_path)
    for changed in (ModelConfig(preset="tiny-qwen2", preset_overrides={"num_hidden_layers": 1}, seed=3),
                    ModelConfig(preset="tiny-llama", preset_overrides={"num_hidden_layers": 2}, seed=3),
                    ModelConfig(preset="tiny-llama", preset_overrides={"num_hidden_layers": 1}, seed=4)):
        with pytest.raises(HkdError, match=r"teacher.preset: .*models/teacher' was written from .*tiny-llama.*"
                                            r"but the config now asks for .*use another --out directory"):
            load_model(changed, "teacher", tmp_path)


def test_half_written_preset_dir_is_rewritten(tmp_path):
    spec = ModelConfig(preset="tiny-llama", preset_overrides={"num_hidden_layers": 1}, seed=3)
    (tmp_path / "models" / "teacher").mkdir(parents=True)  # a crash before config.json was written
    (tmp_path / "models" / "teacher.tmp").mkdir()
    (tmp_path / "models" / "teacher.tmp" / "junk").write_text("x")
    model, tokenizer = load_model(spec, "teacher", tmp_path)
    assert model.config.num_hidden_layers == 1 and tokenizer is not None
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["teacher"]


def test_missing_directory_and_missing_config(tmp_path):
    with pytest.raises(HkdError, match=r"teacher\.path: model directory '.*nowhere' does not exist"):
        load_model(ModelConfig(path=str(tmp_path / "nowhere")), "teacher")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HkdError, match=r"student\.path: '.*empty' has no config\.json"):
        load_model(ModelConfig(path=str(tmp_path / "empty")), "student")


def test_pickle_only_weights_need_opt_in(model_dirs, tmp_path):
    target = tmp_path / "pickled"
    shutil.copytree(model_dirs["student"], target)
    model = AutoModelForCausalLM.from_pretrained(target)
    (target / "model.safetensors").unlink()
    torch.save(model.state_dict(), target / "pytorch_model.bin")
    with pytest.raises(HkdError, match=r"only pickle weights .* set student\.allow_pickle: true"):
        load_model(ModelConfig(path=str(target)), "student")
    loaded, _ = load_model(ModelConfig(path=str(target), allow_pickle=True), "student")
    assert torch.equal(next(loaded.parameters()), next(model.parameters()))


def test_no_weights_at_all(model_dirs, tmp_path):
    target = tmp_path / "bare"
    shutil.copytree(model_dirs["student"], target)
    (target / "model.safetensors").unlink()
    with pytest.raises(HkdError, match=r"holds no weights"):
        load_model(ModelConfig(path=str(target)), "student")


def test_vocabulary_mismatch_is_a_clear_error(model_dirs, tmp_path):
    other = write_preset("tiny-llama", tmp_path / "other", {"num_hidden_layers": 1, "vocab_size": 120})
    teacher, tt = load_model(ModelConfig(path=str(model_dirs["teacher"])), "teacher")
    student, st = load_model(ModelConfig(path=str(other)), "student")
    with pytest.raises(HkdError, match=r"vocabulary mismatch: teacher has vocab_size 100, student has 120"):
        check_compatible(teacher, student, tt, st)
