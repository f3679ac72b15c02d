"""Offline teacher cache: run the teacher once, train many students without it.

``hkd cache-teacher CONFIG`` runs the teacher over the distill config's data set (encoded as
training encodes it, in data-set order, ``data.batch_size`` sequences at a time) and stores,
for every target position of every example (``loss_mask``: positions whose next token is a
label), the teacher's top-k logits (values and token ids) and, optionally, the hidden states
of the teacher layers the configured stages map to. Training with ``teacher_cache: PATH``
then never loads or runs the teacher: the loop asks :meth:`TeacherCache.view` for the
teacher's side of each micro-batch, looked up by the batch's ``example_index``.

Layout of the cache directory::

    index.json                    fingerprint, top_k, layers, shard table
    shard-00000.safetensors       offsets [E+1] (row range per example), topk_values [R, k],
    shard-00001.safetensors ...   topk_ids [R, k] (int32), hidden.<layer> [R, H] for each layer

Shards are written atomically (tmp + rename) and the index last, so a crash never leaves
a cache that looks complete. The reader opens at most a few shards at a time and reads only
the rows a batch needs (safetensors slices), so memory stays bounded by the batch.

The fingerprint records what the targets depend on: the teacher (config.json hash and a
hash of the weight files; above 1 GiB their names, sizes and mtimes instead, to keep
fingerprinting cheap), the tokenizer's vocabulary, and the encoded data. A cache whose
fingerprint differs, or that lacks a layer a stage needs, is refused with the difference.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from hkd.config import Config, ModelConfig
from hkd.data import collate, encode_dataset
from hkd.errors import ConfigError, HkdError
from hkd.manager import build_manager
from hkd.models import check_compatible, freeze, load_model, load_tokenizer, num_layers, preset_dir, safetensors_shapes
from hkd.schedule import Schedule
from hkd.stage import StageContext, build_stages
from hkd.taps import forward_with_taps
from hkd.view import ModelView, SparseTargets, TapRequest, unserved

INDEX = "index.json"
VERSION = 1
FULL_HASH_LIMIT = 1 << 30  # weight files up to this total size are hashed in full


# --------------------------------------------------------------------------- fingerprints


def teacher_dir(spec: ModelConfig, run_dir: Path, role: str = "teacher") -> Path:
    """The teacher's model directory; a preset is written where :func:`hkd.models.load_model` puts it."""
    if spec.preset is None:
        assert spec.path is not None
        return Path(spec.path).expanduser()
    return preset_dir(spec, role, run_dir)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(teacher_path: Path, tokenizer: Any, encoded: list[tuple[list[int], list[int]]]) -> dict[str, str]:
    """What cached targets depend on; two caches with equal fingerprints hold equal targets."""
    if not (teacher_path / "config.json").is_file():
        raise HkdError(f"teacher: {str(teacher_path)!r} has no config.json")
    config = json.loads((teacher_path / "config.json").read_text())
    weights = sorted(teacher_path.glob("*.safetensors")) + sorted(teacher_path.glob("*.bin"))
    if sum(w.stat().st_size for w in weights) <= FULL_HASH_LIMIT:
        weights_id = ";".join(f"{w.name}:{_sha256_file(w)}" for w in weights)
    else:
        weights_id = ";".join(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights)
    data = hashlib.sha256()
    for ids, labels in encoded:
        data.update(json.dumps([ids, labels]).encode())
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "teacher_config": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "teacher_weights": hashlib.sha256(weights_id.encode()).hexdigest(),
        "tokenizer": hashlib.sha256(vocab.encode()).hexdigest(),
        "data": data.hexdigest(),
    }


def teacher_skeleton(spec: ModelConfig, run_dir: Path, role: str = "teacher") -> tuple[PreTrainedModel, Any]:
    """The teacher's architecture on the meta device (no weights) and its tokenizer.

    Stages read the teacher's config (layer count, width, LM head) when they are built; with
    a cache that is all of the teacher training needs.
    """
    path = teacher_dir(spec, run_dir, role)
    config = AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    return model, load_tokenizer(path, spec.trust_remote_code)


# --------------------------------------------------------------------------- writing


