"""Property-based tests of the config loader and the data reader.

Each property states the exact outcome, so a loader that names the wrong path, drops a key or
stores an override unparsed (or in the wrong place) fails it; the comment above each test names
the bug it catches.
"""

import copy
import dataclasses
import functools
import json
import string
import typing

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hkd.config import (
    MODEL_SOURCES, PATH_KEYS, Config, ConfigError, DataConfig, LoggingConfig, ModelConfig, OptimConfig, PhaseConfig,
    PluginsConfig, ScheduleConfig, TeacherModelConfig, TemperatureConfig, TrainConfig, WandbConfig, apply_overrides,
    from_dict,
    load_config,
)
from hkd.data.encoding import read_jsonl
from hkd.errors import HkdError

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)

BASE = {
    "teacher": {"preset": "tiny-llama"},
    "student": {"preset": "tiny-llama"},
    "schedule": {"phases": [{"name": "p", "steps": 1, "stages": {"logits": 1.0}}]},
}

# every place in a config that is a dataclass: (dotted path as errors print it, its class)
SECTIONS: list[tuple[str, type]] = [
    ("", Config), ("teacher", TeacherModelConfig), ("student", ModelConfig), ("data", DataConfig), ("optim", OptimConfig),
    ("train", TrainConfig), ("plugins", PluginsConfig), ("logging", LoggingConfig), ("logging.wandb", WandbConfig),
    ("schedule", ScheduleConfig), ("schedule.temperature", TemperatureConfig), ("schedule.phases[0]", PhaseConfig),
]


