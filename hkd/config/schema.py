"""Typed run configuration: the dataclasses, their ranges, and dict -> dataclass conversion.

Every unknown key, wrong type and out-of-range value is rejected with its dotted path
(``schedule.phases[1].steps: expected int, got 'ten'``, ``optim.betas[1]: 1.0 is outside
[0, 1)``). A field's range lives in one place, its dataclass field (:func:`ranged`), and
:func:`from_dict` checks it for every dataclass it builds; every float must be finite.
Stage configs are free-form mappings here and are validated by each stage's own dataclass
when the stage is built, with the same function and the path ``stages.<name>``.

Reading YAML, dotted overrides and cross-field checks live in :mod:`hkd.config.load`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union


from hkd.errors import ConfigError

T = TypeVar("T")

MAX_SEED = 2**63  # torch.manual_seed takes seeds below 2**64; numpy-style consumers below 2**63
MAX_STEPS = 10**9


@dataclass(frozen=True)
class Range:
    """An interval a number must lie in; ``None`` is unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        if self.high is not None and not (value < self.high if self.high_open else value <= self.high):
            return False
        return True

    def __str__(self) -> str:
        low = "-inf" if self.low is None else _number(self.low)
        high = "inf" if self.high is None else _number(self.high)
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{left}{low}, {high}{right}"


def _number(value: float) -> str:
    if isinstance(value, int) and value >= 2**20 and value & (value - 1) == 0:
        return f"2**{value.bit_length() - 1}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def ranged(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
           low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Any:
    """A dataclass field whose value (each element, for a list or mapping) must lie in a range."""
    bounds = Range(low, high, low_open, high_open)
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata={"range": bounds})
    return field(default=default, metadata={"range": bounds})


@dataclass
class ModelConfig:
    """Where a model comes from: a local Hugging Face directory, or a tiny preset."""

    path: str | None = None  # local directory with config.json + *.safetensors
    preset: str | None = None  # e.g. "tiny-llama", "tiny-qwen2" (see hkd.models.loading.PRESETS)
    preset_overrides: dict[str, Any] = field(default_factory=dict)  # config fields for the preset
    seed: int = ranged(0, low=0, high=MAX_SEED, high_open=True)  # weight init seed for presets
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype the weights are loaded in
    allow_pickle: bool = False  # load pytorch_model.bin (unpickling) only when opted in
    trust_remote_code: bool = False  # run Python code shipped in the model directory (transformers' trust_remote_code)
    encoder: bool = False  # load with AutoModel (BERT-like); the logits stage must be off
    # regular expressions (full match) of parameter names the weights may lack or hold extra, e.g.
    # "lm_head\\.weight" for a head tied by hand; anything else missing or extra is an error
    allow_missing: list[str] = field(default_factory=list)
    allow_unexpected: list[str] = field(default_factory=list)  # the same, for tensors the weights hold that the model has no place for

    def validate(self, path: str) -> None:
        for name in ("allow_missing", "allow_unexpected"):
            for i, pattern in enumerate(getattr(self, name)):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"{_join(path, name)}[{i}]: {pattern!r} is not a regular expression: {exc}") from None


@dataclass
class TeacherModelConfig(ModelConfig):
    """A teacher model: where it comes from and where it runs (hkd/train/placement.py, docs/teacher-ranks.md)."""

    # colocated: in every student process (sharded with it under FSDP); ranks: on its own torchrun ranks,
    # sending each student rank only what the active stages ask
    placement: Literal["colocated", "ranks"] = "colocated"
    ranks: int = ranged(1, low=1, high=2**16)  # placement ranks: how many torchrun ranks hold this teacher (the last ones)
    transfer: Literal["full", "topk"] = "full"  # placement ranks: full logits, or top_k logits with the exact tail's log-normaliser
    top_k: int = ranged(64, low=1, high=2**20)  # transfer topk: logits sent per position
    run_ahead: int = ranged(2, low=1, high=4096)  # placement ranks: micro-batches a teacher rank may compute ahead of its students
    timeout_s: float = ranged(600.0, low=1, high=86400)  # placement ranks: a teacher rank silent this long stops the run, named

    def validate(self, path: str) -> None:
        super().validate(path)
        if self.placement == "colocated":
            for name, default in (("ranks", 1), ("transfer", "full"), ("top_k", 64), ("run_ahead", 2), ("timeout_s", 600.0)):
                if getattr(self, name) != default:
                    raise ConfigError(f"{_join(path, name)}: applies to {_join(path, 'placement')}: ranks "
                                      "(this teacher is colocated with the student)")
        elif self.transfer == "full" and self.top_k != 64:
            raise ConfigError(f"{_join(path, 'top_k')}: applies to {_join(path, 'transfer')}: topk")


@dataclass
class TeacherConfig(TeacherModelConfig):
    """One more teacher (``teachers:``): a model source, its weight in the mixture, or an offline cache."""

    weight: float = ranged(1.0, low=0, low_open=True, high=1e6)  # this teacher's weight in the mixture (or sum)
    teacher_cache: str | None = None  # targets written by hkd cache-teacher for this teacher


