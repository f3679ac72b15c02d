"""Offline teacher cache: run the teacher once, train many students without it.

``hkd cache-teacher CONFIG`` runs the teacher over the distill config's data set (encoded as
training encodes it, in data-set order, ``data.batch_size`` sequences at a time) and stores,
for every target position of every example (``loss_mask``: positions whose next token is a
label; every real token for an encoder), the teacher's output targets and, optionally, the
hidden states of the teacher layers the configured stages map to. Training with
``teacher_cache: PATH`` then never loads or runs the teacher: the loop asks
:meth:`TeacherCache.view` for the teacher's side of each micro-batch, looked up by the
batch's ``example_index``.

Targets (``--targets``):

* ``topk``: the teacher's ``k`` largest logits (values at temperature 1, and ids) and its full
  log-normaliser ``logsumexp(logits / T)`` at the cache temperature ``T``: the mass outside the
  top-k (the tail bucket of the logits stage) is exact at that temperature.
* ``sampled``: ``K`` tokens drawn with replacement from ``softmax(logits / T)`` (seeded per
  example, so the draw does not depend on the batch size), stored as distinct ids and counts;
  ``count / K`` is an unbiased estimate of the teacher's distribution at ``T`` only.
* ``none``: hidden states only (encoders, which have no LM head, or feature-only schedules).

Layout of the cache directory::

    index.json                    version, fingerprint, targets, top_k / samples, temperature, layers, shards
    shard-00000.safetensors       offsets [E+1] (row range per example); topk_values [R, k] (fp32),
    shard-00001.safetensors ...   topk_ids [R, k] (int32), logsumexp [R] (fp32)  -- or --
                                  sample_ids [R, W], sample_counts [R, W] (int32, W = min(K, V));
                                  hidden.<layer> [R, H] for each layer

Shards are written atomically (tmp + rename) and the index last, so a crash never leaves
a cache that looks complete. The reader opens at most a few shards at a time and reads only
the rows a batch needs (safetensors slices), so memory stays bounded by the batch.

The fingerprint records what the targets depend on: the teacher (config.json hash and a
hash of the weight files; above 1 GiB their names, sizes and mtimes instead, to keep
fingerprinting cheap), the tokenizer's vocabulary, and the encoded data. A cache whose
fingerprint differs, or that lacks a layer a stage needs, is refused with the difference.
Version 1 caches (top-k values without the log-normaliser) are refused with a rebuild hint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel

from hkd.config import Config, ModelConfig, TemperatureConfig
from hkd.config.flags import EXAMPLES_PER_SHARD, SEED, check_number
from hkd.config.outputs import check_output_dir
from hkd.data.encoding import collate, encode_dataset
from hkd.errors import ConfigError, HkdError
from hkd.plugin.manager import build_manager
from hkd.models.loading import (
    check_compatible, check_role, freeze, load_model, load_tokenizer, num_layers, preset_dir, safetensors_shapes,
)
from hkd.plugin.schedule import Schedule
from hkd.plugin.stage import StageContext, build_stages
from hkd.models.taps import forward_with_taps
from hkd.models.device import to_device
from hkd.models.view import ModelView, SparseTargets, TapRequest, unserved

INDEX = "index.json"
VERSION = 2  # 2: targets kind, temperature, the top-k log-normaliser, sampled targets, hidden-only caches
FULL_HASH_LIMIT = 1 << 30  # weight files up to this total size are hashed in full
TARGETS = ("topk", "sampled", "none")
Targets = Literal["topk", "sampled", "none"]
SAMPLE_BLOCK = 1 << 22  # positions x vocabulary entries counted at once when drawing sampled targets


# --------------------------------------------------------------------------- fingerprints


def teacher_dir(spec: ModelConfig, run_dir: Path, role: str = "teacher") -> Path:
    """The teacher's model directory; a preset is written where :func:`hkd.models.loading.load_model` puts it."""
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
    a cache that is all of the teacher training needs. An encoder (``encoder: true``) is built
    as its bare model, as :func:`hkd.models.loading.load_model` loads it.
    """
    path = teacher_dir(spec, run_dir, role)
    config = AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    check_role(config, spec, role, path)  # encoder: true on a causal LM is refused here too
    loader = AutoModel if spec.encoder else AutoModelForCausalLM
    with torch.device("meta"):
        model = loader.from_config(config, trust_remote_code=spec.trust_remote_code)
    return model, load_tokenizer(path, spec.trust_remote_code)


# --------------------------------------------------------------------------- targets


def topk_targets(logits: Tensor, k: int, temperature: float = 1.0) -> dict[str, Tensor]:
    """What a ``topk`` cache stores for logits ``[P, V]`` (temperature 1): the ``k`` largest values
    (fp32) and their ids (int32), and ``logsumexp(logits / temperature)`` ``[P]`` (fp32), the full
    log-normaliser that makes the tail outside the ``k`` ids exact at ``temperature``."""
    z = logits.float()
    values, ids = z.topk(k, dim=-1)
    return {"topk_values": values.cpu(), "topk_ids": ids.to(torch.int32).cpu(),
            "logsumexp": (z / temperature).logsumexp(-1).cpu()}


def sampled_targets(logits: Tensor, samples: int, temperature: float, generator: torch.Generator) -> dict[str, Tensor]:
    """What a ``sampled`` cache stores for logits ``[P, V]``: ``samples`` draws with replacement from
    ``softmax(logits / temperature)`` per position, as the distinct ids (``sample_ids``, int32) and
    their counts (``sample_counts``, int32), ``W = min(samples, V)`` slots per position, the most
    frequent first; unused slots have count 0. Drawn on the CPU from fp32 probabilities with
    ``generator``, so a given generator state gives the same tokens on any machine."""
    probs = (logits.detach().float().cpu() / temperature).softmax(-1)
    positions, vocab = probs.shape
    width = min(samples, vocab)
    ids = torch.zeros(positions, width, dtype=torch.int32)
    counts = torch.zeros(positions, width, dtype=torch.int32)
    step = max(1, SAMPLE_BLOCK // max(vocab, 1))  # bounds the [rows, V] count table
    for i in range(0, positions, step):
        block = probs[i: i + step]
        draws = torch.multinomial(block, samples, replacement=True, generator=generator)
        table = torch.zeros(block.shape, dtype=torch.int32).scatter_add_(
            1, draws, torch.ones(draws.shape, dtype=torch.int32))
        top, where = table.topk(width, dim=-1)
        ids[i: i + step], counts[i: i + step] = where.to(torch.int32), top
    return {"sample_ids": ids, "sample_counts": counts}


def example_generator(seed: int, example: int) -> torch.Generator:
    """The generator an example's sampled targets are drawn with: a function of (seed, example) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + example) % (1 << 63))


