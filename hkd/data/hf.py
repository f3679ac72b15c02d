"""Data at scale: ``data.kind: hf``.

``data.kind: hf`` reads a JSONL, Parquet or Arrow file through Hugging Face ``datasets``: the
file is converted to Arrow once, tokenised once (``data.num_proc`` processes) and both are
cached in ``<data dir>/.hkd-cache``; training reads examples from the memory-mapped Arrow
files, so memory does not grow with the data set and a second run starts from the cache. The
encoding is exactly :func:`hkd.data.encoding.encode`'s (tested against ``kind: jsonl``).

``data.packing`` lives in :mod:`hkd.data.packing`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from hkd.config import DataConfig
from hkd.data.chat import conversation_problem, encode_conversation
from hkd.data.labels import IGNORE_INDEX
from hkd.data.records import read_jsonl, value_problem
from hkd.data.text import CHARS_PER_TOKEN_CAP, chat_prompt, encoder_special_ids, is_encoder_tokenizer
from hkd.errors import HkdError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
ENCODING_VERSION = 2  # bump when the token layout written to the cache changes (2: encoders get [CLS]/[SEP])


class HFEncoded(Sequence[tuple[list[int], list[int]]]):
    """Tokenised examples in memory-mapped Arrow files: ``encoded[i] == (ids, labels)``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self._lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int | slice) -> Any:  # a slice (cache, eval) reads its rows in one go
        if isinstance(index, slice):
            rows = self.dataset[index]
            return [(list(ids), list(labels)) for ids, labels in zip(rows["input_ids"], rows["labels"])]
        row = self.dataset[int(index)]
        return list(row["input_ids"]), list(row["labels"])

    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._lengths = column(self.dataset, "length")
        return self._lengths


def column(dataset: Any, name: str) -> np.ndarray:
    """One integer column as a numpy array, read from Arrow in one go (row iteration is ~0.4 ms a row)."""
    return np.asarray(dataset.data.column(name).to_numpy(), dtype=np.int64)


def _tokenizer_digest(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = [tokenizer.bos_token_id, tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None)]
    return hashlib.sha256((text + json.dumps(extra, default=str)).encode()).hexdigest()[:16]


def _encode_batch(rows: dict[str, list[Any]], tokenizer: Any, config: DataConfig) -> dict[str, list[Any]]:
    """:func:`hkd.data.encoding.encode` for a batch of rows, with one tokenizer call per field."""
    if config.messages_field is not None:
        return _encode_conversations(rows[config.messages_field], tokenizer, config)
    cap = CHARS_PER_TOKEN_CAP * config.max_length
    if config.prompt_field is None:
        prompts, completions = [""] * len(rows[config.text_field]), [str(t)[:cap] for t in rows[config.text_field]]
    else:
        prompts = [str(p)[:cap] for p in rows[config.prompt_field]]
        completions = [str(c)[:cap] for c in rows[config.completion_field]]
    # an encoder gets its tokenizer's own [CLS] ... [SEP] (no chat template), and truncation keeps the [SEP]
    encoder = is_encoder_tokenizer(tokenizer)
    if encoder:
        bos, eos = encoder_special_ids(tokenizer)
    else:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    templated = config.chat_template and config.prompt_field is not None and not encoder
    prompt_texts = [chat_prompt(tokenizer, p) if templated and p else p for p in prompts]
    prompt_ids = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    keep = max(config.max_length - len(eos), 0) if encoder else config.max_length
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": [], "targets": []}
    for prompt, p_ids, c_ids in zip(prompts, prompt_ids, completion_ids):
        head = p_ids if templated and prompt else bos + (p_ids if prompt else [])
        if encoder:
            ids = ((head + c_ids)[:keep] + eos)[: config.max_length]
            labels = (([IGNORE_INDEX] * len(head) + c_ids)[:keep] + eos)[: config.max_length]
        else:
            tail = c_ids + eos
            ids = (head + tail)[: config.max_length]
            labels = ([IGNORE_INDEX] * len(head) + tail)[: config.max_length]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["targets"].append(sum(1 for label in labels[1:] if label != IGNORE_INDEX))
    return out


