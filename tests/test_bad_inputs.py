"""Issue 12: every bad input is refused by name (exit 2, one ``hkd: error:`` line), quickly, and nothing
already written is lost. Each test names the bug it catches. Run directories and checkpoints: test_rundir.py."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pickle
import re
import shutil
import struct
import time
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from hkd import config as config_module
from hkd.cli import main
from hkd.config import Config, ConfigError, ModelConfig, from_dict, load_config, load_yaml
from hkd.data.encoding import encode, encode_dataset, read_jsonl
from hkd.errors import HkdError
from hkd.models.loading import char_tokenizer, load_model, safetensors_shapes, write_preset

SMALL_TEACHER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "num_key_value_heads": 1}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def assert_one_error(code: int, err: str, pattern: str) -> None:
    """Exit 2, exactly one ``hkd: error:`` line, no traceback, and the message names the problem."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("hkd: error: "), err
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture
def write_config(tmp_path: Path, raw_config: dict[str, Any]):
    def write(text: str | None = None, **sections: Any) -> str:
        raw = copy.deepcopy(raw_config)
        for section, values in sections.items():
            if isinstance(values, dict):
                raw.setdefault(section, {}).update(values)
            else:
                raw[section] = values
        path = tmp_path / "cfg.yaml"
        path.write_text(text if text is not None else yaml.safe_dump(raw))
        return str(path)

    return write


# --------------------------------------------------------------------------- 4. config values

# each: (section values, message). Bugs caught: the value was accepted and the run trained on it
# (gradient ascent from a negative min_lr_ratio, a NaN weight that silently never runs, ...) or
# crashed later with a traceback (gpu0, a seed beyond 2**63, max_length 0, a hang on absurd sizes).
BAD_VALUES = {
    "beta of 1": ({"optim": {"betas": [0.9, 1.0]}}, r"optim\.betas\[1\]: 1\.0 is outside \[0, 1\)"),
    "negative beta": ({"optim": {"betas": [-0.1, 0.9]}}, r"optim\.betas\[0\]: -0\.1 is outside \[0, 1\)"),
    "negative min_lr_ratio": ({"optim": {"min_lr_ratio": -0.5}}, r"optim\.min_lr_ratio: -0\.5 is outside \[0, 1\]"),
    "negative weight decay": ({"optim": {"weight_decay": -0.01}}, r"optim\.weight_decay: -0\.01 is outside \[0, inf\)"),
    "infinite lr": ({"optim": {"lr": float("inf")}}, r"optim\.lr: inf is not a finite number"),
    "seed 2**63": ({"train": {"seed": 2**63}}, r"train\.seed: 9223372036854775808 is outside \[0, 2\*\*63\)"),
    "negative seed": ({"train": {"seed": -1}}, r"train\.seed: -1 is outside \[0, 2\*\*63\)"),
    "device gpu0": ({"train": {"device": "gpu0"}}, r"train\.device: 'gpu0' is not a device"),
    "max_length 0": ({"data": {"max_length": 0}}, r"data\.max_length: 0 is outside \[2, "),
    "absurd grad_accum": ({"optim": {"grad_accum": 10**9}}, r"optim\.grad_accum: 1000000000 is outside \[1, 65536\]"),
    "absurd batch_size": ({"data": {"batch_size": 10**9}}, r"data\.batch_size: 1000000000 is outside \[1, 65536\]"),
    "absurd num_examples": ({"data": {"num_examples": 10**12}}, r"data\.num_examples: 1000000000000 is outside"),
    "negative ramp": ({"schedule": {"ramp_steps": -1}}, r"schedule\.ramp_steps: -1 is outside \[0, "),
}