def build_cache(config: Config, out_dir: Path, *, top_k: int, hidden: bool = True, examples_per_shard: int = 1024,
                work_dir: Path | None = None, progress: bool = True) -> Path:
    """Run the teacher over the data set once and write the cache to ``out_dir``; returns the index path."""
    work_dir = work_dir or out_dir
    pm = build_manager(config.plugins.disable)
    teacher, teacher_tok = load_model(config.teacher, "teacher", work_dir)
    student, student_tok = load_model(config.student, "student", work_dir)
    check_compatible(teacher, student, teacher_tok, student_tok)
    tokenizer = student_tok or teacher_tok
    if tokenizer is None:
        raise HkdError("neither the teacher nor the student directory has a tokenizer")
    if getattr(teacher, "lm_head", None) is None:
        raise HkdError("cache-teacher: the teacher has no LM head (an encoder?); only causal LM teachers are cached")
    vocab = int(teacher.config.vocab_size)
    if not 1 <= top_k <= vocab:
        raise ConfigError(f"--top-k: must be between 1 and the vocabulary size {vocab}, got {top_k}")

    # the stages as training from this cache will build them, asking what a cache can serve
    serves = TapRequest(hidden=set(range(num_layers(teacher) + 1)), sparse_logits=True)

    def context(name: str) -> StageContext:
        return StageContext(name, teacher, student, config.kernels, f"stages.{name}", pm, tokenizer,
                            teacher_serves=serves, teacher_live=False)

    stages = build_stages(pm, Schedule(config.schedule, config.optim).stage_names, config.stages, context,
                          config.schedule.phases)
    requests = {name: stage.teacher_request() for name, stage in stages.items()}  # type: ignore[operator]
    problems = unserved(serves, requests)
    if problems:
        raise ConfigError(f"cache-teacher: an offline cache cannot serve what the schedule asks: {'; '.join(problems)}")
    layers = sorted(set().union(*(request.hidden for request in requests.values()))) if hidden else []
    encoded = encode_dataset(tokenizer, config.data, config.train.seed)
    if not encoded:
        raise HkdError("cache-teacher: the data set is empty")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    freeze(teacher).to(device)  # type: ignore[arg-type]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INDEX).unlink(missing_ok=True)  # the cache is incomplete until the new index is written

    shards: list[dict[str, Any]] = []
    pending: list[dict[str, Tensor]] = []  # per example: its rows

    def flush() -> None:
        if not pending:
            return
        counts = torch.tensor([0] + [len(p["topk_ids"]) for p in pending])
        tensors = {"offsets": counts.cumsum(0)}
        for key in pending[0]:
            tensors[key] = torch.cat([p[key] for p in pending]).contiguous()
        name = f"shard-{len(shards):05d}.safetensors"
        tmp = out_dir / (name + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, out_dir / name)
        first = sum(s["num_examples"] for s in shards)
        shards.append({"file": name, "first_example": first, "num_examples": len(pending), "bytes": (out_dir / name).stat().st_size})
        pending.clear()

    pad = tokenizer.pad_token_id or 0
    size = config.data.batch_size
    request = TapRequest(hidden=set(layers), logits=True)
    for start in tqdm(range(0, len(encoded), size), disable=not progress, unit="batch", desc="teacher"):
        batch = {k: v.to(device) for k, v in collate(encoded[start: start + size], pad).items()}
        with torch.no_grad():
            view = forward_with_taps(teacher, batch, request)
        assert view.logits is not None
        for row in range(batch["input_ids"].shape[0]):
            positions = batch["loss_mask"][row].nonzero().squeeze(-1)
            values, ids = view.logits[row, positions].float().topk(top_k, dim=-1)
            example = {"topk_values": values.cpu(), "topk_ids": ids.to(torch.int32).cpu()}
            for layer in layers:
                assert view.hidden_states is not None
                example[f"hidden.{layer}"] = view.hidden_states[layer][row, positions].cpu()
            pending.append(example)
            if len(pending) == examples_per_shard:
                flush()
    flush()
    index = {
        "version": VERSION,
        "fingerprint": fingerprint(teacher_dir(config.teacher, work_dir), tokenizer, encoded),
        "teacher": config.teacher.path or config.teacher.preset,
        "top_k": top_k,
        "vocab_size": vocab,
        "layers": layers,
        "num_examples": len(encoded),
        "shards": shards,
    }
    tmp = out_dir / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out_dir / INDEX)
    return out_dir / INDEX


# --------------------------------------------------------------------------- reading