def node_at(raw: dict, path: str) -> dict:
    """The mapping at ``path`` (``a.b``, ``schedule.phases[0]``) of ``raw``, created where missing."""
    node = raw
    for part in filter(None, path.split(".")):
        name, _, index = part.partition("[")
        node = node.setdefault(name, {})
        if index:
            node = node[int(index.rstrip("]"))]
    return node


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def dotted(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# catches: an unknown key accepted silently, or named without its full dotted path (the old test
# also accepted any message that merely started with the section name)
@settings(max_examples=150, deadline=None)
@given(where=st.sampled_from(SECTIONS), key=st.text(string.ascii_lowercase + "_", min_size=1, max_size=12))
def test_an_unknown_key_is_refused_with_its_exact_dotted_path(where, key):
    path, cls = where
    assume(key not in field_names(cls))
    raw = copy.deepcopy(BASE)
    node_at(raw, path)[key] = 1
    with pytest.raises(ConfigError) as info:
        from_dict(Config, raw)
    assert str(info.value) == f"{dotted(path, key)}: unknown key; valid keys are {sorted(field_names(cls))}"


def _plain(value: typing.Any) -> typing.Any:
    """What a converted field holds, as plain data (dataclasses as dicts)."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


# catches: a bad value refused under another key's path (or none), and an accepted value that is
# not the one given (dropped, defaulted, or stored under another field)
@settings(max_examples=200, deadline=None)
@given(where=st.sampled_from(SECTIONS[1:]), data=st.data(), value=values)
def test_any_value_at_a_known_key_lands_there_or_is_refused_naming_that_key(where, data, value):
    path, cls = where
    key = data.draw(st.sampled_from(sorted(field_names(cls))))
    raw = copy.deepcopy(BASE)
    node_at(raw, path)[key] = value
    try:
        config = from_dict(Config, raw)
    except ConfigError as exc:
        message, prefix = str(exc), dotted(path, key)
        assert message.startswith(prefix) and message[len(prefix)] in ":[.", message
        return
    holder: typing.Any = config
    for part in filter(None, path.split(".")):
        name, _, index = part.partition("[")
        holder = getattr(holder, name)
        if index:
            holder = holder[int(index.rstrip("]"))]
    got = _plain(getattr(holder, key))
    if not (isinstance(value, dict) and isinstance(got, dict) and got.keys() != value.keys()):  # a dataclass gains defaults
        assert converted(got, value), (got, value)


def converted(got: typing.Any, value: typing.Any) -> bool:
    """``got`` is ``value`` as the loader stores it: the same, except that a float field holds an int
    or a numeric string (YAML 1.1 reads 3e-4 as one) as that float."""
    if isinstance(got, float) and not isinstance(value, (bool, float)) and isinstance(value, (int, str)):
        return got == float(value)
    if isinstance(got, list) and isinstance(value, list):
        return len(got) == len(value) and all(converted(a, b) for a, b in zip(got, value))
    if isinstance(got, dict) and isinstance(value, dict):
        return got.keys() == value.keys() and all(converted(got[k], value[k]) for k in got)
    return type(got) is type(value) and got == value


def render(value: typing.Any) -> str:
    """``value`` as one would type it after ``--key=`` (YAML flow style), written by PyYAML itself."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9)
    return text[: -len("\n...\n")] if text.endswith("\n...\n") else text.rstrip("\n")


def same(a: typing.Any, b: typing.Any) -> bool:
    """Equal and of the same types all the way down (True is not 1, 1.0 is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


plain_text = st.text(string.ascii_letters + string.digits + " _-:#,'\"[]{}", max_size=8)
override_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                             plain_text)
override_values = st.one_of(override_scalars, st.lists(override_scalars, max_size=4))
# PATH_KEYS are resolved to absolute paths and MODEL_SOURCES clear a sibling: tested separately
segment = st.text("abcdefghij", min_size=1, max_size=5).filter(lambda k: k not in PATH_KEYS and k not in MODEL_SOURCES)


# catches: overrides stored as the raw string ("3" not 3, "true" not True, "[1, 2]" not a list),
# a dotted path split wrongly or applied at the wrong depth, and siblings on the way lost
@settings(max_examples=150, deadline=None)
@given(keys=st.lists(segment, min_size=1, max_size=4), value=override_values)
def test_an_override_sets_the_parsed_value_at_its_dotted_path_and_nothing_else(keys, value):
    raw: dict = {}
    node = raw
    for key in keys[:-1]:  # a sibling at every level, which the override must leave alone
        node["zz_sibling"] = len(keys)
        node = node.setdefault(key, {})
    node["zz_sibling"] = "kept"
    expected = copy.deepcopy(raw)
    target = expected
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    apply_overrides(raw, [f"--{'.'.join(keys)}={render(value)}"])
    assert same(raw, expected), (raw, expected)


@pytest.mark.parametrize("text, value", [
    ("3", 3), ("-2", -2), ("0.5", 0.5), ("true", True), ("false", False), ("null", None), ("~", None),
    ("[1, 2.5, true, null]", [1, 2.5, True, None]), ("{a: 1}", {"a": 1}), ("'3'", "3"), ("abc", "abc"), ("", ""),
])
def test_override_values_are_parsed_as_yaml(text, value):  # catches: a value stored unparsed, or parsed as JSON
    raw = apply_overrides({}, [f"--a.b={text}"])
    assert same(raw, {"a": {"b": value}}), raw


def test_an_override_through_a_non_mapping_names_the_key():
    with pytest.raises(ConfigError, match=r"^override '--a\.b\.c=1': a\.b is not a mapping$"):
        apply_overrides({"a": {"b": 5}}, ["--a.b.c=1"])


REQUIRED = ["--teacher.preset=tiny-llama", "--student.preset=tiny-llama",
            "--schedule.phases=[{name: p, steps: 1, stages: {logits: 1.0}}]"]


@functools.cache
def baseline() -> dict:
    return load_config(None, REQUIRED).to_dict()


def typed_override(draw: st.DrawFn) -> tuple[str, typing.Any, str]:
    """(dotted key, value, the text a user types) for a typed field of the real config."""
    kind = draw(st.sampled_from(["lr", "seed", "progress", "device", "betas", "stage_option", "temperature"]))
    if kind == "lr":  # repr writes 1e-05, which YAML 1.1 reads as a string: the float field converts it
        value = draw(st.floats(min_value=1e-12, max_value=1e3))
        return "optim.lr", value, repr(value)
    if kind == "seed":
        value = draw(st.integers(0, 2**31))
        return "train.seed", value, str(value)
    if kind == "progress":
        value = draw(st.booleans())
        return "train.progress", value, str(value).lower()
    if kind == "device":  # a string (data.prompt_field was one, but synthetic data now refuses it as inert)
        value = draw(st.sampled_from(["cpu", "auto"]))
        return "train.device", value, value
    if kind == "betas":
        value = draw(st.lists(st.floats(min_value=0, max_value=0.999), min_size=2, max_size=2))
        return "optim.betas", value, render(value)
    if kind == "temperature":
        value = draw(st.floats(min_value=0.01, max_value=100))
        return "schedule.temperature.start", value, render(value)
    value = draw(override_values)
    return "stages.logits.alpha", value, render(value)


# catches: an override that reaches the typed Config with the wrong value or type, or changes
# any field besides the one named (every other field must equal the baseline's)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_an_override_lands_in_the_loaded_config_with_its_value(data):
    key, value, text = data.draw(st.composite(typed_override)())
    config = load_config(None, [*REQUIRED, f"--{key}={text}"]).to_dict()
    expected = copy.deepcopy(baseline())
    *parents, last = key.split(".")
    node = expected
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    assert config == expected
    got = config
    for part in key.split("."):
        got = got[part]
    assert same(got, value), (got, value)


def usable(line: str) -> dict | None:
    """The record a JSONL line holds if it is usable: a JSON object whose "text" is a string or number."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(record, dict) or "text" not in record or record["text"] is None:
        return None
    return None if isinstance(record["text"], (bool, list, dict)) else record


# catches: a bad line reported under the wrong line number (or not at all), a good record dropped
# or reordered, blank lines counted as bad, and on_bad_line: skip keeping a bad line
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(st.text(max_size=20), st.just("  "), st.just("[1]"), st.just('{"text": null}'),
                                st.builds(lambda t: json.dumps({"text": t}), st.text(max_size=10) | st.integers())),
                      min_size=0, max_size=6))
def test_data_reader_returns_the_good_records_or_names_the_first_bad_line(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    lines = [line.replace("\n", " ") for line in lines]
    path.write_text("\n".join(lines), encoding="utf-8")
    good, first_bad = [], None
    for number, line in enumerate(lines, 1):
        if number == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark is not part of the first line
        if not line.strip():
            continue
        record = usable(line)
        if record is None:
            first_bad = first_bad or number
        else:
            good.append(record)
    for policy in ("fail", "skip"):
        if policy == "fail" and first_bad is not None:
            with pytest.raises(HkdError) as info:
                read_jsonl(path, policy, required=("text",))
            assert str(info.value).startswith(f"{path}:{first_bad}: "), str(info.value)
        elif not good:
            with pytest.raises(HkdError, match="has no usable records"):
                read_jsonl(path, policy, required=("text",))
        else:
            assert read_jsonl(path, policy, required=("text",)) == good