@pytest.mark.parametrize("name", list(BAD_VALUES))
def test_out_of_range_config_values_name_path_and_range(name, write_config, capsys, tmp_path):
    sections, pattern = BAD_VALUES[name]
    start = time.monotonic()
    code, err = run_cli(capsys, "distill", write_config(**sections), "--out", str(tmp_path / "run"))
    assert_one_error(code, err, pattern)
    assert time.monotonic() - start < 5
    assert not (tmp_path / "run").exists()  # bug caught: a refused config still created the run directory


def test_nan_stage_weight_is_refused(write_config, capsys, tmp_path, raw_config):
    # bug caught: a NaN weight compares false with 0, so the stage silently never ran
    text = yaml.safe_dump(raw_config).replace("attention: 1.0", "attention: .nan", 1)
    code, err = run_cli(capsys, "distill", write_config(text=text), "--out", str(tmp_path / "run"))
    assert_one_error(code, err, r"schedule\.phases\[0\]\.stages\.attention: nan is not a finite number")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_named(write_config, capsys, tmp_path):
    # bug caught: torch raised deep inside .to("cuda") with a traceback
    code, err = run_cli(capsys, "distill", write_config(train={"device": "cuda"}), "--out", str(tmp_path / "r"))
    assert_one_error(code, err, r"train\.device: 'cuda' asked for, but this machine has no CUDA device")


def test_duplicate_yaml_keys_are_refused(write_config, capsys, tmp_path, raw_config):
    # bug caught: the second optim.lr silently won
    text = yaml.safe_dump(raw_config) + "optim:\n  lr: 0.5\n"
    code, err = run_cli(capsys, "distill", write_config(text=text), "--out", str(tmp_path / "r"))
    assert_one_error(code, err, r"cfg\.yaml: not valid YAML: line \d+, column 1: duplicate key 'optim' "
                                r"\(first given on line \d+\)")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr'"):
        load_yaml("optim:\n  lr: 1\n  lr: 2\n", "x.yaml")


def test_yaml_alias_bomb_is_refused_quickly(write_config, capsys, tmp_path):
    # bug caught: nine levels of ten aliases each (10**9 nodes) hung the loader's consumers
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    start = time.monotonic()
    code, err = run_cli(capsys, "distill", write_config(text="\n".join(lines) + "\n"), "--out", str(tmp_path / "r"))
    assert_one_error(code, err, r"expands to more than 100000 nodes")
    assert time.monotonic() - start < 2
    with pytest.raises(ConfigError, match="recursive"):
        load_yaml("a: &x [1, *x]\n", "x.yaml")


def test_yaml_merge_keys_and_small_aliases_still_work():
    # a config may share values with anchors; only expansion beyond the bound is refused
    raw = load_yaml("base: &b {lr: 1, wd: 2}\noptim:\n  <<: *b\n  lr: 3\n", "x.yaml")
    assert raw["optim"] == {"lr": 3, "wd": 2}


def ranged_fields() -> list[tuple[type, str, config_module.Range]]:
    found = []
    for cls in (ModelConfig, config_module.DataConfig, config_module.PhaseConfig, config_module.TemperatureConfig,
                config_module.ScheduleConfig, config_module.OptimConfig, config_module.TrainConfig):
        for f in dataclasses.fields(cls):
            if "range" in f.metadata:
                found.append((cls, f.name, f.metadata["range"]))
    return found


RANGED = ranged_fields()
BASE_OF = {config_module.PhaseConfig: {"name": "p", "steps": 1, "stages": {"logits": 1.0}}}


def scalar_type(cls: type, name: str) -> Any:
    tp = typing.get_type_hints(cls)[name]
    return typing.get_args(tp)[-1] if typing.get_origin(tp) in (list, dict) else tp


@settings(max_examples=300, deadline=None)
@given(index=st.integers(0, len(RANGED) - 1),
       number=st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True)))
