"""Options that act only together with another: one declarative table per config, checked in one place.

An option set away from its default while the option it depends on says it cannot act
(``eval: {every: 0, patience: 3}``: never evaluated, so never stopped early) is refused by
:func:`check_needs`, naming the option, its value, what it needs and what that is now. Where
the leftover is harmless (a ``logging.wandb`` block while wandb is not a backend, a stage's
options while no phase schedules it) it is a warning instead.

A table row is a :class:`Need`: the option's dotted path from the config's root (``[]``: every
element of a list, ``*``: every key of a mapping), what it needs in words, and a test on the
root config. An option counts as set when it differs from its dataclass default (a mapping's
key: when present). :data:`CONFIG_NEEDS` covers ``hkd distill`` configs, :data:`EVAL_NEEDS` and
:data:`GENERATE_NEEDS` the ``eval`` and ``generate`` configs; a stage's config dataclass may
declare its own rows as a class attribute ``NEEDS`` (paths from the stage's options), which
:func:`hkd.plugin.stage.build_stages` checks the same way.

Saved configs of earlier runs are read without these checks (``hkd probe``, ``hkd report``,
``--resume``): they describe what ran, not what will.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from hkd.errors import ConfigError, warn


@dataclass(frozen=True)
class Need:
    """One row: ``option`` acts only when ``holds(root, item)`` (``item``: the list index or mapping key the
    path's wildcard stands for, else ``None``); ``requires`` says what that needs, ``shows`` which keys'
    values to quote in the refusal. ``warn``: harmless, a warning rather than a refusal."""

    option: str
    requires: str
    holds: Callable[[Any, Any], bool]
    shows: tuple[str, ...] = ()
    warn: bool = False


def _walk(node: Any, parts: list[str], path: str, item: Any) -> Iterator[tuple[str, Any, Any, Any]]:
    """(dotted path, value, default, wildcard item) of every option ``parts`` names below ``node``."""
    head, rest = parts[0], parts[1:]
    if head == "*":  # every key of a mapping: set when present
        for key, value in (node or {}).items():
            here = f"{path}.{key}" if path else str(key)
            if rest:
                yield from _walk(value, rest, here, key)
            else:
                yield here, value, dataclasses.MISSING, key
        return
    name, many = (head[:-2], True) if head.endswith("[]") else (head, False)
    if not dataclasses.is_dataclass(node):
        return
    here = f"{path}.{name}" if path else name
    value = getattr(node, name)
    if many:
        for index, element in enumerate(value or []):
            yield from _walk(element, rest, f"{here}[{index}]", index)
        return
    if rest:
        yield from _walk(value, rest, here, item)
        return
    spec = {f.name: f for f in dataclasses.fields(node)}[name]
    default = spec.default if spec.default_factory is dataclasses.MISSING else spec.default_factory()  # type: ignore[misc]
    yield here, value, default, item


def _value_at(root: Any, dotted: str, item: Any) -> Any:
    """The value at ``dotted`` from ``root``, its wildcard (``[]`` or ``*``) standing for ``item``."""
    node = root
    for part in dotted.split("."):
        if part == "*":
            node = node.get(item) if isinstance(node, dict) else None
            continue
        many = part.endswith("[]")
        node = node.get(part) if isinstance(node, dict) else getattr(node, part[:-2] if many else part, None)
        if many:
            node = node[item] if isinstance(node, list) and isinstance(item, int) and item < len(node) else None
    return node


def _shown(value: Any) -> str:
    return repr(value) if not isinstance(value, (list, dict)) or len(repr(value)) < 60 else type(value).__name__


def check_needs(root: Any, table: list[Need], prefix: str = "") -> None:
    """Refuse (or warn about) every option of ``root`` that ``table`` says cannot act in this config."""
    for need in table:
        for path, value, default, item in _walk(root, need.option.split("."), "", None):
            if default is not dataclasses.MISSING and value == default:
                continue
            if need.holds(root, item):
                continue
            where = f"{prefix}.{path}" if prefix else path
            now = "; ".join(f"{prefix + '.' if prefix else ''}{key.replace('[]', f'[{item}]')} is "
                            f"{_shown(_value_at(root, key, item))}" for key in need.shows)
            message = (f"{where}: {_shown(value)} has no effect unless {need.requires}"
                       f"{f' ({now})' if now else ''}")
            if need.warn:
                warn(f"{message}; it is ignored")
            else:
                raise ConfigError(f"{message}; remove it or change that")


def _messages(data: Any) -> Any:
    """A data block's conversation field, where this version of the config has one."""
    return getattr(data, "messages_field", None)


def _data_rows(data: str, extra_text: Callable[[Any], bool] = lambda root: False,
               extra_words: str = "") -> list[Need]:
    """The rows of a data block at ``data`` (``data``, ``text``); ``extra_text``: the root reads text files
    with this block's fields even when its own kind is synthetic (``eval.path``)."""

    def block(root: Any) -> Any:
        return getattr(root, data)

    def reads_files(root: Any, item: Any = None) -> bool:
        return block(root).kind in ("jsonl", "hf") or extra_text(root)

    files = f"{data}.kind is jsonl or hf{extra_words}"
    return [
        Need(f"{data}.path", f"{data}.kind is jsonl or hf", lambda r, i: block(r).kind in ("jsonl", "hf"),
             (f"{data}.kind",)),
        Need(f"{data}.prompt_field", files, reads_files, (f"{data}.kind",)),
        Need(f"{data}.text_field", f"{files}, without {data}.prompt_field (which reads prompt_field and "
             "completion_field instead)", lambda r, i: reads_files(r) and block(r).prompt_field is None
             and _messages(block(r)) is None, (f"{data}.kind", f"{data}.prompt_field"), warn=True),
        Need(f"{data}.completion_field", f"{data}.prompt_field is set",
             lambda r, i: block(r).prompt_field is not None, (f"{data}.prompt_field",)),
        Need(f"{data}.on_bad_line", files, reads_files, (f"{data}.kind",), warn=True),
        Need(f"{data}.chat_template", f"{data}.prompt_field (or a conversation field) is set or {data}.kind is "
             "synthetic (the template wraps a prompt)", lambda r, i: block(r).prompt_field is not None
             or _messages(block(r)) is not None or block(r).kind == "synthetic",
             (f"{data}.kind", f"{data}.prompt_field")),
        # leftovers of synthetic data once a file is read: harmless
        Need(f"{data}.num_examples", f"{data}.kind is synthetic", lambda r, i: block(r).kind == "synthetic",
             (f"{data}.kind",), warn=True),
        Need(f"{data}.digits", f"{data}.kind is synthetic", lambda r, i: block(r).kind == "synthetic",
             (f"{data}.kind",), warn=True),
        Need(f"{data}.num_proc", f"{data}.kind is hf without {data}.streaming (it tokenises once, in that many "
             "processes)", lambda r, i: block(r).kind == "hf" and not block(r).streaming,
             (f"{data}.kind", f"{data}.streaming")),
    ]


def _scheduled(root: Any, name: Any) -> bool:
    return any(name in phase.stages for phase in root.schedule.phases)


def _has_preset(model: str) -> Callable[[Any, Any], bool]:
    return lambda root, item: _value_at(root, f"{model}.preset", item) is not None


def _evaluates(root: Any, item: Any = None) -> bool:
    return root.eval.every > 0


# hkd distill (and cache-teacher, init-config's check): hkd.config.load.validate
CONFIG_NEEDS: list[Need] = [
    *(Need(f"eval.{name}", "eval.every > 0 (validation runs)", _evaluates, ("eval.every",))
      for name in ("patience", "min_delta", "metric", "path", "max_batches")),
    Need("eval.num_examples", "eval.every > 0 with data.kind synthetic and no eval.path (fresh held-out problems)",
         lambda r, i: _evaluates(r) and r.data.kind == "synthetic" and r.eval.path is None,
         ("eval.every", "data.kind", "eval.path")),
    *_data_rows("data", lambda r: _evaluates(r) and r.eval.path is not None, ", or eval.path is set"),
    Need("train.compile_backend", "train.compile is true", lambda r, i: r.train.compile, ("train.compile",)),
    Need("teacher_weight", "teachers lists more teachers (it weighs teacher in their mixture)",
         lambda r, i: bool(r.teachers), ("teachers",)),
    *(Need(f"{model}.{name}", f"{model}.preset is set (it configures a preset)", _has_preset(model),
           (f"{model}.preset",), warn=True)  # left over from a preset once a path is given: the path's model loads
      for model in ("teacher", "student", "teachers[]") for name in ("preset_overrides", "seed")),
    Need("schedule.temperature.end", "schedule.temperature.kind is linear or cosine",
         lambda r, i: r.schedule.temperature.kind != "constant", ("schedule.temperature.kind",)),
    Need("schedule.ramp_steps", "the schedule has more than one phase (it ramps between them)",
         lambda r, i: len(r.schedule.phases) > 1, warn=True),
    Need("teacher_cache", "data.streaming is false (the cache holds targets for a data set read whole)",
         lambda r, i: not r.data.streaming, ("data.streaming",)),
    *(Need(f"logging.wandb.{name}", "logging.backends includes wandb", lambda r, i: "wandb" in r.logging.backends,
           ("logging.backends",), warn=True) for name in ("project", "mode", "entity", "name")),
    Need("stages.*", "a phase of schedule.phases schedules the stage", _scheduled, warn=True),
]

# hkd eval CONFIG (hkd.commands.evaluate.load_eval_config)
EVAL_NEEDS: list[Need] = [
    Need("teacher", "text is set (the teacher is compared with the model on the text set)",
         lambda r, i: r.text is not None, ("text",)),
    Need("text_seed", "text.kind is synthetic", lambda r, i: r.text is not None and r.text.kind == "synthetic",
         ("text.kind",), warn=True),
    Need("text.packing", "training (eval measures each text on its own)", lambda r, i: False),
    Need("text.streaming", "training (eval reads the text set whole)", lambda r, i: False),
    Need("text.shuffle", "training (eval reads the text set in order)", lambda r, i: False, warn=True),
    *_data_rows("text"),
    Need("prompts.top_p", "prompts.temperature > 0 (greedy decoding has no nucleus)",
         lambda r, i: r.prompts.temperature > 0, ("prompts.temperature",), warn=True),
]


def _samples(root: Any, item: Any = None) -> bool:
    return root.mode != "augment"


# hkd generate CONFIG (hkd.commands.generate.load_generate_config)
GENERATE_NEEDS: list[Need] = [
    *(Need(name, "mode is solve or pseudo_label (mode augment samples and verifies nothing)", _samples, ("mode",))
      for name in ("verifiers", "filters.max_chars", "filters.answer_pattern", "filters.max_kept_per_prompt")),
    *(Need(name, "mode is solve or pseudo_label (mode augment samples nothing)", _samples, ("mode",), warn=True)
      for name in ("n", "temperature", "top_p", "max_new_tokens", "backend", "backend_options")),
    Need("top_p", "temperature > 0 (greedy decoding has no nucleus)", lambda r, i: r.temperature > 0,
         ("temperature",), warn=True),
]
