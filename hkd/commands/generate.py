"""Data distillation: the teacher writes worked solutions, verifiers keep the correct ones.

``hkd generate CONFIG`` reads prompt records (JSONL), samples ``n`` completions per prompt
from the teacher through a generation backend (``backend:``; the built-in ``transformers``
samples the live model with the KV cache, :func:`hkd.sampling.hf_sampler.sample`; engines are plugins,
:mod:`hkd.sampling.backends`), and keeps a completion
only if it passes the filters (length, has an answer, not a duplicate, per-prompt cap) and
every configured verifier (rejection sampling). Kept completions are written as JSONL lines
that ``data.kind: jsonl`` with ``prompt_field``/``completion_field`` trains on directly; each
line carries its provenance (prompt id, sample index, verdicts, teacher, sampling settings,
seed).

Modes (``mode:``): ``solve`` verifies against each record's answer; ``pseudo_label`` also
labels records that have none with the majority answer of their ``n`` samples
(self-consistency, extracted as the verifiers extract it; the agreement ratio and votes go
into the provenance and the ledger, ``min_agreement`` filters); ``augment`` writes the records
and their variants without sampling. ``augment:`` runs prompt transforms (plugins,
:mod:`hkd.sampling.augment`) over every record; variants join their source's batch with ids
``SOURCE~TRANSFORM~K`` and are handled like any prompt, their lines naming their origin.

Crash safety: prompts are processed in fixed batches (``batch_size`` consecutive records of
the prompt file). After a batch, its kept lines are appended to the output and then one line
recording every decision of the batch is appended to the ledger ``OUTPUT.ledger.jsonl``,
each flushed to disk. The ledger is the truth: on restart, a torn last line is dropped,
output lines of batches the ledger does not record are removed, and only unrecorded batches
are sampled again. Each batch samples with a seed derived from the base seed and the ids of
its prompts, so the resumed run writes exactly the lines the uninterrupted run would have.

Under ``torchrun`` (``WORLD_SIZE`` > 1) rank ``r`` of ``W`` takes every ``W``-th unfinished
batch and appends to its own part, ``OUTPUT.rank-R.jsonl`` with its own ledger; when every
rank is done, rank 0 merges the parts into ``OUTPUT`` in batch order, so the file is the one a
single process writes. Parts left by a crashed run are merged at the next start, whatever
its number of ranks.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from hkd.sampling.augment import PromptTransform, TransformConfig, TransformContext, build_prompt_transform
from hkd.config import MAX_SEED, ModelConfig, PluginsConfig, apply_overrides, from_dict, ranged, read_yaml
from hkd.config.needs import GENERATE_NEEDS, check_needs
from hkd.config.outputs import check_output_file
from hkd.data.encoding import read_jsonl
from hkd.train.distributed import barrier, init_distributed
from hkd.errors import ConfigError, HkdError
from hkd.sampling.backends import (GenerationContext, PromptBatch, SamplingParams, build_generation_backend,
                                   get_generation_backend)
from hkd.plugin.manager import build_manager
from hkd.models.loading import freeze, load_model, load_tokenizer, preset_dir
from hkd.train.seeding import derive_seed
from hkd.sampling.verify import Verdict, Verifier, VerifierConfig, answer_extractor, build_verifier


@dataclass
class FilterConfig:
    max_chars: int = ranged(0, low=0, high=2**40)  # drop completions longer than this (0: no limit)
    require_answer: bool = True  # drop completions with no extractable final answer
    answer_pattern: str | None = None  # regex for require_answer; default: the text after "=> "
    dedupe: bool = True  # drop a completion identical to one already kept for the same prompt
    max_kept_per_prompt: int = ranged(0, low=0, high=2**20)  # keep at most this many per prompt (0: all)


@dataclass
class GenerateConfig:
    teacher: ModelConfig  # the model that writes the solutions
    prompts: str  # JSONL file of prompt records
    output: str  # JSONL file of kept completions (its ledger sits next to it)
    id_field: str | None = "id"  # unique prompt id; None: the record's position in the file
    prompt_field: str = "prompt"  # field holding the prompt: text, or a conversation (a list of {role, content} messages)
    # wrap text prompts in the teacher tokenizer's chat template as a user turn (conversations always use it)
    chat_template: bool = False
    # output lines of chat prompts (conversations, or text with chat_template) also hold the conversation
    # with the teacher's reply as the last assistant turn, here: what data.messages_field trains on
    messages_field: str = "messages"
    answer_field: str = "answer"  # reference answer, copied to the output (verifiers see the whole record)
    completion_field: str = "completion"  # key of the completion in output lines
    on_bad_line: Literal["fail", "skip"] = "fail"  # a malformed JSONL line: stop, naming file and line (fail), or skip it
    n: int = ranged(4, low=1, high=2**16)  # samples per prompt
    temperature: float = ranged(0.8, low=0, high=1e4)  # 0: greedy
    top_p: float = ranged(1.0, low=0, low_open=True, high=1)  # nucleus sampling (1: off)
    max_new_tokens: int = ranged(64, low=1, high=2**20)  # tokens per completion, at most
    batch_size: int = ranged(8, low=1, high=2**16)  # prompts per sampling call (n rows each) and per ledger line
    seed: int = ranged(0, low=0, high=MAX_SEED, high_open=True)  # each batch of prompts samples with a seed derived from this and its prompt ids
    device: str = "auto"  # "auto": cuda if available else cpu
    backend: str = "transformers"  # generation backend a plugin registers (hkd_add_generation_backends)
    backend_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of its factory
    verifiers: list[VerifierConfig] = field(default_factory=list)  # a completion is kept only if every one passes
    filters: FilterConfig = field(default_factory=FilterConfig)  # cheap checks applied before the verifiers
    # solve: sample and verify against each record's answer; pseudo_label: the same, but a record
    # without an answer gets the majority answer of its n samples (self-consistency), kept only
    # when that answer's share of the n samples is >= min_agreement; augment: write the records
    # and their augment: variants, no sampling (encoder text)
    mode: Literal["solve", "pseudo_label", "augment"] = "solve"
    min_agreement: float = ranged(0.0, low=0, high=1)  # pseudo_label: the majority answer's share of the n samples needed
    augment: list[TransformConfig] = field(default_factory=list)  # prompt transforms (hkd_add_prompt_transforms)
    progress: bool = True  # a progress bar (plain lines when the output is not a terminal)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)  # plugins switched off (plugins.disable)

    def validate(self, path: str = "") -> None:
        from hkd.config import check_device

        check_device(self.device, "device")  # a typo or a missing GPU is named before the teacher loads
        if self.mode not in ("solve", "pseudo_label", "augment"):
            raise ConfigError(f"mode: must be solve, pseudo_label or augment, got {self.mode!r}")
        if not 0 <= self.min_agreement <= 1:
            raise ConfigError(f"min_agreement: must be in [0, 1], got {self.min_agreement}")
        if self.mode == "pseudo_label" and self.temperature == 0 and self.n > 1:
            raise ConfigError(f"n: {self.n} greedy samples are identical, so their vote always agrees; "
                              "pseudo_label with temperature: 0 takes n: 1 (or sample with temperature > 0)")
        if self.min_agreement and self.mode != "pseudo_label":
            raise ConfigError(f"min_agreement: only used with mode: pseudo_label (mode is {self.mode})")
        for i, transform in enumerate(self.augment):
            if transform.variants < 1:
                raise ConfigError(f"augment[{i}].variants: must be >= 1, got {transform.variants}")
        if self.mode == "augment" and not self.augment:
            raise ConfigError("mode: augment writes the augment: variants, but augment: is empty")
        for name in ("n", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ConfigError(f"temperature: must be >= 0, got {self.temperature}")
        if (self.teacher.path is None) == (self.teacher.preset is None):
            raise ConfigError("teacher: set exactly one of teacher.path or teacher.preset")

    def settings(self) -> dict[str, Any]:
        """What decides the lines: a resumed run must use the same."""
        keys = ("n", "temperature", "top_p", "max_new_tokens", "batch_size", "seed", "backend", "backend_options",
                "mode", "min_agreement", "chat_template")
        return {k: getattr(self, k) for k in keys} | {"filters": asdict(self.filters),
                                                         "verifiers": [asdict(v) for v in self.verifiers],
                                                         "augment": [asdict(t) for t in self.augment]}

    def sampling_params(self, seed: int) -> SamplingParams:
        return SamplingParams(n=self.n, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, seed=seed)


# settings keys added after files were written: a ledger without one was written with this value
SETTINGS_DEFAULTS: dict[str, Any] = {"backend": "transformers", "backend_options": {}, "mode": "solve",
                                     "min_agreement": 0.0, "augment": [], "chat_template": False}


def load_generate_config(path: str | Path, overrides: list[str] = ()) -> GenerateConfig:  # type: ignore[assignment]
    """Read YAML + ``--a.b=value`` overrides; paths in the file are relative to the file."""
    config = from_dict(GenerateConfig, apply_overrides(read_yaml(path), list(overrides)))
    base = Path(path).resolve().parent
    config.prompts = str(base / config.prompts)
    config.output = str(base / config.output)
    if config.teacher.path is not None:
        config.teacher.path = str(base / config.teacher.path)
    check_needs(config, GENERATE_NEEDS)  # options that act only with another (hkd/config/needs.py)
    return config


@dataclass
class GenerateSummary:
    prompts: int
    samples: int
    kept: int
    rejected: dict[str, int]  # reason -> count
    output: Path


def pick_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def ledger_path(output: Path) -> Path:
    return output.with_name(output.name + ".ledger.jsonl")


def read_lines(path: Path) -> list[dict[str, Any]]:
    """JSON lines of a file hkd appends to; a torn last line (a crash mid-write) is cut off the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as handle:
            handle.truncate(end)
    rows = []
    for lineno, line in enumerate(data[:end].splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise HkdError(f"{path}:{lineno}: corrupted line ({exc.msg}); move the file away to start over") from exc
    return rows


def recover(output: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Ledger entries of finished batches; output lines of unfinished batches are removed."""
    ledger = ledger_path(output)
    if output.is_file() and output.stat().st_size and not ledger.is_file():
        raise HkdError(f"{output} exists but has no ledger {ledger.name}; refusing to append to a file hkd did not write")
    entries = read_lines(ledger)
    for entry in entries[:1]:
        written = {k: v for k, v in SETTINGS_DEFAULTS.items() if k in settings} | entry["settings"]
        if written != settings:
            changed = sorted(k for k in settings.keys() | written.keys() if written.get(k) != settings.get(k))
            raise ConfigError(f"{output} was written with different settings ({', '.join(changed)}); "
                              "use another output path or the original settings")
    done = {pid for entry in entries for pid in entry["ids"]}
    lines = read_lines(output)
    kept = [line for line in lines if line["id"] in done]
    if len(kept) < len(lines):
        rewrite_lines(output, kept)
    return entries


def rewrite_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace ``path`` with these JSON lines atomically: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


def part_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.rank-{rank}.jsonl")


def existing_parts(output: Path) -> list[Path]:
    """Per-rank parts next to ``output`` (a part with only a ledger kept no line yet)."""
    names = {p.name.removesuffix(".ledger.jsonl") for p in output.parent.glob(f"{output.name}.rank-*.jsonl*")
             if p.name.endswith(".jsonl")}
    return [output.parent / name for name in sorted(names)]


def merge_parts(output: Path, settings: dict[str, Any]) -> None:
    """Fold per-rank parts (and their ledgers) into ``output`` and its ledger, in batch order.

    Idempotent: batches are keyed by (index, ids) and lines by (id, sample), and the parts are
    deleted last, so a crash anywhere in here only means the next run merges again.
    """
    parts = existing_parts(output)
    if not parts:
        return
    entries, lines = read_lines(ledger_path(output)), read_lines(output)
    for part in parts:
        entries += read_lines(ledger_path(part))
        lines += read_lines(part)
    by_batch: dict[tuple[int, tuple[str, ...]], dict[str, Any]] = {}  # a batch grown by new prompts has 2 entries
    for entry in entries:
        by_batch.setdefault((entry["batch"], tuple(entry["ids"])), entry)
    batch_of = {pid: entry["batch"] for entry in by_batch.values() for pid in entry["ids"]}
    unique: dict[tuple[str, int], dict[str, Any]] = {}
    for line in lines:
        unique.setdefault((line["id"], line["sample"]), line)
    merged = sorted(unique.values(), key=lambda line: batch_of[line["id"]])  # stable: samples stay in order
    ledger = [by_batch[k] for k in sorted(by_batch, key=lambda k: k[0])]
    rewrite_lines(output, merged)
    rewrite_lines(ledger_path(output), ledger)
    for part in parts:
        part.unlink(missing_ok=True)
        ledger_path(part).unlink(missing_ok=True)


def append_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows))
        handle.flush()
        os.fsync(handle.fileno())


@dataclass
class Decision:
    sample: int
    completion: str
    verdicts: dict[str, Verdict]
    reason: str | None  # None: kept


def judge(record: dict[str, Any], completions: list[str], verifiers: list[tuple[str, Verifier]],
          filters: FilterConfig) -> list[Decision]:
    """Filters first (length, answer), then every verifier, then dedupe and the per-prompt cap."""
    extract = answer_extractor(filters.answer_pattern)
    kept: list[str] = []
    decisions = []
    for index, text in enumerate(completions):
        verdicts = {name: verify(record, text) for name, verify in verifiers}
        failed = [f"{name}:{v.reason or 'rejected'}" for name, v in verdicts.items() if not v.passed]
        reason = None
        if filters.max_chars and len(text) > filters.max_chars:
            reason = "too_long"
        elif filters.require_answer and extract(text) is None:
            reason = "no_answer"
        elif failed:
            reason = failed[0]
        elif filters.dedupe and text in kept:
            reason = "duplicate"
        elif filters.max_kept_per_prompt and len(kept) >= filters.max_kept_per_prompt:
            reason = "over_cap"
        if reason is None:
            kept.append(text)
        decisions.append(Decision(index, text, verdicts, reason))
    return decisions


def prompt_records(config: GenerateConfig) -> list[tuple[str, dict[str, Any]]]:
    """(prompt id, record) in file order; ids must be unique because resume keys on them."""
    required = (config.prompt_field,) + ((config.id_field,) if config.id_field else ())
    records = read_jsonl(config.prompts, config.on_bad_line, required, conversations={config.prompt_field: False})
    out: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    for position, record in enumerate(records):
        pid = str(record[config.id_field]) if config.id_field else str(position)
        if pid in seen:
            raise HkdError(f"{config.prompts}: prompt id {pid!r} appears twice; ids ({config.id_field}) must be unique")
        seen.add(pid)
        out.append((pid, record))
    return out


def has_answer(record: dict[str, Any], answer_field: str) -> bool:
    """A reference answer is there: the field exists and is not null or blank."""
    value = record.get(answer_field)
    return value is not None and str(value).strip() != ""


def majority_answer(texts: list[str], extract: Any) -> dict[str, Any]:
    """Self-consistency: the most common extracted answer of ``texts`` and its share of all of them.

    The share is over every sample (one without an answer counts against agreement); a tie goes
    to the answer reached first, so the label does not depend on dict order. ``answer`` is None
    when no sample has one.
    """
    answers = [extract(t) for t in texts]
    votes = Counter(a.strip() for a in answers if a is not None)
    if not votes:
        return {"answer": None, "agreement": 0.0, "votes": {}}
    first = {a.strip(): i for i, a in reversed(list(enumerate(answers))) if a is not None}
    answer = max(votes, key=lambda a: (votes[a], -first[a]))
    return {"answer": answer, "agreement": votes[answer] / len(texts), "votes": dict(votes.most_common())}


def pseudo_labelled(decision: Decision, label: dict[str, Any], min_agreement: float, extract: Any) -> Decision:
    """Reject a kept completion of a pseudo-labelled prompt unless the label is agreed on and it reaches it."""
    if decision.reason is not None:
        return decision
    reason = None
    if label["answer"] is None:
        reason = "no_majority"
    elif label["agreement"] < min_agreement:
        reason = "low_agreement"
    elif (extract(decision.completion) or "").strip() != label["answer"]:
        reason = "minority_answer"
    return Decision(decision.sample, decision.completion, decision.verdicts, reason)


def expand(batch: list[tuple[str, dict[str, Any]]], transforms: list[tuple[TransformConfig, PromptTransform]],
           config: GenerateConfig, source_ids: set[str]) -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """Each source record, followed by its variants from every transform: (id, record, origin or None).

    A variant's id is ``SOURCE~TRANSFORM~K``; its randomness comes from (seed, transform, source id)
    alone, so a resumed batch gets the same variants. Variants repeating a prompt already in the
    list for this source are dropped.
    """
    out: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = []
    for pid, record in batch:
        out.append((pid, record, None))
        seen = {str(record[config.prompt_field])}
        for t_index, (spec, transform) in enumerate(transforms):
            rng = random.Random(derive_seed(config.seed, f"augment:{t_index}:{spec.name}:{pid}"))
            kept = 0
            try:
                variants = transform(dict(record), rng, spec.variants)[: spec.variants]
            except HkdError as exc:
                raise HkdError(f"augment[{t_index}] ({spec.name}) on prompt {pid!r} of {config.prompts}: {exc}") from exc
            for variant in variants:
                text = str(variant.get(config.prompt_field, ""))
                if not text or text in seen:
                    continue
                seen.add(text)
                vid = f"{pid}~{spec.name}~{kept}"
                if vid in source_ids:
                    raise HkdError(f"{config.prompts}: prompt id {vid!r} collides with a variant id; rename it")
                if config.id_field:
                    variant[config.id_field] = vid
                out.append((vid, variant, {"id": pid, config.prompt_field: record[config.prompt_field],
                                           "transform": spec.name, "options": spec.options}))
                kept += 1
    return out


def teacher_dir(config: GenerateConfig, run_dir: Path) -> Path:
    """The teacher's HF directory (a preset is written under ``run_dir``)."""
    if config.teacher.preset is not None:
        return preset_dir(config.teacher, "teacher", run_dir)
    return Path(str(config.teacher.path)).expanduser()


def load_teacher(config: GenerateConfig, needs_model: bool, run_dir: Path) -> tuple[Any, Any]:
    """(model or None, tokenizer): a backend that loads its own weights gets only the tokenizer here."""
    if needs_model:
        return load_model(config.teacher, "teacher", run_dir)
    path = teacher_dir(config, run_dir)
    if not path.is_dir():
        raise HkdError(f"teacher.path: {str(path)!r} is not a model directory")
    return None, load_tokenizer(path, config.teacher.trust_remote_code)


def check_generate_output(path: str | Path, flag: str = "output") -> Path:
    """Where ``hkd generate`` appends, checked before any work: a file, its own earlier output (it has a
    ledger) or new, and a ledger path that is a file too (:mod:`hkd.config.outputs`)."""
    output = check_output_file(path, flag, "generate", owner=lambda p: ledger_path(p).is_file(),
                               example="solutions.jsonl", why=f"it has no ledger {ledger_path(Path(path)).name}")
    check_output_file(ledger_path(output), f"{flag} (its ledger)", "generate", owner=lambda p: True)
    return output


def chat_line(config: GenerateConfig, prompt: Any, completion: str) -> dict[str, Any]:
    """``{messages_field: conversation + the reply}`` for a chat prompt (a conversation, or text with
    ``chat_template``); nothing for a plain text prompt."""
    if isinstance(prompt, list):
        return {config.messages_field: [*prompt, {"role": "assistant", "content": completion}]}
    if config.chat_template:
        return {config.messages_field: [{"role": "user", "content": str(prompt)},
                                        {"role": "assistant", "content": completion}]}
    return {}


def generate(config: GenerateConfig) -> GenerateSummary:
    """Sample, verify, filter and append; resumes where an interrupted run stopped."""
    check_generate_output(config.output)
    pm = build_manager(config.plugins.disable)
    verifiers = [(v.name, build_verifier(pm, v.name, v.options, f"verifiers[{i}]"))
                 for i, v in enumerate(config.verifiers)]
    # an unknown backend is refused before any work; mode: augment samples nothing and loads no model
    needs_model = config.mode != "augment" and get_generation_backend(pm, config.backend, "backend").needs_model
    prompts = prompt_records(config)
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    settings = config.settings()
    info = init_distributed()
    if info.is_main:  # rank 0 alone repairs files and writes a preset teacher; the others wait
        for part in existing_parts(output):  # left by an interrupted multi-rank run
            if not ledger_path(part).is_file():  # it crashed inside its first batch: nothing finished
                part.unlink()
            else:
                recover(part, settings)
        recover(output, settings)
        model, tokenizer = load_teacher(config, needs_model, output.parent) if config.mode != "augment" else (None, None)
    barrier(info)
    done = {pid for path in [output, *existing_parts(output)] for entry in read_lines(ledger_path(path))
            for pid in entry["ids"]}
    barrier(info)  # every rank has read the same ledgers before any rank appends to one
    if not info.is_main and config.mode != "augment":
        model, tokenizer = load_teacher(config, needs_model, output.parent)
    if tokenizer is None and config.mode != "augment":
        raise HkdError("teacher: the model directory has no tokenizer")
    device = pick_device(config.device)
    if model is not None:
        freeze(model).to(device)  # type: ignore[arg-type]
    # a preset teacher exists on disk only when rank 0 loaded it (not in mode: augment)
    teacher_path = (Path(config.teacher.path).expanduser() if config.teacher.path is not None
                    else teacher_dir(config, output.parent) if config.mode != "augment" else None)
    transforms = [(t, build_prompt_transform(pm, t, TransformContext(
        config.prompt_field, config.answer_field, Path(config.prompts).parent, device, f"augment[{i}]",
        teacher_path)))
        for i, t in enumerate(config.augment)]
    backend = None
    if config.mode != "augment":
        backend = build_generation_backend(pm, config.backend, GenerationContext(
            "teacher", tokenizer, model, str(teacher_dir(config, output.parent)), device, "backend"),
            config.backend_options)
    teacher = {"path": config.teacher.path, "preset": config.teacher.preset, "backend": config.backend,
               "name": str(getattr(model.config, "name_or_path", "")) if model is not None else "",
               "model_type": model.config.model_type if model is not None else ""}
    extract = answer_extractor(config.filters.answer_pattern)  # the verifiers' extraction, for the votes
    source_ids = {pid for pid, _ in prompts}

    batches = [prompts[i: i + config.batch_size] for i in range(0, len(prompts), config.batch_size)]
    # a batch is finished or not (one ledger line each); prompts added to the file since are new work
    todo = [(i, [(pid, r) for pid, r in b if pid not in done]) for i, b in enumerate(batches)]
    todo = [(i, b) for i, b in todo if b]
    bar = tqdm(total=len(batches), initial=len(batches) - len(todo), disable=not config.progress or not info.is_main,
               unit="batch")
    mine = todo[info.rank::info.world_size]
    target = part_path(output, info.rank) if info.enabled else output
    for index, sources in mine:
        batch = expand(sources, transforms, config, source_ids)
        ids = [pid for pid, _, _ in batch]
        seed = derive_seed(config.seed, "\x1f".join(ids))
        kept_lines: list[dict[str, Any]] = []
        decisions: dict[str, list[dict[str, Any]]] = {}
        labels: dict[str, dict[str, Any]] = {}
        if backend is None:  # mode: augment: the records themselves are the output
            for pid, record, origin in batch:
                decisions[pid] = [{"sample": 0, "kept": True, "reason": None}]
                kept_lines.append({"id": pid, "sample": 0, **record} | ({"augmented_from": origin} if origin else {}))
        else:
            # token ids rendered as training data renders prompts: the sampler never re-tokenizes text
            prompt_ids = PromptBatch.from_texts(tokenizer, [r[config.prompt_field] for _, r, _ in batch],
                                                config.chat_template, f"{config.prompts}: {config.prompt_field}")
            samples = backend.generate(prompt_ids, config.sampling_params(seed))
        for p, (pid, record, origin) in enumerate(batch if backend is not None else []):
            texts = samples.texts[p * config.n: (p + 1) * config.n]
            label = None
            if config.mode == "pseudo_label" and not has_answer(record, config.answer_field):
                label = majority_answer(texts, extract)
                labels[pid] = label
                record = {**record, config.answer_field: label["answer"]}
            judged = judge(record, texts, verifiers, config.filters)
            if label is not None:  # only completions that reach the majority answer teach it
                judged = [pseudo_labelled(d, label, config.min_agreement, extract) for d in judged]
            decisions[pid] = [{"sample": d.sample, "kept": d.reason is None, "reason": d.reason} for d in judged]
            kept_lines += [{
                "id": pid,
                "sample": d.sample,
                config.prompt_field: record[config.prompt_field],
                config.completion_field: d.completion,
                config.answer_field: record.get(config.answer_field),
                "verdicts": {name: asdict(v) for name, v in d.verdicts.items()},
                "teacher": teacher,
                "sampling": settings,
                "seed": seed,
            } | chat_line(config, record[config.prompt_field], d.completion)
              | ({"pseudo_label": label} if label is not None else {})
              | ({"augmented_from": origin} if origin is not None else {})
                for d in judged if d.reason is None]
        append_lines(target, kept_lines)  # output first: the ledger line below marks the batch finished
        entry = {"batch": index, "ids": ids, "seed": seed, "settings": settings, "decisions": decisions}
        if labels:
            entry["pseudo_labels"] = labels
        append_lines(ledger_path(target), [entry])
        bar.update(min(info.world_size, bar.total - bar.n))  # the other ranks finish theirs alongside
    bar.close()
    barrier(info)
    if info.is_main:
        merge_parts(output, settings)
    barrier(info)
    return summarize(read_lines(ledger_path(output)), output)


def summarize(entries: list[dict[str, Any]], output: Path) -> GenerateSummary:
    decisions = [d for entry in entries for per_prompt in entry["decisions"].values() for d in per_prompt]
    rejected = Counter(d["reason"] for d in decisions if not d["kept"])
    return GenerateSummary(
        prompts=sum(len(entry["ids"]) for entry in entries),
        samples=len(decisions),
        kept=sum(d["kept"] for d in decisions),
        rejected=dict(sorted(rejected.items())),
        output=output,
    )