@dataclass
class DataConfig:
    """Training text. ``jsonl``: one JSON object per line; ``synthetic``: generated arithmetic;
    ``hf``: a JSONL/Parquet/Arrow file through Hugging Face ``datasets`` (memory-mapped, tokenised
    once and cached next to it; hkd/data/hf.py)."""

    kind: Literal["jsonl", "synthetic", "hf"] = "synthetic"  # where the examples come from (see above)
    path: str | None = None  # the data file (kind jsonl or hf); relative to the config file
    text_field: str = "text"  # plain text to model
    prompt_field: str | None = None  # if set, text = prompt + completion, loss only on completion
    completion_field: str = "completion"  # with prompt_field: the field holding the completion (the loss's targets)
    on_bad_line: Literal["fail", "skip"] = "fail"  # a malformed JSONL line: stop, naming file and line (fail), or skip it
    chat_template: bool = False  # wrap the prompt in the tokenizer's chat template (prompt_field only)
    # conversations: the field holding each record's list of {role, content} messages (TRL's
    # conversational format), rendered with the tokenizer's chat template; loss on assistant turns only
    messages_field: str | None = None
    max_length: int = ranged(64, low=2, high=2**20)  # tokens per sequence (bos + at least one target)
    batch_size: int = ranged(8, low=1, high=2**16)  # sequences per micro-batch
    num_examples: int = ranged(512, low=1, high=10**7)  # synthetic only
    digits: int = ranged(2, low=1, high=18)  # synthetic only: operand size
    shuffle: bool = True  # shuffle the examples every epoch (seeded by train.seed)
    packing: bool = False  # several examples per sequence, no attention or loss across their boundaries (causal LMs)
    num_proc: int = ranged(1, low=1, high=256)  # kind hf: tokeniser processes (once; the result is cached)
    streaming: bool = False  # kind hf: read and tokenise on the fly (no cache, no packing; shuffles in a buffer)


@dataclass
class PhaseConfig:
    """One phase of the progressive schedule: how long, and which stages with what weight."""

    name: str  # the phase's name in logs, metrics and hkd report
    steps: int = ranged(low=1, high=MAX_STEPS)  # optimizer steps in this phase
    stages: dict[str, float] = ranged(low=0, high=1e6)  # stage -> weight
    lr_scale: float = ranged(1.0, low=0, low_open=True, high=1e3)  # multiplies the warmup + cosine LR in this phase (e.g. a gentler RL phase)
    # stage -> options that replace ``stages.<stage>``'s in this phase (merged key by key), e.g.
    # {hidden: {layer_map: {strategy: last}}}: the stage is then its own instance in this phase
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class TemperatureConfig:
    kind: Literal["constant", "linear", "cosine"] = "constant"  # constant: start throughout; linear or cosine: from start to end over the whole schedule
    start: float = ranged(1.0, low=0, low_open=True, high=1e4)  # distillation temperature at the first step
    end: float = ranged(1.0, low=0, low_open=True, high=1e4)  # distillation temperature at the last step (linear, cosine)


@dataclass
class ScheduleConfig:
    phases: list[PhaseConfig] = field(default_factory=list)  # the phases in order; the run's length is the sum of their steps
    ramp_steps: int = ranged(0, low=0, high=MAX_STEPS)  # stage weights move linearly from the previous phase's over this many steps
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)  # the distillation temperature T over the run


@dataclass
class OptimConfig:
    lr: float = ranged(1e-3, low=0, low_open=True, high=1e3)  # peak learning rate (AdamW), reached after warmup_steps, then cosine decay
    weight_decay: float = ranged(0.01, low=0)  # AdamW's decoupled weight decay
    betas: list[float] = ranged(default_factory=lambda: [0.9, 0.95], low=0, high=1, high_open=True)  # AdamW's (beta1, beta2)
    warmup_steps: int = ranged(0, low=0, high=MAX_STEPS)  # linear warmup from 0 to lr over this many steps
    min_lr_ratio: float = ranged(0.1, low=0, high=1)  # cosine decays to lr * min_lr_ratio
    grad_clip: float = ranged(1.0, low=0)  # 0 disables clipping
    grad_accum: int = ranged(1, low=1, high=2**16)  # micro-batches per optimizer step


