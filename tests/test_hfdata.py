"""data.kind: hf (Hugging Face datasets) and data.packing, against the plain JSONL path and unpacked runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hkd.config import ConfigError, DataConfig, load_config
from hkd.data.encoding import Batches, encode_dataset
from hkd.models.loading import build_preset, char_tokenizer
from hkd.models.taps import TapRequest, enable_taps, forward_with_taps

pytest.importorskip("datasets")

RECORDS = [{"prompt": f"{a}+{b}=", "completion": str(a + b), "text": f"note {a} and {b}"}
           for a, b in [(1, 2), (12, 34), (7, 8), (100, 1), (5, 55), (9, 90), (31, 4)]]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("fields", [{"prompt_field": "prompt"}, {}])
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_hf_encoding_equals_jsonl_encoding(tmp_path: Path, fields: dict, suffix: str) -> None:
    """Catches: the batched HF tokeniser drifting from hkd.data.encoding.encode (bos/eos, labels, truncation)."""
    source = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    if suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(RECORDS).to_parquet(str(tmp_path / "data.parquet"))
    tok = char_tokenizer()
    plain = encode_dataset(tok, DataConfig(kind="jsonl", path=str(source), max_length=8, **fields), 0)
    hf = encode_dataset(tok, DataConfig(kind="hf", path=str(tmp_path / f"data{suffix}"), max_length=8, **fields), 0)
    assert len(hf) == len(plain) and [hf[i] for i in range(len(hf))] == plain
    assert hf[2:5] == plain[2:5] and list(hf) == plain  # slices and iteration (teacher cache, eval) read the same
    assert (tmp_path / ".hkd-cache").is_dir()


def test_second_read_reuses_the_tokenised_cache(tmp_path: Path) -> None:
    """Catches: re-tokenising every run (a fingerprint that changes between runs, e.g. hashing the tokenizer object)."""
    source = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    config = DataConfig(kind="hf", path=str(source), prompt_field="prompt", max_length=16)
    first = encode_dataset(char_tokenizer(), config, 0)
    files = {f["filename"] for f in first.dataset.cache_files}  # type: ignore[attr-defined]
    mtimes = {name: Path(name).stat().st_mtime_ns for name in files}
    second = encode_dataset(char_tokenizer(), config, 0)
    assert {f["filename"] for f in second.dataset.cache_files} == files  # type: ignore[attr-defined]
    assert {name: Path(name).stat().st_mtime_ns for name in files} == mtimes
    changed = encode_dataset(char_tokenizer(), DataConfig(kind="hf", path=str(source), prompt_field="prompt", max_length=8), 0)
    assert {f["filename"] for f in changed.dataset.cache_files} != files  # type: ignore[attr-defined]


@pytest.mark.parametrize("preset,overrides,attn", [
    ("tiny-llama", {}, "sdpa"),
    ("tiny-llama", {}, "eager"),
    ("tiny-qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 0}, "sdpa"),
])
def test_packed_rows_give_each_example_its_unpacked_result(preset: str, overrides: dict, attn: str) -> None:
    """Catches: attention crossing example boundaries (no block-diagonal mask), positions not reset per example,
    and a loss term predicting the next example's first token from the previous one's last."""
    tok = char_tokenizer()
    config = DataConfig(kind="synthetic", num_examples=12, digits=1, max_length=60, batch_size=2, packing=True)
    encoded = encode_dataset(tok, config, 0)
    batches = Batches(encoded, config, tok.pad_token_id, seed=0)
    assert len(batches.encoded) < len(encoded)  # several examples per row
    model = build_preset(preset, {"num_hidden_layers": 2, **overrides}, seed=0).eval()
    model.set_attn_implementation(attn)
    enable_taps(model)
    request = TapRequest(hidden={2}, attention={1, 2}, logits=True)
    batch = batches.batch(0)
    with torch.no_grad():
        packed = forward_with_taps(model, batch, request)
    packing = batches.encoded
    for row, packed_row in enumerate(batch["example_index"].tolist()):
        start = 0
        examples = packing._examples(packed_row)  # type: ignore[attr-defined]
        assert len(examples) > 1
        for ids, labels in examples:
            end = start + len(ids)
            alone = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
            with torch.no_grad():
                single = forward_with_taps(model, alone, request)
            torch.testing.assert_close(packed.logits[row, start:end], single.logits[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(packed.hidden_states[2][row, start:end], single.hidden_states[2][0], atol=1e-4, rtol=1e-4)
            for layer in (1, 2):
                maps = packed.attention[layer].attention_logprobs().exp()[row]
                torch.testing.assert_close(maps[:, start:end, start:end], single.attention[layer].attention_logprobs().exp()[0],
                                           atol=1e-5, rtol=1e-4)
                assert maps[:, start:end, :start].sum() == 0 and maps[:, start:end, end:].sum() == 0
            # targets inside the example are exactly its own; its last position predicts nothing
            assert batch["loss_mask"][row, start:end - 1].tolist() == [label != -100 for label in labels[1:]]
            assert not batch["loss_mask"][row, end - 1]
            start = end
    targets, tokens = batches.counts(0)
    assert targets == int(batch["loss_mask"].sum()) and tokens == int(batch["attention_mask"].sum())


def test_packing_is_refused_where_it_cannot_hold(tmp_path: Path) -> None:
    """Catches: a teacher cache or an encoder silently reading packed rows as single sequences."""
    base = {"teacher": {"preset": "tiny-llama"}, "student": {"preset": "tiny-llama"},
            "schedule": {"phases": [{"name": "a", "steps": 1, "stages": {"logits": 1.0}}]},
            "data": {"kind": "synthetic", "packing": True}}
    for extra in ({"teacher_cache": str(tmp_path)}, {"student": {"preset": "tiny-bert", "encoder": True}}):
        path = tmp_path / "c.yaml"
        path.write_text(json.dumps({**base, **extra}))
        with pytest.raises(ConfigError, match="data.packing"):
            load_config(path)
    model = build_preset("tiny-bert", {"num_hidden_layers": 1}, seed=0)
    ids = torch.randint(4, 90, (1, 6))
    with pytest.raises(Exception, match="packed sequences"):
        forward_with_taps(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                  "position_ids": torch.arange(6)[None]}, TapRequest(hidden={1}))


def test_streaming_serves_the_same_examples_without_storing_them(tmp_path: Path) -> None:
    """Catches: a streamed run seeing other examples than the cached one (order, epoch wrap), a resumed run
    (fresh reader, later step) starting elsewhere than the uninterrupted one, and shuffles that differ by run."""
    source = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    tok = char_tokenizer()
    fields = dict(kind="hf", path=str(source), prompt_field="prompt", max_length=16, batch_size=3)
    cached = Batches(encode_dataset(tok, DataConfig(shuffle=False, **fields), 0), DataConfig(shuffle=False, **fields), 0, 0)
    config = DataConfig(shuffle=False, streaming=True, **fields)
    streamed = Batches(encode_dataset(tok, config, 0), config, 0, 0)
    for index in range(5):  # 15 examples: two epoch wraps of 7
        expected = cached.batch(index)
        got = streamed.batch(index)
        assert torch.equal(got["input_ids"], expected["input_ids"]) and torch.equal(got["labels"], expected["labels"])
        assert streamed.counts(index) == cached.counts(index)
    resumed = Batches(encode_dataset(tok, config, 0), config, 0, 0)
    assert torch.equal(resumed.batch(4)["input_ids"], streamed.batch(4)["input_ids"])
    assert torch.equal(streamed.batch(0)["input_ids"], cached.batch(0)["input_ids"])  # rewinding re-reads
    shuffled = DataConfig(shuffle=True, streaming=True, **fields)
    runs = [Batches(encode_dataset(tok, shuffled, 0), shuffled, 0, 0) for _ in range(2)]
    assert all(torch.equal(runs[0].batch(i)["input_ids"], runs[1].batch(i)["input_ids"]) for i in range(4))
    assert any(not torch.equal(runs[0].batch(i)["input_ids"], cached.batch(i)["input_ids"]) for i in range(4))
    other_seed = Batches(encode_dataset(tok, shuffled, 1), shuffled, 0, 1)
    assert any(not torch.equal(runs[0].batch(i)["input_ids"], other_seed.batch(i)["input_ids"]) for i in range(4))
    seen = sorted(tuple(ids) for i in range(7) for ids in [runs[0].encoded[i][0]])
    assert seen == sorted(tuple(ids) for ids, _ in encode_dataset(tok, DataConfig(**fields), 0))  # one epoch: each once
