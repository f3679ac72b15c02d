"""Reading a run configuration: YAML, dotted overrides, cross-field validation.

YAML is read by :func:`load_yaml`: a safe loader that refuses duplicate keys (the last one
would silently win) and documents whose aliases expand beyond a bound (alias bombs).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

from hkd.config.needs import CONFIG_NEEDS, check_needs
from hkd.config.schema import MAX_STEPS, Config, DataConfig, ModelConfig, from_dict
from hkd.errors import ConfigError


MAX_YAML_CHARS = 4 << 20  # a config is a few kB; anything this large is a mistake
MAX_YAML_NODES = 100_000  # nodes after expanding aliases: far above any config, far below a bomb
_MERGE = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (it would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:  # "<<: *base" merges; explicit keys may override merged ones
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line)
            except TypeError:  # unhashable key: the base class reports it
                continue
            if first != key_node.start_mark.line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Nodes ``node`` stands for once every alias is expanded (memoised: linear in the document)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise ConfigError("an alias refers to a node that contains it (recursive YAML)")
    open_nodes.add(key)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    total = 1
    for child in children:
        total += _expanded_size(child, sizes, open_nodes)
        if total > MAX_YAML_NODES:
            break
    open_nodes.discard(key)
    sizes[key] = total
    return total


def _one_line(exc: yaml.YAMLError) -> str:
    """PyYAML messages span lines; the CLI prints one."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        return where + " ".join(f"{exc.context + ': ' if exc.context else ''}{exc.problem}".split())
    return " ".join(str(exc).split())


def load_yaml(text: str, where: str) -> Any:
    """Parse one YAML document strictly; every problem is a :class:`ConfigError` naming ``where``."""
    if len(text) > MAX_YAML_CHARS:
        raise ConfigError(f"{where}: {len(text)} characters is too large for a config (limit {MAX_YAML_CHARS})")
    try:
        loader = StrictLoader(text)  # the reader checks characters here
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {_one_line(exc)}") from exc
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = _expanded_size(node, {}, set())
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if size > MAX_YAML_NODES:
            raise ConfigError(f"{where}: the document expands to more than {MAX_YAML_NODES} nodes "
                              "(aliases referring to aliases?); write the values out")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {_one_line(exc)}") from exc
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()


# --------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], yaml-parsed value). A leading ``--`` is allowed."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override {text!r}: expected --key.path=value")
    key, raw = body.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key segment")
    value = load_yaml(raw, f"override {text!r}: value") if raw != "" else ""
    return key.split("."), value