def _encode_conversations(conversations: list[Any], tokenizer: Any, config: DataConfig) -> dict[str, list[Any]]:
    """:func:`hkd.data.chat.encode_conversation` for a batch of rows (``data.messages_field``)."""
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": [], "targets": []}
    for messages in conversations:
        problem = conversation_problem(messages)
        if problem:
            raise HkdError(f"data.path: {config.path}: a {config.messages_field!r} conversation: {problem}")
        ids, labels = encode_conversation(tokenizer, messages, config.max_length, f"data.path: {config.path}")
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["targets"].append(sum(1 for label in labels[1:] if label != IGNORE_INDEX))
    return out


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """datasets logs a reader's failure as an error line of its own before raising; hkd names it once, itself."""
    import datasets

    previous = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(previous)


def required_fields(config: DataConfig) -> tuple[tuple[str, ...], dict[str, bool]]:
    """The fields every record of this data block must hold as text (or conversations), as ``kind: jsonl`` reads them."""
    messages: str | None = getattr(config, "messages_field", None)
    if messages is not None:
        return (messages,), {messages: True}
    if config.prompt_field is None:
        return (config.text_field,), {}
    return (config.prompt_field, config.completion_field), {}


def bad_rows(dataset: Any, fields: tuple[str, ...], conversations: dict[str, bool]) -> dict[int, str]:
    """Row index -> the first problem of that row (:func:`value_problem`), read column by column from Arrow:
    nulls and a column's type are found without touching Python objects; only mixed-type (JSON) or
    conversation columns are looked at row by row."""
    import pyarrow.compute as pc

    problems: dict[int, str] = {}
    for name in fields:
        column = dataset.data.column(name)
        kind = str(column.type)
        if name in conversations or kind in ("string", "large_string") or (
                kind.startswith(("int", "uint", "float", "double", "decimal")) and "list" not in kind):
            nulls = pc.is_null(column).to_numpy(zero_copy_only=False)
            for row in nulls.nonzero()[0].tolist():
                problems.setdefault(row, value_problem(name, None) or "")
            if name in conversations:
                for row, value in enumerate(dataset[name]):
                    problem = value_problem(name, value, conversations[name]) if value is not None else None
                    if problem:
                        problems.setdefault(row, problem)
            continue
        for row, value in enumerate(dataset[name]):  # bool, lists, structs, mixed JSON: the values say
            problem = value_problem(name, value)
            if problem:
                problems.setdefault(row, problem)
    return dict(sorted(problems.items()))


def _row_problem(path: Path, config: DataConfig, builder: str, row: int, problem: str) -> HkdError:
    """The refusal for a bad row: for a JSONL file the line and message ``kind: jsonl`` gives, else the row."""
    if builder == "json":
        exact = _jsonl_problem(path, config)
        if exact is not None:
            return exact
    return HkdError(f"{path}: row {row + 1}: {problem}; set data.on_bad_line: skip to skip such rows")


def _jsonl_problem(path: Path, config: DataConfig, on_bad_line: str = "fail") -> HkdError | None:
    """What ``kind: jsonl`` would say about this file (file, line and field), or ``None`` when it reads it."""
    fields, conversations = required_fields(config)
    try:
        read_jsonl(path, on_bad_line, fields, conversations)
    except HkdError as exc:
        return exc
    return None


def unreadable(path: Path, config: DataConfig, builder: str, exc: BaseException) -> HkdError:
    """A file ``datasets`` cannot read: the JSONL reader's message when it finds the bad line, else one line
    naming the file and the reader's own reason (never its traceback)."""
    if isinstance(exc, HkdError):
        return exc
    cause = exc.__cause__ or exc
    reason = f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
    if builder == "json":
        exact = _jsonl_problem(path, config, config.on_bad_line)
        if exact is not None:  # kind jsonl refuses the file too: the same words
            return exact
        # kind jsonl reads it (skipping some lines, or not): Arrow cannot (a line that is not a JSON object, or a
        # column mixing types it cannot hold together), and datasets reads a JSON file whole, so skips nothing
        skipped = _jsonl_problem(path, config) if config.on_bad_line == "skip" else None
        where = str(skipped).replace("; set data.on_bad_line: skip to skip such lines", "") + "; " if skipped else ""
        return HkdError(f"{where}data.path: {str(path)!r} cannot be read by datasets ({reason}), which reads a JSON "
                        "file whole and skips nothing; fix the file (one type per field), or use data.kind: jsonl")
    return HkdError(f"data.path: {str(path)!r} cannot be read as {builder} data ({reason})")


