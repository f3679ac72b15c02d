"""Property-based tests: arbitrary input gives a valid result or a clear HkdError, never a crash."""

import json
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hkd.config import Config, ConfigError, apply_overrides, from_dict
from hkd.data import read_jsonl
from hkd.errors import HkdError

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)

BASE = {
    "teacher": {"preset": "tiny-llama"},
    "student": {"preset": "tiny-llama"},
    "schedule": {"phases": [{"name": "p", "steps": 1, "stages": {"logits": 1.0}}]},
}


@settings(max_examples=150, deadline=None)
@given(section=st.sampled_from(["optim", "train", "data", "schedule", "teacher", "plugins"]),
       key=st.text(string.ascii_lowercase + "_", min_size=1, max_size=12), value=values)
def test_any_value_under_any_key_is_accepted_or_named(section, key, value):
    raw = json.loads(json.dumps(BASE))
    raw.setdefault(section, {})
    raw[section][key] = value
    try:
        config = from_dict(Config, raw)
    except ConfigError as exc:
        assert str(exc).startswith(f"{section}.{key}") or str(exc).startswith(section), str(exc)
    else:
        assert isinstance(config, Config)


@settings(max_examples=100, deadline=None)
@given(path=st.lists(st.text(string.ascii_lowercase, min_size=1, max_size=6), min_size=1, max_size=4), value=st.text(max_size=8))
def test_overrides_set_exactly_the_dotted_key(path, value):
    raw: dict = {}
    try:
        apply_overrides(raw, [f"--{'.'.join(path)}={value}"])
    except ConfigError:
        return
    node = raw
    for key in path[:-1]:
        node = node[key]
    assert path[-1] in node


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(st.text(max_size=20), st.builds(lambda t: json.dumps({"text": t}), st.text(max_size=10))), min_size=0, max_size=6))
def test_data_reader_reads_or_names_file_and_line(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line.replace("\n", " ") for line in lines), encoding="utf-8")
    try:
        records = read_jsonl(path, required=("text",))
    except HkdError as exc:
        message = str(exc)
        assert f"{path}:" in message or "no usable records" in message, message
    else:
        assert all("text" in r for r in records)