# a model comes from exactly one source: an override that names one clears the other (and says so)
MODEL_SOURCES = {"path": ("preset", "preset_overrides", "seed"), "preset": ("path",)}
# override values under these keys are file system paths: relative to the working directory,
# not to the YAML file (the loaders resolve the file's own paths against the file)
PATH_KEYS = frozenset({"path", "teacher_cache", "output", "prompts"})


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        if keys[-1] in PATH_KEYS and isinstance(value, str) and value:
            value = str(Path(value).resolve())
        node = raw
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(keys[: depth + 1])} is not a mapping")
            node = child
        if keys[-1] in MODEL_SOURCES and value is not None:
            cleared = [f"{'.'.join(keys[:-1])}.{other}" for other in MODEL_SOURCES[keys[-1]] if node.pop(other, None)]
            if cleared:
                print(f"hkd: --{'.'.join(keys)} clears {' and '.join(cleared)} (a model has one source)", file=sys.stderr)
        node[keys[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    raw = load_yaml(text, str(p)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:  # type: ignore[assignment]
    """Read YAML, apply ``--a.b=value`` overrides, validate, and resolve relative paths."""
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, list(overrides))
    config = from_dict(Config, raw)
    if path is not None:
        base = Path(path).resolve().parent
        for model in (config.teacher, config.student, *config.teachers):
            if model.path is not None and not Path(model.path).is_absolute():
                model.path = str(base / model.path)
        for extra in config.teachers:
            if extra.teacher_cache is not None and not Path(extra.teacher_cache).is_absolute():
                extra.teacher_cache = str(base / extra.teacher_cache)
        if config.data.path is not None and not Path(config.data.path).is_absolute():
            config.data.path = str(base / config.data.path)
        if config.teacher_cache is not None and not Path(config.teacher_cache).is_absolute():
            config.teacher_cache = str(base / config.teacher_cache)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Cross-field checks that a dataclass alone cannot express."""
    models: list[tuple[str, ModelConfig]] = [("teacher", config.teacher), ("student", config.student)]
    models += [(f"teachers[{i}]", extra) for i, extra in enumerate(config.teachers)]
    for role, model in models:
        if (model.path is None) == (model.preset is None):
            raise ConfigError(f"{role}: set exactly one of {role}.path or {role}.preset")
    if not config.schedule.phases:  # single values' ranges are checked by from_dict (ranged fields)
        raise ConfigError("schedule.phases: at least one phase is required")
    if sum(phase.steps for phase in config.schedule.phases) > MAX_STEPS:
        raise ConfigError(f"schedule.phases: {sum(p.steps for p in config.schedule.phases)} steps in all; "
                          f"at most {MAX_STEPS}")
    check_device(config.train.device, "train.device")
    if config.data.chat_template and config.data.kind == "jsonl" and config.data.prompt_field is None \
            and config.data.messages_field is None:
        raise ConfigError("data.chat_template: needs data.prompt_field (the template wraps the prompt)")
    if config.data.messages_field is not None:
        if config.data.kind == "synthetic":
            raise ConfigError("data.messages_field: conversations are read from a file (data.kind: jsonl or hf)")
        if config.data.prompt_field is not None:
            raise ConfigError(f"data.messages_field: records are either conversations or prompt/completion pairs; "
                              f"unset data.prompt_field ({config.data.prompt_field!r}) or data.messages_field")
        if config.student.encoder:
            raise ConfigError("data.messages_field: conversations train causal LMs (student.encoder is set)")
    if config.data.kind in ("jsonl", "hf") and not config.data.path:
        raise ConfigError(f"data.path: required when data.kind is {config.data.kind!r}")
    if config.data.streaming and (config.data.kind != "hf" or config.data.packing):
        raise ConfigError("data.streaming: needs data.kind: hf and no data.packing")
    if config.data.packing and (config.student.encoder or config.teacher_cache is not None):
        raise ConfigError("data.packing: needs causal LMs and a live teacher "
                          f"({'student.encoder is set' if config.student.encoder else 'teacher_cache is set'})")
    if len(config.optim.betas) != 2:
        raise ConfigError(f"optim.betas: expected two numbers, got {config.optim.betas}")
    if config.kernels:
        from hkd.kernels import OPS

        for op in config.kernels:  # a misspelt op would choose a backend for nothing
            if op not in OPS:
                raise ConfigError(f"kernels.{op}: not a kernel op; the ops are {list(OPS)} (hkd kernels lists them)")
    if config.train.compile:
        check_compile_backend(config.train.compile_backend, "train.compile_backend")
    held_out = config.eval.num_examples if config.eval.every and config.eval.path is None else 0
    check_synthetic(config.data, "data", held_out)
    check_needs(config, CONFIG_NEEDS)  # options that act only with another (hkd/config/needs.py)


def check_synthetic(data: DataConfig, where: str, held_out: int = 0) -> None:
    """Synthetic data asks for no more distinct problems than its operand size has (else a ValueError at encoding)."""
    if data.kind != "synthetic":
        return
    distinct = (10**data.digits - (10 ** (data.digits - 1) if data.digits > 1 else 0)) ** 2
    if data.num_examples > distinct:
        raise ConfigError(f"{where}.num_examples: {data.num_examples} asked for, but only {distinct} distinct "
                          f"{data.digits}-digit problems exist; raise {where}.digits or lower {where}.num_examples")
    if data.num_examples + held_out > distinct:
        raise ConfigError(f"eval.num_examples: {held_out} held-out problems besides {data.num_examples} training ones, "
                          f"but only {distinct} distinct {data.digits}-digit problems exist; lower one of them")


def check_compile_backend(name: str, path: str) -> None:
    """``name`` is a backend ``torch.compile`` knows here (an unknown one failed inside dynamo at the first step)."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if name not in known:
        raise ConfigError(f"{path}: {name!r} is not a torch.compile backend here; available: {sorted(known)}")


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device(name: str, path: str) -> None:
    """``name`` is a device torch can use here: ``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N``."""
    if not DEVICE.fullmatch(name):
        raise ConfigError(f"{path}: {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= count:
            found = f"{count} CUDA device(s)" if count else "no CUDA device (torch.cuda.is_available() is False)"
            raise ConfigError(f"{path}: {name!r} asked for, but this machine has {found}; use auto or cpu")
    elif name == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise ConfigError(f"{path}: 'mps' asked for, but MPS is not available here; use auto or cpu")
