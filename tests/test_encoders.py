"""Encoders as first-class models: BERT special tokens, encoder detection, the tiny-bert preset's tokenizer,
init-config for encoder pairs, and the hidden stage's scale-free losses (issue 17)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from hkd.config import DataConfig, ModelConfig, load_config
from hkd.data.encoding import Batches, encode, encode_dataset
from hkd.errors import HkdError
from hkd.commands.init_config import read_shape, relation_heads, starter_config, write_starter_config
from hkd.models.loading import build_preset, char_tokenizer, load_model, wordpiece_tokenizer, write_preset
from hkd.plugins.hidden import HiddenStage, HiddenStageConfig
from hkd.plugin.stage import StepState
from hkd.models.view import ModelView
from tests.plugins.helpers import context, models


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return write_preset("tiny-bert", tmp_path_factory.mktemp("bert") / "bert", {"num_hidden_layers": 2}, seed=0)


# --------------------------------------------------------------------------- special tokens


def test_bert_text_is_encoded_with_cls_and_sep(bert_dir):
    """Catches: BERT text encoded with bos/eos (which BERT's tokenizer lacks), i.e. with no [CLS]/[SEP] at all."""
    tok = AutoTokenizer.from_pretrained(bert_dir)
    assert tok.bos_token_id is None and tok.eos_token_id is None
    ids, labels = encode(tok, "", "the student learns", 64)
    assert ids == tok("the student learns")["input_ids"]  # exactly what the tokenizer itself produces
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and len(ids) > 2
    assert labels == [-100] + ids[1:]  # like bos, [CLS] is no target; the encoder's loss mask is the attention mask


def test_truncation_keeps_the_final_sep(bert_dir):
    """Catches: truncating [CLS] text [SEP] to max_length by cutting off [SEP] with the tail of the text."""
    tok = AutoTokenizer.from_pretrained(bert_dir)
    text = "knowledge distillation transfers what a large network has learned into a compact one " * 4
    for max_length in (4, 7, 16):
        ids, labels = encode(tok, "", text, max_length)
        assert len(ids) == len(labels) == max_length
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert tok.sep_token_id not in ids[:-1]


def test_encoder_jsonl_batches_start_with_cls_and_end_with_sep(bert_dir, tmp_path):
    """Catches: the data path (encode_dataset -> Batches) dropping the special tokens for an encoder."""
    tok = AutoTokenizer.from_pretrained(bert_dir)
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a short one", "a somewhat longer sentence here"]))
    config = DataConfig(kind="jsonl", path=str(data), batch_size=2, max_length=32, shuffle=False)
    batch = Batches(encode_dataset(tok, config, 0), config, tok.pad_token_id, 0, causal=False).batch(0)
    lengths = batch["attention_mask"].sum(1)
    assert (batch["input_ids"][:, 0] == tok.cls_token_id).all()
    assert [int(batch["input_ids"][row, n - 1]) for row, n in enumerate(lengths.tolist())] == [tok.sep_token_id] * 2
    assert torch.equal(batch["loss_mask"], batch["attention_mask"].bool())


def test_causal_tokenizers_keep_bos_and_eos():
    """Catches: the encoder path firing for a decoder's tokenizer (no mask token), which must stay [bos] .. [eos]."""
    tok = char_tokenizer()
    ids, labels = encode(tok, "1+2=", "3", 16)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and labels[:5] == [-100] * 5


# --------------------------------------------------------------------------- encoder detection


def test_a_bert_without_encoder_true_is_refused_by_name(bert_dir):
    """Catches: a BERT loaded as a causal LM (random LM head) that later dies with "no attribute last_hidden_state"."""
    with pytest.raises(HkdError, match=r"teacher: .* is an encoder \(model_type 'bert'.*set teacher\.encoder: true"):
        load_model(ModelConfig(path=str(bert_dir)), "teacher")
    model, tok = load_model(ModelConfig(path=str(bert_dir), encoder=True), "teacher")
    assert type(model).__name__ == "BertModel" and tok.cls_token_id is not None


# --------------------------------------------------------------------------- tiny-bert preset


def test_tiny_bert_preset_writes_a_wordpiece_tokenizer_with_bert_specials(bert_dir):
    """Catches: tiny-bert written with the decoders' character tokenizer (bos/eos, no [CLS]/[SEP]/[MASK])."""
    tok = AutoTokenizer.from_pretrained(bert_dir)
    assert [tok.pad_token, tok.cls_token, tok.sep_token, tok.mask_token] == ["[PAD]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = tok.convert_ids_to_tokens(tok("Hello students")["input_ids"])
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and any(p.startswith("##") for p in pieces)
    assert tok.unk_token_id not in tok("Any ASCII: ~{}|`^ 0123!")["input_ids"]
    config = json.loads((bert_dir / "config.json").read_text())
    assert config["vocab_size"] == len(tok) and config["pad_token_id"] == tok.pad_token_id


def test_tiny_bert_vocabulary_is_the_same_every_time():
    """Catches: a trained vocabulary whose ties break differently per run, so two presets could not be paired."""
    assert wordpiece_tokenizer().get_vocab() == wordpiece_tokenizer().get_vocab()
    assert build_preset("tiny-bert").config.vocab_size == len(wordpiece_tokenizer())


# --------------------------------------------------------------------------- init-config for encoders


def bert_config(path: Path, layers: int, width: int, heads: int) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertModel"], "num_hidden_layers": layers, "hidden_size": width,
        "num_attention_heads": heads, "vocab_size": 30522}))
    return path