@dataclass
class TrainConfig:
    seed: int = ranged(0, low=0, high=MAX_SEED, high_open=True)  # seeds every RNG at the start (stage projectors), the data order and synthetic data
    device: str = "auto"  # "auto" -> cuda if available else cpu; "cpu", "cuda", "cuda:N", "mps"
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate models, or shard them (FSDP2)
    checkpoint_every: int = ranged(0, low=0, high=MAX_STEPS)  # 0: only the final checkpoint
    keep_checkpoints: int = ranged(2, low=0, high=10**6)  # 0 keeps every checkpoint
    max_nonfinite_steps: int = ranged(3, low=1, high=10**6)  # abort after this many skipped (NaN/inf) steps in a row
    progress: bool = True  # a progress bar on a terminal, else a plain line every 30 s (--no-progress: off)
    # fp32 | bf16-mixed (fp32 weights and AdamW state, forwards under bf16 autocast) | bf16
    # (student weights and AdamW state in bf16: least memory); auto = bf16-mixed on CUDA, else fp32.
    # Whenever it is not fp32 the teacher runs in bf16.
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = "auto"
    activation_checkpointing: bool = False  # recompute the student's blocks in backward (non-reentrant)
    compile: bool = False  # torch.compile the student's body (the LM head and losses stay eager)
    compile_backend: str = "inductor"  # any torch.compile backend name


@dataclass
class EvalConfig:
    """Validation while training (hkd/train/validation.py): held-out loss, agreement and KL, best model, early stop."""

    every: int = ranged(0, low=0, high=MAX_STEPS)  # evaluate every N optimizer steps (0: never)
    path: str | None = None  # held-out JSONL read with data's fields; synthetic data: None = fresh problems
    num_examples: int = ranged(64, low=1, high=10**6)  # synthetic held-out problems (disjoint from training)
    max_batches: int = ranged(8, low=1, high=10**6)  # data.batch_size sequences each
    # best/ keeps the best by this; loss: the held-out weighted stage losses (any student, encoders
    # included; comparable within a phase, since the weights change between phases)
    metric: Literal["kl", "top1_agreement", "student_nll", "loss"] = "kl"
    patience: int = ranged(0, low=0, high=10**6)  # stop after this many evaluations without improvement (0: never)
    min_delta: float = ranged(0.0, low=0)  # an improvement must beat the best by more than this


@dataclass
class PluginsConfig:
    disable: list[str] = field(default_factory=list)  # plugins to switch off by name (as --disable NAME)


@dataclass
class WandbConfig:
    """Weights & Biases options (used only when ``wandb`` is in ``logging.backends``)."""

    project: str = "hkd"  # the W&B project
    mode: Literal["online", "offline", "disabled"] = "offline"  # offline: files under RUN_DIR/wandb, sync later
    entity: str | None = None  # the W&B team or user (default: your default entity)
    name: str | None = None  # run name (default: the run directory's name)


@dataclass
class LoggingConfig:
    """Where step metrics go; a backend not listed here does nothing."""

    backends: list[Literal["jsonl", "tensorboard", "wandb"]] = field(default_factory=lambda: ["jsonl"])  # jsonl: RUN_DIR/metrics.jsonl (what hkd report reads); tensorboard: RUN_DIR/tensorboard/; wandb
    wandb: WandbConfig = field(default_factory=WandbConfig)  # options of the wandb backend


@dataclass
class Config:
    teacher: TeacherModelConfig  # the model distilled from (teacher 0 when teachers: adds more)
    student: ModelConfig  # the model trained
    schedule: ScheduleConfig  # phases, their stage weights, ramps and the temperature
    data: DataConfig = field(default_factory=DataConfig)  # the training examples
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and the warmup + cosine learning rate
    train: TrainConfig = field(default_factory=TrainConfig)  # seed, device, checkpoints, precision, parallelism
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage name -> its options, checked by the stage's own dataclass (below)
    kernels: dict[str, str] = field(default_factory=dict)  # op -> backend name ("auto" default)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)  # plugins switched off for this run
    teacher_cache: str | None = None  # offline teacher targets (``hkd cache-teacher``): no live teacher
    # several teachers: ``teacher`` is teacher 0 with weight ``teacher_weight``; ``teachers`` are
    # 1, 2, ...; the logits stage distils towards their weighted mixture (stages.logits.teachers)
    teachers: list[TeacherConfig] = field(default_factory=list)
    teacher_weight: float = ranged(1.0, low=0, low_open=True, high=1e6)  # teacher's weight in the mixture (or sum) with teachers
    eval: EvalConfig = field(default_factory=EvalConfig)  # validation while training
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
            bounds = f.metadata.get("range")
            if bounds is not None:
                _check_range(kwargs[name], bounds, _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, name)}: missing required key")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(path)
    return obj


def _check_range(value: Any, bounds: Range, path: str) -> None:
    """``value`` (or each element of a list or mapping) lies in ``bounds``; ``None`` is not checked."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_range(item, bounds, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_range(item, bounds, _join(path, str(key)))
    elif value is not None and value not in bounds:
        raise ConfigError(f"{path}: {value!r} is outside {bounds}")


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
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond float's range
                raise ConfigError(f"{path}: {value!r} is not a finite number") from None
            if isinstance(value, int) and number != value:  # 2**53 + 1 would silently become 2**53
                raise ConfigError(f"{path}: {value} has no exact float value; the nearest is {number:.17g}")
        elif isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # NaN compares false with everything: a NaN weight never runs
                raise ConfigError(f"{path}: {value!r} is not a finite number")
            return number
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


# --------------------------------------------------------------------------- YAML
