"""An encoder student's final/ is a sentence-transformers model (hkd/models/export.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModel, AutoTokenizer

from hkd.config import load_config
from hkd.errors import HkdError
from hkd.models.export import export_encoder, write_sentence_transformers
from hkd.train.loop import build_run, distill
from hkd.train.run import export_options

SENTENCES = ["the teacher model encodes each sentence", "a smaller student learns",
             "similar sentences get similar vectors, and knowledge distillation transfers what a network learned"]
STUDENT = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}


def encoder_config(tmp_path: Path, **stages_and_phase) -> Path:
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES * 3))
    phase = {"name": "all", "steps": 1, "stages": {"sentence": 1.0}, **stages_and_phase.get("phase", {})}
    raw = {
        "teacher": {"preset": "tiny-bert", "preset_overrides": {"num_hidden_layers": 2}, "encoder": True, "seed": 1},
        "student": {"preset": "tiny-bert", "preset_overrides": STUDENT, "encoder": True, "seed": 2},
        "data": {"kind": "jsonl", "path": str(data), "text_field": "text", "batch_size": 3, "max_length": 20},
        "schedule": {"ramp_steps": 0, "phases": [phase]},
        "stages": stages_and_phase.get("stages", {}),
        "train": {"progress": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def final_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    return distill(load_config(encoder_config(root)), root / "run").final_dir


def test_final_holds_the_sentence_transformers_files(final_dir):
    """Catches: final/ written without modules.json / pooling config, the wrong width, or the wrong sequence length
    (format only: runs without sentence-transformers installed)."""
    assert json.loads((final_dir / "modules.json").read_text()) == [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    assert json.loads((final_dir / "sentence_bert_config.json").read_text()) == {"max_seq_length": 20,
                                                                                "do_lower_case": False}
    pooling = json.loads((final_dir / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == 32
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    assert (final_dir / "tokenizer.json").is_file() and (final_dir / "model.safetensors").is_file()


def test_pooling_is_the_one_the_run_used(tmp_path, raw_config):
    """Catches: the export ignoring stages.sentence.pooling or a phase's options overriding it (a CLS-trained model
    exported with mean pooling), and writing sentence-transformers files for a decoder student."""
    def pooling(**stages_and_phase):
        config = load_config(encoder_config(tmp_path, **stages_and_phase))
        return export_options(build_run(config, tmp_path / "run" / str(len(list(tmp_path.glob("run/*"))))))

    assert pooling(stages={"sentence": {"pooling": "cls"}}) == {"pooling": "cls"}
    assert pooling(phase={"options": {"sentence": {"pooling": "cls"}}}) == {"pooling": "cls"}
    assert pooling() == {"pooling": "mean"}
    decoder_dir = tmp_path / "decoder-final"
    decoder_dir.mkdir()
    path = tmp_path / "decoder.yaml"
    path.write_text(yaml.safe_dump(raw_config))
    export_encoder(decoder_dir, load_config(path), None, {"pooling": "cls"})
    assert list(decoder_dir.iterdir()) == []
    with pytest.raises(HkdError, match="pooling 'max' is not one of"):
        write_sentence_transformers(decoder_dir, pooling="max", hidden_size=8, max_seq_length=8)


def hand_embeddings(model_dir: Path, pooling: str) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=20, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.double()
    if pooling == "cls":
        return hidden[:, 0]
    mask = batch["attention_mask"].unsqueeze(-1).double()
    return (hidden * mask).sum(1) / mask.sum(1)


def test_sentence_transformers_loads_final_and_encodes_the_pooled_hidden_states(final_dir, tmp_path):
    """Catches: a final/ sentence-transformers cannot load, or whose encode() is not the pooling the run trained
    (e.g. CLS written for mean, or the wrong layer)."""
    st = pytest.importorskip("sentence_transformers")
    cls_dir = tmp_path / "cls"
    shutil.copytree(final_dir, cls_dir)
    write_sentence_transformers(cls_dir, pooling="cls", hidden_size=32, max_seq_length=20)
    for directory, pooling in ((final_dir, "mean"), (cls_dir, "cls")):
        model = st.SentenceTransformer(str(directory), device="cpu")
        got = model.encode(SENTENCES, convert_to_tensor=True).double()
        torch.testing.assert_close(got, hand_embeddings(directory, pooling), rtol=1e-5, atol=1e-5)


def test_the_docs_encoder_example_loads_with_typed_stage_blocks():
    """Catches: a docs example (docs/encoders.md) for the encoder stages that the config loader or the stages' dataclasses refuse."""
    import re

    from hkd.config import Config, from_dict
    from hkd.plugin.manager import build_manager
    from hkd.plugin.stage import available_stages

    page = (Path(__file__).resolve().parents[1] / "docs" / "encoders.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", page, re.S) if "mlm: {mask_rate" in b]
    raw = yaml.safe_load(block)
    from_dict(Config, raw)
    specs = available_stages(build_manager())
    for name, options in raw["stages"].items():
        from_dict(specs[name].config_cls, options, f"stages.{name}")


def test_best_is_a_sentence_transformers_model_too(tmp_path):
    # catches: best/ (the student a user is told to keep) written without the sentence-transformers
    # files that final/ gets, so it does not load where final/ does
    import yaml as _yaml

    path = encoder_config(tmp_path)
    raw = _yaml.safe_load(path.read_text())
    raw["eval"] = {"every": 1, "path": raw["data"]["path"], "metric": "loss"}
    path.write_text(_yaml.safe_dump(raw))
    distill(load_config(path), tmp_path / "run")
    best = tmp_path / "run" / "best"
    assert (best / "modules.json").is_file() and (best / "1_Pooling" / "config.json").is_file()
    assert json.loads((best / "modules.json").read_text()) == json.loads(
        (tmp_path / "run" / "final" / "modules.json").read_text())


def test_an_encoder_run_refuses_a_next_token_eval_metric(tmp_path):
    # catches: eval.metric kl on an encoder, which is never measured, so best/ is silently never written
    path = encoder_config(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["eval"] = {"every": 1, "path": raw["data"]["path"]}  # metric: kl by default
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(HkdError, match=r"eval.metric: 'kl' compares next-token distributions.*eval.metric: loss"):
        distill(load_config(path), tmp_path / "run")