def test_every_ranged_field_accepts_exactly_its_range(index, number):
    """Property: a value inside the field's range is accepted unchanged; outside, the error names
    the dotted path and the range. Bug caught: ranges spread over ad-hoc checks missed fields."""
    cls, name, bounds = RANGED[index]
    tp = scalar_type(cls, name)
    if tp is int and isinstance(number, float):
        return  # a float for an int field is a type error, tested elsewhere
    outer = typing.get_origin(typing.get_type_hints(cls)[name])
    value: Any = [number, number] if outer is list else {"s": number} if outer is dict else number
    data = {**BASE_OF.get(cls, {}), name: value}
    try:
        obj = from_dict(cls, data, "sec")
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"sec.{name}"), message
        finite = not isinstance(number, float) or math.isfinite(number)
        if tp is float and not finite:
            assert "not a finite number" in message
        elif tp is float and isinstance(number, int) and abs(number) < 2**1000 and float(number) != number:
            assert "has no exact float value" in message  # 2**53 + 1 is refused, never rounded silently
        elif finite and (tp is not float or abs(number) < 1e300):
            assert float(number) not in bounds, message
            assert str(bounds) in message, message
    else:
        assert float(number) in bounds
        got = getattr(obj, name)
        assert (got[0] if outer is list else got["s"] if outer is dict else got) == number


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(-(2**64), 2**64), device=st.sampled_from(["cpu", "auto", "gpu0", "cuda:x", "CPU", "tpu"]))
def test_seed_and_device_through_the_loader(seed, device, tmp_path_factory):
    raw = {"teacher": {"preset": "tiny-llama"}, "student": {"preset": "tiny-llama"},
           "schedule": {"phases": [{"name": "p", "steps": 1, "stages": {"logits": 1.0}}]},
           "train": {"seed": seed, "device": device}}
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    ok = 0 <= seed < 2**63 and device in ("cpu", "auto")
    if ok:
        assert load_config(path).train.seed == seed
    else:
        with pytest.raises(ConfigError, match=r"^train\.(seed|device): "):
            load_config(path)


# --------------------------------------------------------------------------- 1. weights


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return write_preset("tiny-llama", tmp_path_factory.mktemp("m") / "teacher", SMALL_TEACHER, seed=1)


def damaged_copy(src: Path, dst: Path, *, weights: dict[str, torch.Tensor] | None = None,
                 raw: bytes | None = None, config: dict[str, Any] | None = None) -> Path:
    shutil.copytree(src, dst)
    if weights is not None:
        save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if raw is not None:
        (dst / "model.safetensors").write_bytes(raw)
    if config is not None:
        (dst / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), **config}))
    return dst


