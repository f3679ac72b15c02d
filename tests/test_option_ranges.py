"""Every numeric option has its range in one place (``ranged`` fields; command-line flags built from the same
Range objects, hkd/config/flags.py) and enumerated ones are checked before they reach torch.
Issue "Nothing silently wrong, on the whole surface", class 7."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hkd.cli import build_parser, main
from hkd.config import Config, ConfigError, Range, from_dict, load_config


def config_classes() -> list[type]:
    """Every config dataclass a user writes: the run's, eval's, generate's and each built-in stage's."""
    from hkd.commands.evaluate import EvalConfig
    from hkd.commands.generate import GenerateConfig
    from hkd.plugin.manager import build_manager
    from hkd.plugin.stage import available_stages

    found: list[type] = []

    def walk(cls: type) -> None:
        if cls in found:
            return
        found.append(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            for t in leaf_types(hints[f.name]):
                if dataclasses.is_dataclass(t):
                    walk(t)

    for root in (Config, EvalConfig, GenerateConfig):
        walk(root)
    for spec in available_stages(build_manager()).values():
        if spec.config_cls.__module__.startswith("hkd."):  # built-in stages (a plugin's are its own)
            walk(spec.config_cls)
    return found


def leaf_types(tp: Any) -> list[Any]:
    out: list[Any] = []
    for arg in [a for a in (typing.get_args(tp) or (tp,)) if a is not type(None)]:
        if typing.get_origin(arg) is typing.Literal:
            continue
        out += list(typing.get_args(arg)) if typing.get_origin(arg) in (list, dict) else [arg]
    return out


CLASSES = config_classes()
RANGED = [(cls, f.name, f.metadata["range"]) for cls in CLASSES for f in dataclasses.fields(cls)
          if "range" in f.metadata]


def test_every_numeric_option_has_a_range():
    # catches: a numeric option (an eval prompts batch_size, an RL num_prompts) with no range, so 0 reached
    # range() and 10**12 hung
    missing = [f"{cls.__name__}.{f.name}" for cls in CLASSES for f in dataclasses.fields(cls)
               if any(t in (int, float) for t in leaf_types(typing.get_type_hints(cls)[f.name]))
               and "range" not in f.metadata]
    assert missing == []
    assert {c.__name__ for c in CLASSES} >= {"EvalPromptsConfig", "FilterConfig", "RlStageConfig", "LogitsStageConfig"}


@settings(max_examples=400, deadline=None)
@given(index=st.integers(0, len(RANGED) - 1),
       number=st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False,
                                                                min_value=-1e30, max_value=1e30)))
def test_every_ranged_option_refuses_exactly_outside_its_range(index, number):
    """Property over every ranged option of every config class: outside its range, the refusal names the
    dotted path and the range; inside, the range is never the reason for a refusal."""
    cls, name, bounds = RANGED[index]
    tp = [t for t in leaf_types(typing.get_type_hints(cls)[name]) if t in (int, float)][0]
    if tp is int and isinstance(number, float):
        return
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType")):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    outer = typing.get_origin(hint)
    value: Any = [number] if outer is list else {"s": number} if outer is dict else number
    data = {**BASES.get(f"{cls.__module__}.{cls.__name__}", {}), name: value}
    if isinstance(number, int) and tp is float and float(number) != number:
        return  # refused as inexact, tested elsewhere
    try:
        from_dict(cls, data, "sec")
    except ConfigError as exc:
        message = str(exc)
        if float(number) in bounds:
            assert "is outside" not in message, message
        else:
            assert re.search(rf"sec\.{name}(\[0\]|\.s)?: .* is outside {re.escape(str(bounds))}", message), message
    else:
        assert float(number) in bounds


BASES: dict[str, dict[str, Any]] = {  # the required keys of each class, by module and name
    "hkd.config.schema.Config": {"teacher": {"preset": "tiny-llama"}, "student": {"preset": "tiny-llama"},
                                 "schedule": {"phases": [{"name": "p", "steps": 1, "stages": {"logits": 1.0}}]}},
    "hkd.config.schema.PhaseConfig": {"name": "p", "steps": 1, "stages": {"logits": 1.0}},
    "hkd.commands.evaluate.EvalPromptsConfig": {"path": "p.jsonl", "verifiers": [{"name": "exact_answer"}]},
    "hkd.commands.evaluate.EvalConfig": {"model": {"preset": "tiny-llama"}, "output": "o.json",
                                         "text": {"kind": "synthetic"}},
    "hkd.commands.generate.GenerateConfig": {"teacher": {"preset": "tiny-llama"}, "prompts": "p.jsonl",
                                             "output": "o.jsonl"},
    "hkd.sampling.augment.TransformConfig": {"name": "arith_operands"},
}


def test_the_issue_examples(tmp_path, raw_config):
    # catches: an eval prompts batch_size of 0 reaching range(); an unknown compile backend reaching dynamo
    # at the first step; more synthetic problems than exist raising a ValueError after the models loaded
    from hkd.commands.evaluate import EvalConfig

    with pytest.raises(ConfigError, match=r"prompts\.batch_size: 0 is outside \[1, 65536\]"):
        from_dict(EvalConfig, {**BASES["hkd.commands.evaluate.EvalConfig"],
                               "prompts": {**BASES["hkd.commands.evaluate.EvalPromptsConfig"], "batch_size": 0}})
    raw_config["train"].update(compile=True, compile_backend="inductr")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw_config))
    with pytest.raises(ConfigError, match=r"train\.compile_backend: 'inductr' is not a torch\.compile backend"):
        load_config(tmp_path / "c.yaml")
    raw_config["train"].update(compile=False, compile_backend="inductor")
    raw_config["data"].update(num_examples=101, digits=1)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw_config))
    with pytest.raises(ConfigError, match=r"data\.num_examples: 101 asked for, but only 100 distinct 1-digit"):
        load_config(tmp_path / "c.yaml")
    raw_config["data"]["num_examples"] = 90
    raw_config["eval"] = {"every": 1, "num_examples": 20}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw_config))
    with pytest.raises(ConfigError, match=r"eval\.num_examples: 20 held-out problems besides 90"):
        load_config(tmp_path / "c.yaml")
    raw_config["eval"]["num_examples"] = 10
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw_config))
    assert load_config(tmp_path / "c.yaml").data.num_examples == 90  # exactly all 100 problems: fine


def flag_actions() -> list[tuple[str, str, Range, type]]:
    """(command, flag, range, kind) of every flag whose type was built from a Range."""
    out = []
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in sub.choices.items():
        for action in parser._actions:
            bounds = getattr(action.type, "bounds", None)
            if bounds is not None:
                out.append((command, action.option_strings[0], bounds, action.type.kind))
    return out


FLAGS = flag_actions()


def test_every_numeric_flag_has_a_range():
    # catches: a numeric flag parsed with a bare int/float (probe --batches 10**9 hung, demo --threads 0)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bare = [f"{c} {a.option_strings}" for c, p in sub.choices.items() for a in p._actions if a.type in (int, float)]
    assert bare == [] and len(FLAGS) >= 14


@settings(max_examples=200, deadline=None)
@given(index=st.integers(0, len(FLAGS) - 1), number=st.one_of(st.integers(-(2**66), 2**66), st.floats()))
def test_every_flag_refuses_exactly_outside_its_range_in_one_line(index, number, tmp_path_factory):
    """Property over every ranged flag: outside its range (or not a finite number) the command line is
    refused with one ``hkd: error:`` line naming the flag and the range, before any work; inside it parses."""
    import contextlib
    import io

    command, flag, bounds, kind = FLAGS[index]
    if kind is int and isinstance(number, float):
        return
    text = repr(number) if isinstance(number, float) else str(number)
    finite = not isinstance(number, float) or math.isfinite(number)
    argv = {"init-model": ["init-model", "tiny-llama", "--out", "x"],
            "init-student": ["init-student", "--teacher", "t", "--out", "x", "--data", "d.jsonl"],
            "cache-teacher": ["cache-teacher", "c.yaml", "--targets", "sampled" if flag != "--top-k" else "topk"],
            "probe": ["probe", "run"], "demo": ["demo"]}[command] + [f"{flag}={text}"]  # = : a negative value
    if finite and number in bounds:
        args, _ = build_parser().parse_known_args(argv)
        assert getattr(args, flag.removeprefix("--").replace("-", "_")) == kind(text)
        return
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"hkd: error: {flag}: "), lines
    assert (str(bounds) in lines[0]) if finite else "finite" in lines[0] or "expected" in lines[0], lines


def test_the_python_api_checks_the_flags_ranges(tmp_path):
    # catches: the same values refused on the command line but hanging when a notebook calls the command
    from hkd.commands.probe import probe

    with pytest.raises(ConfigError, match=r"probe --batches: 1000000 is outside \[1, 100000\]"):
        probe(tmp_path, batches=10**6)


@pytest.mark.parametrize("argv,pattern", [
    (["probe"], r"^hkd: error: the following arguments are required: run_dir \(see hkd probe --help\)$"),
    (["report", "r", "--stpes", "1"], r"^hkd: error: unrecognised argument\(s\) \['--stpes', '1'\]; see hkd report"),
    (["cache-teacher", "c.yaml", "--targets", "topx"], r"^hkd: error: --targets: invalid choice: 'topx'"),
])
def test_a_refused_command_line_is_one_line(argv, pattern, capsys):
    # catches: argparse's usage block (several lines, no 'hkd: error:'), and a misspelt flag silently ignored
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(pattern, err), err


def test_no_flag_range_is_declared_twice():
    # catches: a flag whose range drifted from the config key it sets (--seed vs train.seed)
    from hkd.config import TrainConfig
    from hkd.config import flags

    assert flags.SEED is dataclasses.fields(TrainConfig)[0].metadata["range"]
    assert isinstance(Path(flags.__file__), Path)
