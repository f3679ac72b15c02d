"""Data sets: malformed lines (file:line, skip policy), empty sets, chat templates, example indices."""

from __future__ import annotations

import pytest

from hkd.config import Config, ConfigError, DataConfig, from_dict, validate
from hkd.data.encoding import Batches, encode, encode_dataset, load_records
from hkd.errors import HkdError
from hkd.models.loading import char_tokenizer

LINES = [
    '{"prompt": "1+1=", "completion": "2"}',
    '{"prompt": "2+2=", "completion": ',  # torn JSON
    '["not", "an", "object"]',
    '{"prompt": "3+3="}',  # no completion field
    '',  # blank lines are not records and not errors
    '{"prompt": "4+4=", "completion": "8"}',
]


def config(path, **changes) -> DataConfig:
    return DataConfig(kind="jsonl", path=str(path), prompt_field="prompt", completion_field="completion", **changes)


def test_malformed_lines_name_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(LINES) + "\n")
    with pytest.raises(HkdError, match=rf"{path}:2: malformed JSON .*data.on_bad_line: skip"):
        load_records(config(path), seed=0)
    path.write_text("\n".join(LINES[:1] + LINES[2:]) + "\n")
    with pytest.raises(HkdError, match=rf"{path}:2: expected a JSON object, got list"):
        load_records(config(path), seed=0)
    path.write_text("\n".join(LINES[:1] + LINES[3:]) + "\n")
    with pytest.raises(HkdError, match=rf"{path}:2: missing field\(s\) \['completion'\]"):
        load_records(config(path), seed=0)


def test_skip_policy_keeps_the_good_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(LINES) + "\n")
    assert load_records(config(path, on_bad_line="skip"), seed=0) == [("1+1=", "2"), ("4+4=", "8")]


def test_empty_data_sets_are_clear_errors(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n\n")
    with pytest.raises(HkdError, match="has no usable records"):
        load_records(config(path), seed=0)
    path.write_text("\n".join(LINES[1:4]) + "\n")
    with pytest.raises(HkdError, match="has no usable records"):
        load_records(config(path, on_bad_line="skip"), seed=0)
    with pytest.raises(HkdError, match="does not exist"):
        load_records(config(tmp_path / "missing.jsonl"), seed=0)
    with pytest.raises(HkdError, match="the training set is empty"):
        Batches([], DataConfig(), pad_id=0, seed=0)


def test_chat_template_wraps_the_prompt_and_only_the_completion_is_learned():
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    ids, labels = encode(tok, "1+1=", "2", 64, chat_template=True)
    assert tok.decode(ids) == "<user>1+1=<assistant>2<eos>"
    assert tok.decode([i for i, l in zip(ids, labels) if l != -100]) == "2<eos>"
    plain_ids, _ = encode(tok, "1+1=", "2", 64)
    assert tok.decode(plain_ids) == "<bos>1+1=2<eos>"
    with pytest.raises(HkdError, match="data.chat_template: the tokenizer has no chat template"):
        encode(char_tokenizer(), "1+1=", "2", 64, chat_template=True)


def test_chat_template_needs_a_prompt_field(raw_config):
    raw_config["data"] = {"kind": "jsonl", "path": "x.jsonl", "chat_template": True}
    with pytest.raises(ConfigError, match="data.chat_template: needs data.prompt_field"):
        validate(from_dict(Config, raw_config))


def test_batches_carry_the_index_of_each_example():
    tok = char_tokenizer()
    data = DataConfig(num_examples=10, batch_size=4)
    encoded = encode_dataset(tok, data, seed=3)
    batches = Batches(encoded, data, tok.pad_token_id, seed=3)
    seen = []
    for index in range(5):  # two epochs and a half, reshuffled per epoch
        batch = batches.batch(index)
        for row, example in enumerate(batch["example_index"].tolist()):
            ids = encoded[example][0]
            assert batch["input_ids"][row, : len(ids)].tolist() == ids
        seen += batch["example_index"].tolist()
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
