"""data.kind: hf for encoders: the tokenizer's own [CLS]/[SEP], truncation that keeps [SEP] (hkd/data/hf.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hkd.config import DataConfig
from hkd.data.encoding import encode_dataset
from hkd.models.loading import wordpiece_tokenizer

pytest.importorskip("datasets")

RECORDS = [{"prompt": "Question: what is 47 + 38?", "completion": "Add the ones, then the tens. Answer: 85",
            "text": text}
           for text in ["a short one", "the teacher model encodes each sentence into a sequence of hidden states",
                        "knowledge distillation transfers what a large network has learned into a compact one"]]


@pytest.mark.parametrize("fields", [{}, {"prompt_field": "prompt"}])
@pytest.mark.parametrize("max_length", [6, 64])
def test_hf_encodes_an_encoder_like_jsonl_with_cls_and_sep(tmp_path: Path, fields: dict, max_length: int) -> None:
    """Catches: kind hf adding bos/eos (None for BERT, so no special tokens at all) instead of [CLS] ... [SEP], and
    truncation cutting the final [SEP] off; checked against the jsonl path and the tokenizer itself."""
    source = tmp_path / "data.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    tok = wordpiece_tokenizer()
    plain = encode_dataset(tok, DataConfig(kind="jsonl", path=str(source), max_length=max_length, **fields), 0)
    hf = encode_dataset(tok, DataConfig(kind="hf", path=str(source), max_length=max_length, **fields), 0)
    assert list(hf) == plain
    for (ids, labels), record in zip(hf, RECORDS):
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and len(ids) <= max_length
        assert tok.sep_token_id not in ids[:-1] and len(ids) == len(labels)
        if not fields and max_length == 64:  # untruncated plain text: exactly what the tokenizer writes itself
            assert ids == tok(record["text"])["input_ids"]
