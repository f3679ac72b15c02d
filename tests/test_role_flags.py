"""Role flags that contradict the architecture are refused by name. Issue "Nothing silently wrong, on the
whole surface", class 6."""

from __future__ import annotations

import pytest
import yaml

from hkd.cli import main
from hkd.config import ModelConfig
from hkd.errors import HkdError


def one_error(capsys: pytest.CaptureFixture[str], code: int) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("hkd: error: "), lines
    return lines[0]


def test_encoder_flag_on_a_causal_lm_is_refused_by_name(model_dirs, tmp_path, raw_config, capsys):
    # catches: encoder: true on a causal LM with its head allowed away (allow_unexpected) loading as a bare
    # decoder and exporting a "sentence-transformers model" around it; also for the teacher and a cache
    from hkd.models.loading import load_model

    spec = ModelConfig(path=str(model_dirs["student"]), encoder=True, allow_unexpected=[r"lm_head\.weight"])
    with pytest.raises(HkdError, match=r"^student\.encoder: true, but '.*student' is a causal LM \(model_type "
                                       r"'llama', architectures \['LlamaForCausalLM'\]\)"):
        load_model(spec, "student")
    raw_config["student"] = {"path": str(model_dirs["student"]), "encoder": True,
                             "allow_unexpected": [r"lm_head\.weight"]}
    raw_config["schedule"]["phases"] = [{"name": "p", "steps": 1, "stages": {"hidden": 1.0}}]
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw_config))
    line = one_error(capsys, main(["distill", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]))
    assert line.startswith("hkd: error: student.encoder: true, but ")
    assert not (tmp_path / "run").exists()
    from hkd.teachers.cache import teacher_skeleton

    with pytest.raises(HkdError, match=r"^teacher\.encoder: true, but"):
        teacher_skeleton(ModelConfig(path=str(model_dirs["teacher"]), encoder=True), tmp_path, "teacher")


def test_a_bare_decoder_without_a_head_may_be_an_encoder(model_dirs, tmp_path):
    # valid-but-unusual: an embedding model saved as a bare decoder (LlamaModel, no LM head) loads as encoder
    from transformers import AutoModel

    from hkd.models.loading import load_model, load_tokenizer

    bare = AutoModel.from_pretrained(model_dirs["student"])
    bare.save_pretrained(tmp_path / "bare")
    load_tokenizer(model_dirs["student"]).save_pretrained(tmp_path / "bare")
    model, _ = load_model(ModelConfig(path=str(tmp_path / "bare"), encoder=True), "student")
    assert type(model).__name__ == "LlamaModel"