def constant_temperature(config: TemperatureConfig) -> float | None:
    """The run's temperature when it is the same at every step, else ``None`` (a linear or cosine ramp)."""
    if config.kind == "constant" or config.start == config.end:
        return float(config.start)
    return None


def describe_temperature(config: TemperatureConfig) -> str:
    if constant_temperature(config) is not None:
        return f"{constant_temperature(config):g}"
    return f"{config.kind} from {config.start:g} to {config.end:g}"


def cache_serves(index: dict[str, Any], run_temperature: float | None, run_temperature_text: str = "") \
        -> tuple[TapRequest, list[str]]:
    """What a cache described by ``index`` can serve a run at ``run_temperature`` (``None``: it varies),
    and, for what it cannot, why (lines for a refusal).

    Top-k values are raw logits, so renormalised top-k targets serve any temperature. The tail
    bucket's mass and sampled targets are exact only at the cache's temperature: they are served
    only to a run whose temperature is that one at every step.
    """
    targets, cache_t = index["targets"], index["temperature"]
    matches = run_temperature is not None and math.isclose(run_temperature, cache_t, rel_tol=1e-6)
    notes = []
    if targets == "none":
        notes.append("the cache holds hidden states only (built with --targets none): no logits of any kind")
    elif not matches:
        what = ("sampled targets (drawn at that temperature, so they estimate the teacher only there)"
                if targets == "sampled" else "the top-k tail mass (sparse_logsumexp; renormalised top-k "
                "targets, sparse_tail: renormalize, serve any temperature)")
        notes.append(f"the cache was built at temperature {cache_t:g} and serves {what} only to a run whose "
                     f"schedule.temperature is {cache_t:g} at every step, not {run_temperature_text or 'another'}; "
                     "rebuild it with hkd cache-teacher --temperature T or change schedule.temperature")
    elif targets == "sampled":
        notes.append("sampled targets have no tail bucket (the draws cover the tail): use sparse_tail: auto")
    serves = TapRequest(hidden=set(index["layers"]),
                        sparse_logits=targets == "topk" or (targets == "sampled" and matches),
                        sparse_logsumexp=targets == "topk" and matches)
    return serves, notes