def _index_problem(index: Any) -> str | None:
    """What is wrong with a parsed ``index.json``, or ``None``: types, ranges, and a shard table that
    covers examples ``0..num_examples-1`` contiguously."""

    def count(value: Any, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    if not isinstance(index, dict):
        return f"expected a JSON object, got {type(index).__name__}"
    if index.get("version") != VERSION:
        return f"format version {index.get('version')!r}, this hkd reads version {VERSION}"
    missing = [k for k in ("fingerprint", "top_k", "vocab_size", "layers", "num_examples", "shards") if k not in index]
    if missing:
        return f"missing key(s) {missing}"
    fingerprint = index["fingerprint"]
    keys = ("teacher_config", "teacher_weights", "tokenizer", "data")
    if not isinstance(fingerprint, dict) or not all(isinstance(fingerprint.get(k), str) for k in keys):
        return f"fingerprint: expected a mapping with string values for {list(keys)}"
    if not count(index["vocab_size"], 1):
        return f"vocab_size: expected an integer >= 1, got {index['vocab_size']!r}"
    if not count(index["top_k"], 1) or index["top_k"] > index["vocab_size"]:
        return f"top_k: expected an integer in [1, vocab_size={index['vocab_size']}], got {index['top_k']!r}"
    layers = index["layers"]
    if not isinstance(layers, list) or not all(count(x, 0) for x in layers) or len(set(layers)) != len(layers):
        return f"layers: expected a list of distinct layer numbers >= 0, got {layers!r}"
    if not count(index["num_examples"], 1):
        return f"num_examples: expected an integer >= 1, got {index['num_examples']!r}"
    shards = index["shards"]
    if not isinstance(shards, list) or not shards:
        return "shards: expected a non-empty list"
    covered = 0
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            return f"shards[{i}]: expected an object, got {type(shard).__name__}"
        name = shard.get("file")
        if not isinstance(name, str) or not name.endswith(".safetensors") or Path(name).name != name:
            return f"shards[{i}].file: expected a *.safetensors file name in the cache directory, got {name!r}"
        if shard.get("first_example") != covered or not count(shard.get("first_example"), 0):
            return f"shards[{i}].first_example: expected {covered} (shards cover examples in order), got " \
                   f"{shard.get('first_example')!r}"
        if not count(shard.get("num_examples"), 1):
            return f"shards[{i}].num_examples: expected an integer >= 1, got {shard.get('num_examples')!r}"
        if "bytes" in shard and not count(shard["bytes"], 8):
            return f"shards[{i}].bytes: expected a file size, got {shard['bytes']!r}"
        covered += shard["num_examples"]
    if covered != index["num_examples"]:
        return f"num_examples is {index['num_examples']} but the shards hold {covered}"
    return None


def read_index(index_file: Path) -> dict[str, Any]:
    """``index.json`` parsed and checked against its schema; a problem names the file and what is wrong."""
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HkdError(f"teacher_cache: {str(index_file)!r} is not valid JSON ({exc}); the cache is damaged, "
                       "rebuild it with hkd cache-teacher") from None
    problem = _index_problem(index)
    if problem is not None:
        raise HkdError(f"teacher_cache: {str(index_file)!r}: {problem}; rebuild it with hkd cache-teacher")
    return index


def _damaged(path: Path, what: str) -> HkdError:
    return HkdError(f"teacher_cache: shard {str(path)!r} {what}; the cache is damaged, rebuild it with hkd cache-teacher")


def check_shard(cache_dir: Path, shard: dict[str, Any], index: dict[str, Any]) -> int:
    """Check one shard's file against the index without reading its tensors; returns its row count.

    The size recorded at build time, the safetensors header (nothing truncated) and the
    tensors with their shapes (``offsets`` [E+1], ``topk_*`` [R, top_k], ``hidden.L`` [R, H]
    for every indexed layer) must all agree. Cheap (the header only): done for every shard
    when the cache is opened, so damage is found before training starts.
    """
    path = cache_dir / shard["file"]

    def damaged(what: str) -> HkdError:
        return _damaged(path, what)

    if not path.is_file():
        raise damaged("is missing")
    size = path.stat().st_size
    if "bytes" in shard and size != shard["bytes"]:
        raise damaged(f"has {size} bytes, the index recorded {shard['bytes']}")
    try:
        shapes = safetensors_shapes(path)
    except HkdError as exc:
        raise damaged(f"is unreadable ({exc})") from None
    examples, k = shard["num_examples"], index["top_k"]
    if shapes.get("offsets") != [examples + 1]:
        raise damaged(f"has offsets of shape {shapes.get('offsets')}, expected [{examples + 1}]")
    rows: int | None = (shapes.get("topk_values") or [None])[0]  # type: ignore[list-item]
    expected = {"topk_values": [rows, k], "topk_ids": [rows, k]}
    for name, want in expected.items():
        if shapes.get(name) != want:
            raise damaged(f"has {name} of shape {shapes.get(name)}, expected {want}")
    for layer in index["layers"]:
        got = shapes.get(f"hidden.{layer}")
        if got is None or len(got) != 2 or got[0] != rows:
            raise damaged(f"has hidden.{layer} of shape {got}, expected [{rows}, hidden size]")
    return int(rows) if rows is not None else 0


def open_shard(cache_dir: Path, shard: dict[str, Any], index: dict[str, Any]) -> tuple[Any, list[int]]:
    """(safetensors handle, row offsets) of one shard: :func:`check_shard`, then the offsets
    themselves (0, non-decreasing, ending at the row count)."""
    path = cache_dir / shard["file"]
    rows = check_shard(cache_dir, shard, index)
    try:
        handle = safe_open(str(path), framework="pt")
        offsets = handle.get_tensor("offsets").tolist()
    except Exception as exc:  # safetensors raises its own error types
        raise _damaged(path, f"is unreadable ({exc})") from None
    if offsets[0] != 0 or offsets[-1] != rows or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise _damaged(path, "has row offsets that are not 0, non-decreasing and ending at its row count")
    return handle, offsets


class TeacherCache:
    """Read side of the cache: checks it fits the run, then serves the teacher's targets per batch."""

    def __init__(self, path: str | Path, max_open_shards: int = 4) -> None:
        self.path = Path(path)
        index_file = self.path / INDEX
        if not index_file.is_file():
            raise HkdError(f"teacher_cache: {str(self.path)!r} has no {INDEX} (not a cache, or its build did not "
                           "finish); build it with hkd cache-teacher")
        self.index = read_index(index_file)
        for shard in self.index["shards"]:  # a truncated or missing shard is named now, not mid-training
            check_shard(self.path, shard, self.index)
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, tuple[Any, list[int]]] = OrderedDict()  # shard -> (handle, offsets)

    def check(self, expected: dict[str, str]) -> None:
        """Refuse a cache built for another teacher, tokenizer or data set.

        Whether it holds what the stages need (layers, top-k targets) is checked against
        :meth:`hkd.sources.CachedTeacher.serves` by the loop, for every request field.
        """
        what = {"teacher_config": "teacher config", "teacher_weights": "teacher weights",
                "tokenizer": "tokenizer vocabulary", "data": "data (records, fields, max_length or tokenizer)"}
        found = self.index["fingerprint"]
        differs = [label for key, label in what.items() if found.get(key) != expected[key]]
        if differs:
            raise HkdError(f"teacher_cache {str(self.path)!r} was built for a different setup: {'; '.join(differs)} "
                           "differ; rebuild it with hkd cache-teacher")

    def _shard(self, example: int) -> tuple[Any, int, int]:
        """(open shard handle, first row, end row) of one example; least recently used shards are closed."""
        for number, shard in enumerate(self.index["shards"]):
            local = example - shard["first_example"]
            if 0 <= local < shard["num_examples"]:
                break
        else:
            raise HkdError(f"teacher_cache: example {example} is not in the cache ({self.index['num_examples']} held)")
        if number not in self._open:
            self._open[number] = open_shard(self.path, shard, self.index)
            if len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
        self._open.move_to_end(number)
        handle, offsets = self._open[number]
        return handle, offsets[local], offsets[local + 1]

    def view(self, batch: dict[str, Tensor], request: TapRequest) -> ModelView:
        """The teacher's side of ``batch``: cached hidden states and top-k targets in a view.

        Targets are scattered to the batch's target positions (``loss_mask``); other positions
        hold zeros, which every stage masks out. The top-k targets travel as
        ``view.sparse`` (:class:`hkd.view.SparseTargets`, ``[B, S, k]``).
        """
        mask = batch["loss_mask"]
        device = mask.device
        shape = tuple(mask.shape)
        k = self.index["top_k"]
        values = torch.zeros(shape + (k,), device=device)
        ids = torch.zeros(shape + (k,), dtype=torch.long, device=device)
        hidden: dict[int, Tensor] = {}
        for row, example in enumerate(batch["example_index"].tolist()):
            handle, begin, end = self._shard(example)
            positions = mask[row].nonzero().squeeze(-1)
            if len(positions) != end - begin:
                raise HkdError(f"teacher_cache: example {example} has {end - begin} cached targets but the batch has "
                               f"{len(positions)}; the cache was built for different data, rebuild it")
            if request.sparse_logits:
                values[row, positions] = handle.get_slice("topk_values")[begin:end].to(device)
                ids[row, positions] = handle.get_slice("topk_ids")[begin:end].to(device).long()
            for layer in request.hidden:
                rows = handle.get_slice(f"hidden.{layer}")[begin:end].to(device)
                if layer not in hidden:
                    hidden[layer] = torch.zeros(shape + (rows.shape[-1],), dtype=rows.dtype, device=device)
                hidden[layer][row, positions] = rows
        states = tuple(hidden.get(layer) for layer in range(max(hidden, default=-1) + 1))
        return ModelView(hidden_states=states if hidden else None,
                         sparse=SparseTargets(ids, values) if request.sparse_logits else None)