def test_truncated_and_garbage_safetensors_are_named(small_model, tmp_path):
    # bug caught: a SafetensorError traceback from deep inside transformers
    data = (small_model / "model.safetensors").read_bytes()
    cut = damaged_copy(small_model, tmp_path / "cut", raw=data[: len(data) // 2])
    with pytest.raises(HkdError, match=r"teacher: '.*cut/model\.safetensors' is truncated: its tensors need \d+ bytes"):
        load_model(ModelConfig(path=str(cut)), "teacher")
    junk = damaged_copy(small_model, tmp_path / "junk", raw=os.urandom(64))
    with pytest.raises(HkdError, match=r"junk/model\.safetensors' is not a safetensors file"):
        load_model(ModelConfig(path=str(junk)), "teacher")
    tiny = damaged_copy(small_model, tmp_path / "tiny", raw=b"abc")
    with pytest.raises(HkdError, match=r"shorter than its header"):
        load_model(ModelConfig(path=str(tiny)), "teacher")


def test_missing_unexpected_and_misshaped_tensors_are_named(small_model, tmp_path):
    # bug caught: transformers initialised missing weights randomly and printed a report nobody read:
    # distilling from a partly random teacher
    weights = load_file(str(small_model / "model.safetensors"))
    lacking = {k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"}
    path = damaged_copy(small_model, tmp_path / "lacking", weights=lacking)
    with pytest.raises(HkdError, match=r"1 parameter\(s\) missing .*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(ModelConfig(path=str(path)), "teacher")
    extra = damaged_copy(small_model, tmp_path / "extra", weights={**weights, "model.extra": torch.zeros(2)})
    with pytest.raises(HkdError, match=r"unexpected tensor\(s\) .*model\.extra"):
        load_model(ModelConfig(path=str(extra)), "teacher")
    shaped = damaged_copy(small_model, tmp_path / "shaped", weights={**weights, "model.norm.weight": torch.zeros(5)})
    with pytest.raises(HkdError, match=r"wrong shape \(model\.norm\.weight: weights \[5\], model \[32\]\)"):
        load_model(ModelConfig(path=str(shaped)), "teacher")


def test_config_asking_for_more_layers_than_the_weights_hold(small_model, tmp_path):
    # bug caught: layer 2 was randomly initialised and the teacher accepted
    path = damaged_copy(small_model, tmp_path / "deeper", config={"num_hidden_layers": 3})
    with pytest.raises(HkdError, match=r"9 parameter\(s\) missing .*model\.layers\.2\..*allow_missing"):
        load_model(ModelConfig(path=str(path)), "student")
    # the explicit opt-in: known patterns may be missing (here: the extra layer) and are then allowed
    model, _ = load_model(ModelConfig(path=str(path), allow_missing=[r"model\.layers\.2\..*"]), "student")
    assert model.config.num_hidden_layers == 3
    with pytest.raises(ConfigError, match=r"student\.allow_missing\[0\]: '\(' is not a regular expression"):
        from_dict(ModelConfig, {"path": "x", "allow_missing": ["("]}, "student")


def test_a_tied_head_missing_from_the_file_loads(tmp_path):
    # valid input: a tied LM head is not stored separately and must not be reported missing
    path = write_preset("tiny-llama", tmp_path / "tied", {**SMALL_TEACHER, "tie_word_embeddings": True})
    assert not any("lm_head" in k for k in safetensors_shapes(path / "model.safetensors"))
    model, _ = load_model(ModelConfig(path=str(path)), "teacher")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_bad_teacher_weights_through_the_cli(small_model, tmp_path, write_config, capsys):
    data = (small_model / "model.safetensors").read_bytes()
    cut = damaged_copy(small_model, tmp_path / "cut", raw=data[:-100])
    config = write_config(teacher={"path": str(cut), "preset": None, "preset_overrides": {}})
    code, err = run_cli(capsys, "distill", config, "--out", str(tmp_path / "run"))
    assert_one_error(code, err, r"teacher: '.*cut/model\.safetensors' is truncated")


def test_refused_pickle_payload_is_one_error_line(small_model, tmp_path):
    # bug caught: with allow_pickle, torch's weights-only refusal surfaced as a multi-line traceback
    # (whose advice was to disable the protection)
    path = damaged_copy(small_model, tmp_path / "pickled")
    (path / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (path / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(HkdError, match=r"teacher: refused to unpickle the weights in '.*pickled': they hold "
                                       r"something other than tensors") as info:
        load_model(ModelConfig(path=str(path), allow_pickle=True), "teacher")
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)


# --------------------------------------------------------------------------- 7. trust


def test_probe_ignores_trust_and_pickle_from_the_run_directory(small_model, tmp_path, capsys):
    # bug caught: hkd probe honoured trust_remote_code/allow_pickle found in a received run's config.yaml
    from hkd.commands.probe import run_config

    pickled = damaged_copy(small_model, tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    torch.save(load_file(str(small_model / "model.safetensors")), pickled / "pytorch_model.bin")
    run = tmp_path / "received"
    (run / "checkpoints").mkdir(parents=True)
    raw = {"teacher": {"path": str(pickled), "allow_pickle": True, "trust_remote_code": True},
           "student": {"path": str(small_model), "trust_remote_code": True},
           "schedule": {"phases": [{"name": "p", "steps": 1, "stages": {"logits": 1.0}}]},
           "data": {"num_examples": 4, "batch_size": 2}}
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    config = run_config(run)
    assert not any(m.trust_remote_code or m.allow_pickle for m in (config.teacher, config.student))
    assert run_config(run, trust_remote_code=True, allow_pickle=True).teacher.allow_pickle
    code, err = run_cli(capsys, "probe", str(run), "--step", "0", "--no-progress")
    assert_one_error(code, err, r"teacher\.path: '.*pickled' has only pickle weights")
    code, _ = run_cli(capsys, "probe", str(run), "--step", "0", "--no-progress", "--allow-pickle", "--batches", "1")
    assert code == 0  # the user's own opt-in on the command line


# --------------------------------------------------------------------------- 3. data


def test_invalid_utf8_names_file_and_line(tmp_path):
    # bug caught: a UnicodeDecodeError traceback without the line
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(HkdError, match=rf"{re.escape(str(path))}:2: not valid UTF-8 \(byte 14"):
        read_jsonl(path, required=("text",))
    assert len(read_jsonl(path, on_bad_line="skip", required=("text",))) == 1


def test_null_and_non_text_fields_are_refused_by_name(tmp_path):
    # bug caught: str(None) trained on the text "None"
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2=", "completion": null}\n')
    with pytest.raises(HkdError, match=rf"{re.escape(str(path))}:2: field 'completion' is null"):
        read_jsonl(path, required=("prompt", "completion"))
    path.write_text('{"prompt": ["a"], "completion": "2"}\n')
    with pytest.raises(HkdError, match=r":1: field 'prompt' is a list, not text"):
        read_jsonl(path, required=("prompt", "completion"))


def test_no_target_tokens_after_truncation_is_refused_at_start(tmp_path):
    # bug caught: every prompt filled max_length, so the run trained with loss 0 throughout
    from hkd.config import DataConfig

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": "x" * 40, "completion": "yes"}) + "\n" for _ in range(3)))
    config = DataConfig(kind="jsonl", path=str(path), prompt_field="prompt", max_length=16)
    with pytest.raises(HkdError, match=r"all 3 examples have no target tokens after truncation to "
                                       r"data\.max_length=16"):
        encode_dataset(char_tokenizer(), config, 0)
    config.max_length = 48
    assert len(encode_dataset(char_tokenizer(), config, 0)) == 3


def test_a_huge_line_is_capped_before_tokenising():
    # bug caught: a 10 MB line was tokenised whole (minutes, gigabytes) and then cut to max_length
    tokenizer = char_tokenizer()
    start = time.monotonic()
    ids, labels = encode(tokenizer, "", "7" * 10_000_000, max_length=32)
    assert time.monotonic() - start < 2
    assert len(ids) == 32 and ids == encode(tokenizer, "", "7" * 100, max_length=32)[0]


def test_bom_and_empty_strings_are_valid(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes("\ufeff".encode() + b'{"text": ""}\n{"text": "a"}\n')
    assert [r["text"] for r in read_jsonl(path, required=("text",))] == ["", "a"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(
    st.binary(max_size=12),
    st.builds(lambda v: json.dumps({"prompt": "p", "completion": v}).encode(),
              st.one_of(st.none(), st.text(max_size=5), st.integers(), st.booleans(), st.lists(st.integers(), max_size=2))),
), min_size=1, max_size=5))
def test_any_bytes_read_or_name_the_line(tmp_path, lines):
    """Property: arbitrary bytes, including invalid UTF-8 and null fields, give records whose fields
    are text or numbers, or one HkdError naming file:line."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    try:
        records = read_jsonl(path, required=("prompt", "completion"))
    except HkdError as exc:
        assert re.search(rf"{re.escape(str(path))}:\d+: |no usable records", str(exc)), str(exc)
    else:
        for record in records:
            assert all(isinstance(record[f], (str, int, float)) and not isinstance(record[f], bool)
                       for f in ("prompt", "completion"))


# --------------------------------------------------------------------------- 2. teacher cache


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory, small_model) -> Path:
    """A small cache (12 examples, 3 shards of 5/5/2, hidden states of one layer) built once."""
    from tests.conftest import BASE_CONFIG

    from hkd.teachers.cache import build_cache

    raw = copy.deepcopy(BASE_CONFIG)
    raw["teacher"] = {"path": str(small_model)}
    raw["data"] = {"kind": "synthetic", "num_examples": 12, "batch_size": 4, "max_length": 32}
    raw["schedule"]["phases"] = [{"name": "d", "steps": 1, "stages": {"hidden": 1.0, "logits": 1.0}}]
    root = tmp_path_factory.mktemp("cache")
    build_cache(from_dict(Config, raw), root / "cache", top_k=4, examples_per_shard=5, progress=False,
                work_dir=root / "work")
    return root / "cache"


def open_all(path: Path) -> None:
    """Open the cache and every example's shard (what training does, batch by batch)."""
    from hkd.teachers.cache import TeacherCache

    cache = TeacherCache(path)
    for example in range(cache.index["num_examples"]):
        cache._shard(example)


def edited_index(src: Path, dst: Path, edit: Any) -> Path:
    shutil.copytree(src, dst)
    index = json.loads((dst / "index.json").read_text())
    edit(index)
    (dst / "index.json").write_text(json.dumps(index))
    return dst


def test_the_built_cache_opens(built_cache):
    open_all(built_cache)
    index = json.loads((built_cache / "index.json").read_text())
    assert [s["num_examples"] for s in index["shards"]] == [5, 5, 2] and all("bytes" in s for s in index["shards"])


# each edit of index.json and the message naming what is wrong. Bugs caught: KeyError, IndexError,
# shape mismatches and SafetensorError tracebacks, or (top_k, num_examples) silently wrong targets
INDEX_EDITS = {
    "top_k 0": (lambda i: i.update(top_k=0), r"top_k: expected an integer in \[1, vocab_size=100\], got 0"),
    "top_k text": (lambda i: i.update(top_k="4"), r"top_k: expected an integer .* got '4'"),
    "top_k differs from shards": (lambda i: i.update(top_k=5), r"has topk_values of shape \[\d+, 4\], expected \[\d+, 5\]"),
    "example count": (lambda i: i.update(num_examples=13), r"num_examples is 13 but the shards hold 12"),
    "missing key": (lambda i: i.pop("layers"), r"missing key\(s\) \['layers'\]"),
    "gap": (lambda i: i["shards"][1].update(first_example=6), r"shards\[1\]\.first_example: expected 5 .* got 6"),
    "path escape": (lambda i: i["shards"][0].update(file="../x.safetensors"), r"shards\[0\]\.file: expected a \*\.safetensors file name"),
    "layers": (lambda i: i.update(layers=[-1]), r"layers: expected a list of distinct layer numbers"),
    "shard count": (lambda i: i["shards"][2].update(num_examples=3) or i.update(num_examples=13),
                    r"shard-00002\.safetensors' has offsets of shape \[3\], expected \[4\]"),
    "not an object": (lambda i: i.clear(), r"format version None"),
}


@pytest.mark.parametrize("name", list(INDEX_EDITS))
def test_a_damaged_index_names_the_file_and_the_problem(name, built_cache, tmp_path):
    edit, pattern = INDEX_EDITS[name]
    path = edited_index(built_cache, tmp_path / "c", edit)
    with pytest.raises(HkdError, match=r"teacher_cache: .*" + pattern):
        open_all(path)


def test_truncated_deleted_or_replaced_shards_are_named(built_cache, tmp_path):
    path = edited_index(built_cache, tmp_path / "c", lambda i: None)
    shard = path / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(HkdError, match=r"shard '.*shard-00001\.safetensors' has \d+ bytes, the index recorded \d+"):
        open_all(path)
    index = json.loads((path / "index.json").read_text())
    for entry in index["shards"]:
        entry.pop("bytes")  # a cache written before sizes were recorded: the header check still catches it
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(HkdError, match=r"shard-00001\.safetensors' is unreadable \(.*is truncated"):
        open_all(path)
    shard.unlink()
    with pytest.raises(HkdError, match=r"shard '.*shard-00001\.safetensors' is missing"):
        open_all(path)
    (path / "index.json").write_text((path / "index.json").read_text()[:40])
    with pytest.raises(HkdError, match=r"index\.json' is not valid JSON"):
        open_all(path)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["top_k", "num_examples", "vocab_size", "layers", "version", "shards.first_example",
                            "shards.num_examples", "shards.file", "shards.bytes"]),
       value=st.one_of(st.none(), st.integers(-3, 20), st.text(max_size=4), st.lists(st.integers(-1, 5), max_size=3)))
def test_any_edited_index_field_opens_or_is_named(built_cache, tmp_path_factory, key, value):
    """Property: an index.json with any field replaced either serves every example or raises one
    HkdError naming the cache; never another exception."""
    def edit(index: dict[str, Any]) -> None:
        if key.startswith("shards."):
            index["shards"][1][key.split(".")[1]] = value
        else:
            index[key] = value

    path = edited_index(built_cache, tmp_path_factory.mktemp("p") / "c", edit)
    try:
        open_all(path)
    except HkdError as exc:
        assert "teacher_cache" in str(exc)


def test_bad_data_and_a_damaged_cache_through_the_cli(built_cache, small_model, write_config, capsys, tmp_path):
    """The CLI ends each with one line and exit 2, and creates no run directory."""
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"text": "1+1=2"}\n{"text": "\xff"}\n')
    jsonl = {"kind": "jsonl", "path": str(data), "batch_size": 2}
    code, err = run_cli(capsys, "distill", write_config(data=jsonl), "--out", str(tmp_path / "r1"))
    assert_one_error(code, err, r"d\.jsonl:2: not valid UTF-8")
    data.write_text(json.dumps({"prompt": "x" * 60, "completion": "y"}) + "\n")
    prompts = {**jsonl, "prompt_field": "prompt", "max_length": 16}
    code, err = run_cli(capsys, "distill", write_config(data=prompts), "--out", str(tmp_path / "r2"))
    assert_one_error(code, err, r"all 1 examples have no target tokens after truncation to data\.max_length=16")
    cache = edited_index(built_cache, tmp_path / "cache", lambda i: None)
    shard = cache / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    code, err = run_cli(capsys, "distill", write_config(teacher_cache=str(cache)), "--out", str(tmp_path / "r3"))
    assert_one_error(code, err, r"teacher_cache: shard '.*shard-00002\.safetensors' has \d+ bytes, the index recorded")
    assert not any((tmp_path / name).exists() for name in ("r1", "r2", "r3"))


@pytest.mark.parametrize("device,message", [("gpu0", r"^device: 'gpu0' is not a device"),
                                            ("cuda:0", r"^device: 'cuda:0' asked for, but this machine has")])
def test_generate_and_eval_configs_name_a_bad_device(device, message):
    # catches: generate/eval accepting any string and failing later inside torch.device or .to()
    # (after loading the teacher), or silently running on another device
    from hkd.commands.evaluate import EvalConfig
    from hkd.commands.generate import GenerateConfig

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=message):
        from_dict(GenerateConfig, {"teacher": {"preset": "tiny-llama"}, "prompts": "p.jsonl", "output": "o.jsonl",
                                   "device": device})
    with pytest.raises(ConfigError, match=message):
        from_dict(EvalConfig, {"model": {"preset": "tiny-llama"}, "output": "o.json", "text": {"kind": "synthetic"},
                               "device": device})