# --------------------------------------------------------------------------- writing


def is_cache_dir(path: Path) -> bool:
    """A directory ``hkd cache-teacher`` wrote: its index, a shard, or only the preset models it writes first."""
    if (path / INDEX).is_file() or any(path.glob("shard-*.safetensors*")):
        return True
    return {p.name for p in path.iterdir()} == {"models"} and all(
        (role / "hkd-preset.json").is_file() or role.name.endswith(".tmp") for role in (path / "models").iterdir())


def check_cache_output(out_dir: Path, flag: str = "--out") -> Path:
    """Where ``hkd cache-teacher`` writes, checked before any work (:mod:`hkd.config.outputs`)."""
    return check_output_dir(out_dir, flag, "cache-teacher", owner=is_cache_dir, why=f"it has no {INDEX}")


def build_cache(config: Config, out_dir: Path, *, top_k: int = 64, hidden: bool = True, targets: Targets | None = None,
                samples: int = 64, temperature: float | None = None, seed: int | None = None,
                examples_per_shard: int = 1024, work_dir: Path | None = None, progress: bool = True,
                flag: str = "--out") -> Path:
    """Run the teacher over the data set once and write the cache to ``out_dir``; returns the index path.

    ``targets``: ``topk`` (``top_k`` logits and the log-normaliser), ``sampled`` (``samples`` draws per
    position, seeded by ``seed``, default ``train.seed``) or ``none`` (hidden states only); default
    ``topk``, or ``none`` for a teacher without an LM head. ``temperature``: of the log-normaliser and
    the draws; default the run's ``schedule.temperature`` when constant, else 1 (``sampled`` then
    needs it given).
    """
    check_cache_output(out_dir, flag)  # before any model loads
    if config.data.streaming:  # an endless stream has no last example to cache
        raise ConfigError("data.streaming: hkd cache-teacher caches every example of a data set read whole; "
                          "set data.streaming: false to build the cache (training from it needs that too)")
    check_number(examples_per_shard, EXAMPLES_PER_SHARD, "--examples-per-shard")  # the CLI's ranges
    if seed is not None:
        check_number(seed, SEED, "--seed")
    work_dir = work_dir or out_dir
    pm = build_manager(config.plugins.disable)
    teacher, teacher_tok = load_model(config.teacher, "teacher", work_dir)
    student, student_tok = load_model(config.student, "student", work_dir)
    check_compatible(teacher, student, teacher_tok, student_tok)
    tokenizer = student_tok or teacher_tok
    if tokenizer is None:
        raise HkdError("neither the teacher nor the student directory has a tokenizer")
    has_head = getattr(teacher, "lm_head", None) is not None
    if targets is None:
        targets = "topk" if has_head else "none"
    if targets not in TARGETS:
        raise ConfigError(f"--targets: expected one of {list(TARGETS)}, got {targets!r}")
    if targets != "none" and not has_head:
        raise HkdError(f"cache-teacher --targets {targets}: the teacher has no LM head (an encoder?), so it has no "
                       "logits to cache; use --targets none to cache its hidden states only")
    vocab = int(teacher.config.vocab_size)
    if targets == "topk" and not 1 <= top_k <= vocab:
        raise ConfigError(f"--top-k: must be between 1 and the vocabulary size {vocab}, got {top_k}")
    if targets == "sampled" and not 1 <= samples <= 1 << 20:
        raise ConfigError(f"--samples: must be between 1 and {1 << 20}, got {samples}")
    run_t = constant_temperature(config.schedule.temperature)
    if temperature is None:
        if targets == "sampled" and run_t is None:
            raise ConfigError(f"cache-teacher --targets sampled: schedule.temperature varies "
                              f"({describe_temperature(config.schedule.temperature)}) but sampled targets estimate the "
                              "teacher at one temperature; give --temperature T and train at that constant temperature")
        temperature = run_t if run_t is not None else 1.0
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"--temperature: must be a positive number, got {temperature}")
    seed = config.train.seed if seed is None else seed
    facts: dict[str, Any] = {"targets": targets, "temperature": float(temperature), "layers": []}

    # the stages as training from this cache will build them, asking what a cache can serve
    serves, notes = cache_serves(facts, run_t, describe_temperature(config.schedule.temperature))
    serves.hidden = set(range(num_layers(teacher) + 1))

    def context(name: str) -> StageContext:
        return StageContext(name, teacher, student, config.kernels, f"stages.{name}", pm, tokenizer,
                            teacher_serves=serves, teacher_live=False, data=config.data)

    stages = build_stages(pm, Schedule(config.schedule, config.optim).stage_names, config.stages, context,
                          config.schedule.phases)
    requests = {name: stage.teacher_request() for name, stage in stages.items()}  # type: ignore[operator]
    problems = unserved(serves, requests)
    if problems:
        raise ConfigError(f"cache-teacher: an offline cache cannot serve what the schedule asks: {'; '.join(problems)}"
                          + "".join(f" ({note})" for note in notes))
    layers = sorted(set().union(*(request.hidden for request in requests.values()))) if hidden else []
    if targets == "none" and not layers:
        raise ConfigError("cache-teacher --targets none: nothing to cache (no stage maps a teacher hidden layer, or "
                          "--no-hidden); cache targets or schedule a hidden-state stage")
    causal = not config.student.encoder  # the loss mask training uses: every real token for an encoder
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
        counts = torch.tensor([0] + [len(next(iter(p.values()))) for p in pending])
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
    request = TapRequest(hidden=set(layers), logits=targets != "none")
    for start in tqdm(range(0, len(encoded), size), disable=not progress, unit="batch", desc="teacher"):
        batch = {k: v.to(device) for k, v in collate(encoded[start: start + size], pad, causal).items()}
        with torch.no_grad():
            view = forward_with_taps(teacher, batch, request)
        for row in range(batch["input_ids"].shape[0]):
            positions = batch["loss_mask"][row].nonzero().squeeze(-1)
            example: dict[str, Tensor] = {}
            if targets != "none":
                assert view.logits is not None
                logits = view.logits[row, positions]
                if targets == "topk":
                    example.update(topk_targets(logits, top_k, temperature))
                else:
                    example.update(sampled_targets(logits, samples, temperature, example_generator(seed, start + row)))
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
        "targets": targets,
        "top_k": top_k if targets == "topk" else None,
        "samples": samples if targets == "sampled" else None,
        "seed": seed if targets == "sampled" else None,
        "temperature": float(temperature),
        "causal": causal,
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


