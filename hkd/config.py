"""Typed run configuration: YAML -> dataclasses, dotted overrides, strict validation.

Every unknown key and every wrong type is rejected with its dotted path
(``schedule.phases[1].steps: expected int, got 'ten'``). Stage configs are free-form
mappings here and are validated by each stage's own dataclass when the stage is built,
with the same function and the path ``stages.<name>``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from hkd.errors import ConfigError

T = TypeVar("T")


@dataclass
class ModelConfig:
    """Where a model comes from: a local Hugging Face directory, or a tiny preset."""

    path: str | None = None  # local directory with config.json + *.safetensors
    preset: str | None = None  # e.g. "tiny-llama", "tiny-qwen2" (see hkd.models.PRESETS)
    preset_overrides: dict[str, Any] = field(default_factory=dict)  # config fields for the preset
    seed: int = 0  # weight init seed for presets
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    allow_pickle: bool = False  # load pytorch_model.bin (unpickling) only when opted in
    trust_remote_code: bool = False
    encoder: bool = False  # load with AutoModel (BERT-like); the logits stage must be off


@dataclass
class DataConfig:
    """Training text. ``jsonl``: one JSON object per line; ``synthetic``: generated arithmetic."""

    kind: Literal["jsonl", "synthetic"] = "synthetic"
    path: str | None = None
    text_field: str = "text"  # plain text to model
    prompt_field: str | None = None  # if set, text = prompt + completion, loss only on completion
    completion_field: str = "completion"
    on_bad_line: Literal["fail", "skip"] = "fail"
    chat_template: bool = False  # wrap the prompt in the tokenizer's chat template (prompt_field only)
    max_length: int = 64
    batch_size: int = 8  # sequences per micro-batch
    num_examples: int = 512  # synthetic only
    digits: int = 2  # synthetic only: operand size
    shuffle: bool = True


@dataclass
class PhaseConfig:
    """One phase of the progressive schedule: how long, and which stages with what weight."""

    name: str
    steps: int
    stages: dict[str, float]
    lr_scale: float = 1.0  # multiplies the warmup + cosine LR in this phase (e.g. a gentler RL phase)


@dataclass
class TemperatureConfig:
    kind: Literal["constant", "linear", "cosine"] = "constant"
    start: float = 1.0
    end: float = 1.0


@dataclass
class ScheduleConfig:
    phases: list[PhaseConfig] = field(default_factory=list)
    ramp_steps: int = 0  # stage weights move linearly from the previous phase's over this many steps
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1  # micro-batches per optimizer step


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"  # "auto" -> cuda if available else cpu
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate models, or shard them (FSDP2)
    checkpoint_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 3  # abort after this many skipped (NaN/inf) steps in a row
    progress: bool = True


@dataclass
class PluginsConfig:
    disable: list[str] = field(default_factory=list)


@dataclass
class WandbConfig:
    """Weights & Biases options (used only when ``wandb`` is in ``logging.backends``)."""

    project: str = "hkd"
    mode: Literal["online", "offline", "disabled"] = "offline"  # offline: files under RUN_DIR/wandb, sync later
    entity: str | None = None
    name: str | None = None  # run name (default: the run directory's name)


@dataclass
class LoggingConfig:
    """Where step metrics go; a backend not listed here does nothing."""

    backends: list[Literal["jsonl", "tensorboard", "wandb"]] = field(default_factory=lambda: ["jsonl"])
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    teacher: ModelConfig
    student: ModelConfig
    schedule: ScheduleConfig
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    kernels: dict[str, str] = field(default_factory=dict)  # op -> backend name ("auto" default)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    teacher_cache: str | None = None  # offline teacher targets (``hkd cache-teacher``): no live teacher
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # metrics backends (hkd.plugins.*_logger)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- validation


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from plain data, rejecting unknown keys and wrong types."""
    where = path or "<config>"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{_join(path, str(unknown[0]))}: unknown key; valid keys are {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, name)}: missing required key")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(path)
    return obj


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {_show(value)} matches none of {args}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {_show(value)} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_show(value)}")
        return [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_show(value)}")
        return {_convert(args[0], k, path): _convert(args[1], v, _join(path, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)  # type: ignore[arg-type]
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool):
        if isinstance(value, tp):
            return value
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"{path}: unsupported field type {tp!r}")
    raise ConfigError(f"{path}: expected {tp.__name__}, got {_show(value)}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


# --------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], yaml-parsed value). A leading ``--`` is allowed."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override {text!r}: expected --key.path=value")
    key, raw = body.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(keys[: depth + 1])} is not a mapping")
            node = child
        node[keys[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
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
        for model in (config.teacher, config.student):
            if model.path is not None and not Path(model.path).is_absolute():
                model.path = str(base / model.path)
        if config.data.path is not None and not Path(config.data.path).is_absolute():
            config.data.path = str(base / config.data.path)
        if config.teacher_cache is not None and not Path(config.teacher_cache).is_absolute():
            config.teacher_cache = str(base / config.teacher_cache)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Cross-field checks that a dataclass alone cannot express."""
    for role in ("teacher", "student"):
        model: ModelConfig = getattr(config, role)
        if (model.path is None) == (model.preset is None):
            raise ConfigError(f"{role}: set exactly one of {role}.path or {role}.preset")
    if not config.schedule.phases:
        raise ConfigError("schedule.phases: at least one phase is required")
    for i, phase in enumerate(config.schedule.phases):
        if phase.steps <= 0:
            raise ConfigError(f"schedule.phases[{i}].steps: must be positive, got {phase.steps}")
        if not phase.lr_scale > 0:
            raise ConfigError(f"schedule.phases[{i}].lr_scale: must be positive, got {phase.lr_scale}")
        for stage, weight in phase.stages.items():
            if weight < 0:
                raise ConfigError(f"schedule.phases[{i}].stages.{stage}: weight must be >= 0, got {weight}")
    if config.schedule.ramp_steps < 0:
        raise ConfigError("schedule.ramp_steps: must be >= 0")
    if config.schedule.temperature.start <= 0 or config.schedule.temperature.end <= 0:
        raise ConfigError("schedule.temperature: start and end must be > 0")
    if not config.optim.lr > 0:
        raise ConfigError(f"optim.lr: must be > 0, got {config.optim.lr}")
    if config.optim.grad_accum < 1:
        raise ConfigError(f"optim.grad_accum: must be >= 1, got {config.optim.grad_accum}")
    if config.data.batch_size < 1:
        raise ConfigError(f"data.batch_size: must be >= 1, got {config.data.batch_size}")
    if config.data.chat_template and config.data.kind == "jsonl" and config.data.prompt_field is None:
        raise ConfigError("data.chat_template: needs data.prompt_field (the template wraps the prompt)")
    if config.data.kind == "jsonl" and not config.data.path:
        raise ConfigError("data.path: required when data.kind is 'jsonl'")
    if len(config.optim.betas) != 2:
        raise ConfigError(f"optim.betas: expected two numbers, got {config.optim.betas}")