def _keep_rows(dataset: Any, path: Path, config: DataConfig, builder: str) -> Any:
    """The rows of ``dataset`` that every data kind accepts: a bad one is refused by name, or dropped with
    ``data.on_bad_line: skip``; none left is refused as ``kind: jsonl`` refuses an empty file."""
    fields, conversations = required_fields(config)
    problems = bad_rows(dataset, fields, conversations)
    if problems and config.on_bad_line != "skip":
        row, problem = next(iter(problems.items()))
        raise _row_problem(path, config, builder, row, problem)
    if problems:
        dataset = dataset.select([i for i in range(len(dataset)) if i not in problems])
    if len(dataset) == 0:
        raise HkdError(f"data file {str(path)!r} has no usable records")
    return dataset


def encode_hf(tokenizer: Any, config: DataConfig, seed: int = 0) -> HFEncoded:
    """Read and tokenise ``config.path`` through ``datasets``, cached next to the file."""
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - depends on the installed extras
        raise HkdError("data.kind: hf needs Hugging Face datasets: pip install 'hkd[data]'") from error
    assert config.path is not None
    path = Path(config.path)
    builder = BUILDERS.get(path.suffix)
    if builder is None:
        raise HkdError(f"data.path: {path.name} is not one of {', '.join(BUILDERS)} (data.kind: hf)")
    if not path.is_file():
        raise HkdError(f"data file {str(path)!r} does not exist")  # as kind jsonl says it
    cache_dir = path.parent / ".hkd-cache"
    datasets.disable_progress_bars()
    if config.streaming:
        return HFStream(builder, path, tokenizer, config, seed)  # type: ignore[return-value]
    try:
        with quiet_datasets():
            raw = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache_dir))
    except Exception as exc:  # datasets and pyarrow raise many types for a malformed file
        raise unreadable(path, config, builder, exc) from None
    check_columns(path, config, builder, raw.column_names)
    raw = _keep_rows(raw, path, config, builder)  # nulls, non-text values: as kind jsonl refuses them
    recipe = json.dumps([ENCODING_VERSION, raw._fingerprint, _tokenizer_digest(tokenizer), config.max_length,
                         config.text_field, config.prompt_field, config.completion_field, config.chat_template]
                        + ([config.messages_field] if config.messages_field is not None else []))
    encoded = raw.map(
        _encode_batch, batched=True, batch_size=1000, num_proc=config.num_proc if config.num_proc > 1 else None,
        fn_kwargs={"tokenizer": tokenizer, "config": config}, remove_columns=raw.column_names,
        new_fingerprint=hashlib.sha256(recipe.encode()).hexdigest()[:32], desc="hkd: tokenising",
    )
    if len(encoded) and int(column(encoded, "targets").max()) == 0:
        raise HkdError(
            f"all {len(encoded)} examples have no target tokens after truncation to data.max_length="
            f"{config.max_length} (the prompt fills every sequence); raise data.max_length or shorten the prompts"
        )
    return HFEncoded(encoded)


def check_columns(path: Path, config: DataConfig, builder: str, columns: list[str]) -> None:
    """The fields the data block reads are columns of the file (streamed: of its first record); for a JSONL
    file the refusal is ``kind: jsonl``'s, naming the first line without the field."""
    fields, _ = required_fields(config)
    missing = [name for name in fields if name not in columns]
    if missing and config.on_bad_line == "skip":  # every record lacks the field: each one skipped
        raise HkdError(f"data file {str(path)!r} has no usable records")
    if missing:
        exact = _jsonl_problem(path, config) if builder == "json" else None
        raise exact or HkdError(f"data.path: {path.name} has no column {missing[0]!r} (columns: {columns})")