def slots(index: dict[str, Any]) -> int:
    """Target slots per row: ``top_k``, ``min(samples, vocab_size)``, or 0 for a hidden-only cache."""
    if index["targets"] == "topk":
        return int(index["top_k"])
    if index["targets"] == "sampled":
        return min(int(index["samples"]), int(index["vocab_size"]))
    return 0


def _index_problem(index: Any) -> str | None:
    """What is wrong with a parsed ``index.json``, or ``None``: types, ranges, and a shard table that
    covers examples ``0..num_examples-1`` contiguously."""

    def count(value: Any, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    if not isinstance(index, dict):
        return f"expected a JSON object, got {type(index).__name__}"
    if index.get("version") == 1:
        return (f"format version 1, written by an older hkd (top-k logits without the teacher's log-normaliser); "
                f"this hkd reads version {VERSION}")
    if index.get("version") != VERSION:
        return f"format version {index.get('version')!r}, this hkd reads version {VERSION}"
    missing = [k for k in ("fingerprint", "targets", "top_k", "samples", "temperature", "causal", "vocab_size",
                           "layers", "num_examples", "shards") if k not in index]
    if missing:
        return f"missing key(s) {missing}"
    fingerprint = index["fingerprint"]
    keys = ("teacher_config", "teacher_weights", "tokenizer", "data")
    if not isinstance(fingerprint, dict) or not all(isinstance(fingerprint.get(k), str) for k in keys):
        return f"fingerprint: expected a mapping with string values for {list(keys)}"
    if not count(index["vocab_size"], 1):
        return f"vocab_size: expected an integer >= 1, got {index['vocab_size']!r}"
    if index["targets"] not in TARGETS:
        return f"targets: expected one of {list(TARGETS)}, got {index['targets']!r}"
    if index["targets"] == "topk" and (not count(index["top_k"], 1) or index["top_k"] > index["vocab_size"]):
        return f"top_k: expected an integer in [1, vocab_size={index['vocab_size']}], got {index['top_k']!r}"
    if index["targets"] == "sampled" and not count(index["samples"], 1):
        return f"samples: expected an integer >= 1, got {index['samples']!r}"
    t = index["temperature"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
        return f"temperature: expected a positive number, got {t!r}"
    if not isinstance(index["causal"], bool):
        return f"causal: expected true or false, got {index['causal']!r}"
    layers = index["layers"]
    if not isinstance(layers, list) or not all(count(x, 0) for x in layers) or len(set(layers)) != len(layers):
        return f"layers: expected a list of distinct layer numbers >= 0, got {layers!r}"
    if index["targets"] == "none" and not layers:
        return "targets is none and layers is empty: the cache holds nothing"
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
    tensors with their shapes (``offsets`` [E+1]; ``topk_values``/``topk_ids`` [R, top_k] and
    ``logsumexp`` [R], or ``sample_ids``/``sample_counts`` [R, W]; ``hidden.L`` [R, H] for every
    indexed layer) must all agree. Cheap (the header only): done for every shard when the cache
    is opened, so damage is found before training starts.
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
    examples, k = shard["num_examples"], slots(index)
    if shapes.get("offsets") != [examples + 1]:
        raise damaged(f"has offsets of shape {shapes.get('offsets')}, expected [{examples + 1}]")
    first = {"topk": "topk_values", "sampled": "sample_ids"}.get(index["targets"]) or f"hidden.{index['layers'][0]}"
    rows: int | None = (shapes.get(first) or [None])[0]  # type: ignore[list-item]
    expected: dict[str, list[int | None]] = {}
    if index["targets"] == "topk":
        expected = {"topk_values": [rows, k], "topk_ids": [rows, k], "logsumexp": [rows]}
    elif index["targets"] == "sampled":
        expected = {"sample_ids": [rows, k], "sample_counts": [rows, k]}
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


@dataclass
class HostTargets:
    """One micro-batch's cached targets on the host, scattered to ``[B, S, ...]`` (what :meth:`TeacherCache.read`
    gathers off the step; :meth:`TeacherCache.to_view` copies them to the device). ``ids`` stay int32 on the
    host (half the copy) and become int64 on the device."""

    ids: Tensor | None
    values: Tensor | None
    logsumexp: Tensor | None
    hidden: dict[int, Tensor]
    temperature: float
    kind: str

    def pinned(self) -> HostTargets:
        def pin(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.pin_memory()

        return HostTargets(pin(self.ids), pin(self.values), pin(self.logsumexp),
                           {layer: t.pin_memory() for layer, t in self.hidden.items()}, self.temperature, self.kind)


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
        :meth:`hkd.teachers.sources.CachedTeacher.serves` by the loop, for every request field.
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
        """The teacher's side of ``batch``: cached hidden states and sparse targets in a view.

        Targets are scattered to the batch's target positions (``loss_mask``); other positions
        hold zeros, which every stage masks out. Targets travel as ``view.sparse``
        (:class:`hkd.models.view.SparseTargets`, ``[B, S, k]``): top-k logits with the log-normaliser
        (when ``sparse_logsumexp`` is asked for), or sampled targets as ``log(count / K)``.

        :meth:`read` (host) then :meth:`to_view` (one copy each to the device); the training loop calls
        them apart, reading micro-batch N+1 on a background thread while N trains
        (:class:`hkd.teachers.sources.CachedTeacher`).
        """
        host = {key: batch[key].cpu() for key in ("loss_mask", "example_index")}
        return self.to_view(self.read(host, request), batch["loss_mask"].device)

    def read(self, host_batch: dict[str, Tensor], request: TapRequest, pin: bool = False) -> HostTargets:
        """The targets of a micro-batch gathered on the host from its CPU ``loss_mask`` and ``example_index``:
        shard slices scattered to the target positions, nothing on a device (``pin``: in pinned memory,
        for an asynchronous copy to CUDA). Not thread-safe: one reader thread at a time."""
        mask = host_batch["loss_mask"].bool()
        shape = tuple(mask.shape)
        index = self.index
        kind, k = index["targets"], slots(index)
        sparse = request.sparse_logits and kind != "none"
        values = torch.zeros(shape + (k,), device="cpu")
        ids = torch.zeros(shape + (k,), dtype=torch.int32, device="cpu")
        lse = torch.zeros(shape, device="cpu") if sparse and kind == "topk" and request.sparse_logsumexp else None
        hidden: dict[int, Tensor] = {}
        for row, example in enumerate(host_batch["example_index"].tolist()):
            handle, begin, end = self._shard(example)
            positions = mask[row].nonzero().squeeze(-1)
            if len(positions) != end - begin:
                raise HkdError(f"teacher_cache: example {example} has {end - begin} cached targets but the batch has "
                               f"{len(positions)}; the cache was built for different data, rebuild it")
            if sparse and kind == "topk":
                values[row, positions] = handle.get_slice("topk_values")[begin:end]
                ids[row, positions] = handle.get_slice("topk_ids")[begin:end].to(torch.int32)
                if lse is not None:
                    lse[row, positions] = handle.get_slice("logsumexp")[begin:end]
            elif sparse:
                counts = handle.get_slice("sample_counts")[begin:end]
                if counts.numel() and (counts.sum(-1) != index["samples"]).any():
                    raise HkdError(f"teacher_cache {str(self.path)!r}: the sample counts of example {example} do not "
                                   f"sum to samples={index['samples']}; the cache is damaged, rebuild it with "
                                   "hkd cache-teacher")
                # log(count / K): the empirical distribution; empty slots (count 0) are -inf
                values[row, positions] = (counts.double() / index["samples"]).log().float()
                ids[row, positions] = handle.get_slice("sample_ids")[begin:end].to(torch.int32)
            for layer in request.hidden:
                rows = handle.get_slice(f"hidden.{layer}")[begin:end]
                if layer not in hidden:
                    hidden[layer] = torch.zeros(shape + (rows.shape[-1],), dtype=rows.dtype, device="cpu")
                hidden[layer][row, positions] = rows
        targets = HostTargets(ids if sparse else None, values if sparse else None, lse, hidden,
                              float(index["temperature"]), "sampled" if kind == "sampled" else "topk")
        return targets.pinned() if pin else targets

    @staticmethod
    def to_view(targets: HostTargets, device: torch.device) -> ModelView:
        """A view on ``device`` of targets :meth:`read` gathered: one (asynchronous on CUDA) copy per tensor."""
        hidden = {layer: to_device(t, device) for layer, t in targets.hidden.items()}
        states = tuple(hidden.get(layer) for layer in range(max(hidden, default=-1) + 1))
        sparse = None
        if targets.ids is not None and targets.values is not None:
            lse = None if targets.logsumexp is None else to_device(targets.logsumexp, device)
            sparse = SparseTargets(to_device(targets.ids, device).long(), to_device(targets.values, device), lse,
                                   temperature=targets.temperature, kind=targets.kind)  # type: ignore[arg-type]
        return ModelView(hidden_states=states if hidden else None, sparse=sparse)