def test_encoder_starter_config_has_text_data_no_temperature_and_many_relation_heads(tmp_path):
    """Catches: arithmetic data and an unused temperature in an encoder config, and relation heads capped at the
    smaller attention-head count (MiniLMv2 splits q/k/v into more relation heads than there are heads)."""
    teacher = bert_config(tmp_path / "minilm", 6, 384, 12)  # all-MiniLM-L6-v2's shape
    student = bert_config(tmp_path / "student", 3, 192, 6)
    assert relation_heads(read_shape(teacher, "teacher"), read_shape(student, "student")) == 24  # 192 / 24 = 8 wide
    out = write_starter_config(teacher, student, tmp_path / "project" / "encoder.yaml")
    raw = yaml.safe_load(out.read_text())
    assert raw["data"]["kind"] == "jsonl" and "temperature" not in raw["schedule"]
    assert raw["stages"]["attention"]["relation_heads"] == 24 and raw["teacher"]["encoder"] is True
    config = load_config(out)
    assert Path(config.data.path) == (tmp_path / "project" / "data.jsonl")  # relative to the file, not the cwd


def test_printed_starter_config_uses_absolute_model_paths(tmp_path, monkeypatch):
    """Catches: `hkd init-config` to stdout writing model paths relative to the cwd, wrong once saved elsewhere."""
    teacher = bert_config(tmp_path / "t", 4, 64, 4)
    student = bert_config(tmp_path / "s", 2, 32, 2)
    monkeypatch.chdir(tmp_path / "t")
    raw = yaml.safe_load(starter_config(teacher, student, None))
    assert raw["teacher"]["path"] == str(teacher.resolve()) and raw["student"]["path"] == str(student.resolve())


# --------------------------------------------------------------------------- hidden stage: scale-free losses


def hidden_views(scales: tuple[float, float], student_fn) -> tuple[ModelView, ModelView, dict[str, torch.Tensor]]:
    """Teacher (4 layers) and student (2 layers) views; teacher layers 2 and 4 scaled by ``scales``."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(2, 5, 64, generator=gen) for _ in range(5)]
    teacher_hidden = list(base)
    teacher_hidden[2], teacher_hidden[4] = base[2] * scales[0], base[4] * scales[1]
    student_hidden = [student_fn(teacher_hidden[t]) for t in (0, 2, 4)]
    mask = torch.ones(2, 5, dtype=torch.bool)
    return (ModelView(hidden_states=tuple(teacher_hidden)), ModelView(hidden_states=tuple(student_hidden)),
            {"loss_mask": mask, "attention_mask": mask.long()})


@pytest.fixture(scope="module")
def two_by_four():
    return models()  # tiny-llama teacher with 4 layers, student with 2, both 64 wide: no projector


def hidden_loss(pair, config: HiddenStageConfig, teacher: ModelView, student: ModelView, batch) -> float:
    stage = HiddenStage(config, context(*pair))
    assert stage.layer_map == [(1, 2), (2, 4)]
    return float(stage.loss(batch, teacher, student, StepState(step=0, temperature=1.0, tokens=10))["hidden"])


def test_nmse_is_one_for_a_zero_student_whatever_each_layers_scale(two_by_four):
    """Catches: per-layer loss scale; with plain MSE the layer whose hidden states are 100x larger is 10^4 x the
    loss and decides the gradient alone. nmse divides by the teacher layer's mean squared norm."""
    for scales in ((1.0, 1.0), (100.0, 0.01)):
        teacher, student, batch = hidden_views(scales, torch.zeros_like)
        assert hidden_loss(two_by_four, HiddenStageConfig(loss="nmse"), teacher, student, batch) == pytest.approx(1.0)
    small = hidden_loss(two_by_four, HiddenStageConfig(loss="mse"), *hidden_views((1.0, 1.0), torch.zeros_like))
    mixed = hidden_loss(two_by_four, HiddenStageConfig(loss="mse"), *hidden_views((100.0, 0.01), torch.zeros_like))
    assert mixed > 1000 * small


def test_layernorm_option_ignores_per_token_scale_and_shift(two_by_four):
    """Catches: normalize: layernorm not applied to both sides (a student off by a per-token affine map still pays)."""
    affine = lambda h: 3.0 * h + 0.5  # noqa: E731
    teacher, student, batch = hidden_views((10.0, 0.1), affine)
    assert hidden_loss(two_by_four, HiddenStageConfig(normalize="layernorm"), teacher, student, batch) < 1e-6
    assert hidden_loss(two_by_four, HiddenStageConfig(), teacher, student, batch) > 1.0