class HFStream:
    """``data.streaming: true``: examples read and tokenised on the fly, never stored.

    Served by position in an endless stream of epochs (each reshuffled with a seeded buffer
    when ``data.shuffle``): ``stream[k]`` is the ``k``-th example the run sees. Positions are
    asked for in increasing order; the last ``window`` are kept so a step can read its
    micro-batches twice (counts, then tensors), and an earlier position (a resumed run)
    re-reads the stream from its start.
    """

    def __init__(self, builder: str, path: Path, tokenizer: Any, config: DataConfig, seed: int, window: int = 4096) -> None:
        self.builder, self.path, self.tokenizer, self.config, self.window = builder, path, tokenizer, config, window
        self.seed = seed
        self._rows: dict[int, tuple[list[int], list[int]]] = {}
        self._check_first_row()  # columns and the first record now, before the run directory is written
        self._restart()

    def _stream(self) -> Any:
        import datasets

        return datasets.load_dataset(self.builder, data_files=str(self.path), split="train", streaming=True)

    def _check_first_row(self) -> None:
        try:
            with quiet_datasets():
                first = next(iter(self._stream()), None)
        except Exception as exc:
            raise unreadable(self.path, self.config, self.builder, exc) from None
        if first is None:  # nothing Arrow could read: kind jsonl's words for why, where it has them
            exact = _jsonl_problem(self.path, self.config, self.config.on_bad_line) if self.builder == "json" else None
            raise exact or HkdError(f"data file {str(self.path)!r} has no usable records")
        if self.config.on_bad_line != "skip":  # with skip, a first record without the field is just skipped
            check_columns(self.path, self.config, self.builder, list(first))

    def _check_rows(self, rows: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        """Every streamed row as kind jsonl checks a line (before shuffling, so the row is the file's)."""
        fields, conversations = required_fields(self.config)
        keep = []
        for offset, index in enumerate(indices):
            problem = next((p for name in fields if (p := value_problem(
                name, rows[name][offset] if name in rows else None, conversations.get(name)))), None)
            if problem is not None and self.config.on_bad_line != "skip":
                raise _row_problem(self.path, self.config, self.builder, index, problem)
            keep.append(problem is None)
        return {key: [v for v, ok in zip(values, keep) if ok] for key, values in rows.items()}

    def _epoch(self, epoch: int) -> Any:
        stream = self._stream().map(self._check_rows, batched=True, batch_size=1000, with_indices=True)
        if self.config.shuffle:
            stream = stream.shuffle(seed=self.seed * 1_000_003 + epoch, buffer_size=10_000)
        stream = stream.map(_encode_batch, batched=True, batch_size=1000, fn_kwargs={"tokenizer": self.tokenizer, "config": self.config})
        return iter(stream)

    def _restart(self) -> None:
        self._rows.clear()
        self._epoch_number, self._next = 0, 0
        self._iterator = self._epoch(0)

    def _read(self) -> None:
        for _ in range(2):  # the current epoch, else the next one
            try:
                with quiet_datasets():
                    row = next(self._iterator)
                break
            except StopIteration:
                if self._next == 0:
                    raise HkdError(f"data file {str(self.path)!r} has no usable records") from None
                self._epoch_number += 1
                self._iterator = self._epoch(self._epoch_number)
            except Exception as exc:  # a line the reader cannot parse, met mid-stream: named, not a traceback
                raise unreadable(self.path, self.config, self.builder, exc) from None
        self._rows[self._next] = (list(row["input_ids"]), list(row["labels"]))
        self._rows.pop(self._next - self.window, None)
        self._next += 1

    def __getitem__(self, position: int) -> tuple[list[int], list[int]]:
        if position < self._next - self.window:
            self._restart()
        while position >= self._next:
            self._read()
        return self._rows[position]

    def __len__(self) -> int:
        raise HkdError("data.streaming: a streamed data set has no length (hkd cache-teacher and eval read whole "
                       "data sets: use data.streaming: false there)")

    def __bool__(self) -> bool:
        return True
