"""Loading teacher and student from local Hugging Face directories, and tiny presets.

Presets exist so tests and demos need no downloads: ``write_preset`` saves a randomly
initialised tiny model plus a tokenizer (character-level for the decoders, a small WordPiece
with [CLS]/[SEP]/[PAD]/[MASK] for tiny-bert) to a directory, and from then on
the ordinary ``from_pretrained`` path loads it, exactly as it would a real checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hkd import versions
from hkd.config import ModelConfig
from hkd.errors import HkdError

# Models are loaded here: a torch or transformers below hkd's range, or a release whose import
# breaks, ends as one error naming the package, its version and the range that works.
with versions.importing("torch", "transformers"):
    import torch
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoTokenizer,
        BertConfig,
        LlamaConfig,
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
        Qwen2Config,
    )
    from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # hkd shows its own progress; per-shard bars are noise here

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARACTERS = [chr(i) for i in range(32, 127)] + ["\n"]

_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
PRESETS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "tiny-llama": (LlamaConfig, {**_TINY, "num_key_value_heads": 2, "max_position_embeddings": 512}),
    "tiny-qwen2": (Qwen2Config, {**_TINY, "num_key_value_heads": 2, "max_position_embeddings": 512}),
    "tiny-bert": (BertConfig, {**_TINY, "max_position_embeddings": 512}),
}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII: no files to download, exact round trips."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# The text the tiny-bert preset's WordPiece vocabulary is learned from: fixed here, so the
# preset is the same on every machine (worked arithmetic, as in the synthetic data, and prose).
WORDPIECE_TEXT = """The teacher model encodes each sentence into a sequence of hidden states.
A smaller student learns to reproduce the teacher's attention patterns and hidden states layer by layer.
Knowledge distillation transfers what a large network has learned into a compact one.
Sentence embeddings are mean-pooled over the tokens; similar sentences get similar vectors.
Question: what is 47 + 38? Add the ones: 7 + 8 = 15, write 5 carry 1. Add the tens: 4 + 3 + 1 = 8. Answer: 85
Compute 12 * 3 - 4 = 32, then 32 + 19 = 51 and 51 - 6 = 45. The result is 45.
"""


def wordpiece_vocab() -> dict[str, int]:
    """Specials, every printable ASCII character (alone and as a ``##`` continuation), then the words of
    :data:`WORDPIECE_TEXT` in sorted order: deterministic (the ``tokenizers`` trainer breaks ties differently
    from run to run, and teacher and student presets must share one vocabulary)."""
    from tokenizers import normalizers, pre_tokenizers

    chars = sorted({c.lower() for c in CHARACTERS if c.strip()})
    normalizer, split = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = sorted({w for w, _ in split.pre_tokenize_str(normalizer.normalize_str(WORDPIECE_TEXT)) if len(w) > 1})
    tokens = BERT_SPECIAL_TOKENS + chars + [f"##{c}" for c in chars] + words
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """A small BERT-style WordPiece tokenizer ([CLS] text [SEP], [PAD], [MASK]) over :func:`wordpiece_vocab`.

    Every printable ASCII character is in the vocabulary, so nothing ASCII maps to [UNK]; no download.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast  # type: ignore[attr-defined]  # an alias of BertTokenizer in transformers 5

    backend = Tokenizer(models.WordPiece(vocab=wordpiece_vocab(), unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return BertTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]", do_lower_case=True)


def preset_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """tiny-bert: WordPiece with BERT's special tokens; the decoders: characters with bos/eos."""
    return wordpiece_tokenizer() if PRESETS[name][0] is BertConfig else char_tokenizer()


def build_preset(name: str, overrides: dict[str, Any] | None = None, seed: int = 0) -> PreTrainedModel:
    if name not in PRESETS:
        raise HkdError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    config_cls, defaults = PRESETS[name]
    tokenizer = preset_tokenizer(name)
    specials = {"pad_token_id": tokenizer.pad_token_id}
    if config_cls is not BertConfig:
        specials.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    fields = {**defaults, "vocab_size": len(tokenizer), **specials, **(overrides or {})}
    config = config_cls(**fields)
    torch.manual_seed(seed)
    if config_cls is BertConfig:
        return AutoModel.from_config(config)
    return AutoModelForCausalLM.from_config(config)


PRESET_RECIPE = "hkd-preset.json"  # what a preset directory was written from


def write_preset(name: str, out_dir: str | Path, overrides: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """Save a tiny preset model and its tokenizer to ``out_dir`` (safetensors) with its recipe."""
    out = Path(out_dir)
    model = build_preset(name, overrides, seed)
    model.save_pretrained(out, safe_serialization=True)
    preset_tokenizer(name).save_pretrained(out)
    (out / PRESET_RECIPE).write_text(json.dumps({"preset": name, "overrides": overrides or {}, "seed": seed}))
    return out


def preset_dir(spec: ModelConfig, role: str, run_dir: Path) -> Path:
    """``RUN_DIR/models/ROLE`` written from ``spec``'s preset, once; a later run with another recipe is refused.

    The directory is written beside its final place and renamed into it, so a crash never
    leaves a half-written model that a later run would take for a finished one.
    """
    assert spec.preset is not None
    target = run_dir / "models" / role
    recipe = {"preset": spec.preset, "overrides": spec.preset_overrides or {}, "seed": spec.seed}
    if (target / "config.json").is_file():
        written = target / PRESET_RECIPE
        if written.is_file() and json.loads(written.read_text()) != recipe:
            raise HkdError(f"{role}.preset: {str(target)!r} was written from {written.read_text()}, but the config now "
                           f"asks for {json.dumps(recipe)}; use another --out directory or delete {str(target)!r}")
        return target
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_preset(spec.preset, tmp, spec.preset_overrides, spec.seed)
    shutil.rmtree(target, ignore_errors=True)  # a directory without config.json holds nothing finished
    os.replace(tmp, target)
    return target


def _check_model_dir(path: Path, spec: ModelConfig, role: str) -> None:
    if not path.is_dir():
        raise HkdError(f"{role}.path: model directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise HkdError(f"{role}.path: {str(path)!r} has no config.json (is it a Hugging Face model directory?)")
    has_safetensors = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt"))
    if not has_safetensors and not has_pickle:
        raise HkdError(f"{role}.path: {str(path)!r} holds no weights (*.safetensors)")
    if not has_safetensors and not spec.allow_pickle:
        raise HkdError(
            f"{role}.path: {str(path)!r} has only pickle weights (*.bin), which can run arbitrary code when "
            f"loaded; convert them to safetensors or set {role}.allow_pickle: true if you trust the source"
        )


SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                           "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header, after checking the file holds every byte it declares.

    Reading the header ourselves names the file and the problem (truncated, not safetensors,
    a tensor whose extent is inconsistent) instead of a library error or, worse, a model
    loaded from part of a file.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise HkdError(f"{str(path)!r} is not a safetensors file: {size} bytes, shorter than its header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise HkdError(f"{str(path)!r} is not a safetensors file or is truncated: its header claims {header_len} "
                           f"bytes, the file holds {size}")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HkdError(f"{str(path)!r} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise HkdError(f"{str(path)!r} is not a safetensors file (its header is not a JSON object)")
    data_bytes = size - 8 - header_len
    shapes: dict[str, list[int]] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in entry["data_offsets"])
            shape = [int(x) for x in entry["shape"]]
            width = SAFETENSORS_DTYPE_BYTES.get(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise HkdError(f"{str(path)!r}: the header entry for tensor {name!r} is malformed") from None
        count = 1
        for dim in shape:
            count *= dim
        if width is not None and (stop - begin != count * width or begin < 0 or min(shape, default=0) < 0):
            raise HkdError(f"{str(path)!r}: tensor {name!r} of shape {shape} and dtype {entry['dtype']} does not "
                           f"match its byte range {begin}..{stop}; the file is corrupted")
        end = max(end, stop)
        shapes[name] = shape
    if end > data_bytes:
        raise HkdError(f"{str(path)!r} is truncated: its tensors need {end} bytes of data, the file holds {data_bytes}")
    return shapes


def check_weight_files(path: Path) -> None:
    """Every ``*.safetensors`` file in a model directory is whole (see :func:`safetensors_shapes`)."""
    for file in sorted(path.glob("*.safetensors")):
        safetensors_shapes(file)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers prints a load report nobody reads; hkd checks the loading info itself."""
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def check_loading_info(info: dict[str, Any], spec: ModelConfig, role: str, path: Path) -> None:
    """Refuse weights that do not fill the model exactly: a partly random teacher is silently wrong.

    Missing and unexpected parameter names are allowed only when they fully match one of
    ``allow_missing`` / ``allow_unexpected``; a shape mismatch is always an error.
    """

    def refused(keys: Any, patterns: list[str]) -> list[str]:
        names = sorted(key[0] if isinstance(key, (tuple, list)) else str(key) for key in keys)
        return [n for n in names if not any(re.fullmatch(p, n) for p in patterns)]

    problems = []
    missing = refused(info.get("missing_keys", ()), spec.allow_missing)
    if missing:
        problems.append(f"{len(missing)} parameter(s) missing from the weights, which would be randomly initialised "
                        f"({_some(missing)}; allow known ones with {role}.allow_missing)")
    unexpected = refused(info.get("unexpected_keys", ()), spec.allow_unexpected)
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) the model has no place for ({_some(unexpected)}; "
                        f"allow known ones with {role}.allow_unexpected)")
    mismatched = sorted(info.get("mismatched_keys", ()))
    if mismatched:
        shown = [f"{k[0]}: weights {list(k[1])}, model {list(k[2])}" if isinstance(k, (tuple, list)) and len(k) == 3
                 else str(k) for k in mismatched]
        problems.append(f"{len(mismatched)} tensor(s) of the wrong shape ({_some(shown)})")
    if info.get("error_msgs"):
        problems.append("; ".join(" ".join(str(m).split()) for m in info["error_msgs"]))
    if problems:
        raise HkdError(f"{role}: the weights in {str(path)!r} do not match its config.json: {'; '.join(problems)}")


def _some(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "modernbert",
                 "camembert", "albert", "mpnet", "ernie", "nomic_bert", "neobert"}
CAUSAL_SUFFIXES = ("CausalLM", "LMHeadModel")


def _config_facts(config: Any) -> tuple[str, list[str]]:
    if isinstance(config, dict):
        return str(config.get("model_type", "")), list(config.get("architectures") or [])
    return str(getattr(config, "model_type", "")), list(getattr(config, "architectures", None) or [])


def is_encoder_config(config: Any) -> bool:
    """An encoder (BERT family) by its config (a ``PretrainedConfig`` or a ``config.json`` dict): a known encoder
    ``model_type``, or architectures none of which is a causal LM (``BertModel``, ``BertForMaskedLM``)."""
    model_type, architectures = _config_facts(config)
    if config_is_decoder(config):
        return False
    if model_type in ENCODER_TYPES:
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:  # e.g. a bare GPT2Model: loads fine with its LM head
        return False
    return bool(architectures) and not any(a.endswith(CAUSAL_SUFFIXES) for a in architectures)


def config_is_decoder(config: Any) -> bool:
    value = config.get("is_decoder") if isinstance(config, dict) else getattr(config, "is_decoder", False)
    return bool(value)


def encoder_loader(config: Any) -> Any:
    """``AutoModelForMaskedLM`` for a ``*ForMaskedLM`` checkpoint, so its head loads too (the mlm stage's
    targets; loaded bare, the head's tensors would be refused as unexpected), else ``AutoModel``."""
    _, architectures = _config_facts(config)
    return AutoModelForMaskedLM if any(a.endswith("ForMaskedLM") for a in architectures) else AutoModel


def encoder_reason(config: Any) -> str:
    model_type, architectures = _config_facts(config)
    return f"model_type {model_type!r}" + (f", architectures {architectures}" if architectures else "")


def check_role(config: Any, spec: ModelConfig, role: str, path: Path) -> None:
    """The role flags agree with the architecture the checkpoint declares, by name.

    ``encoder: false`` on an encoder would add a randomly initialised LM head; ``encoder: true`` on a
    checkpoint saved as a causal LM (``*ForCausalLM``) would drop its head (allowed away with
    ``allow_unexpected``) and export ``final/`` as a sentence-transformers model around a decoder.
    A bare decoder saved without a head (``LlamaModel``: an embedding model) may be an encoder.
    """
    if not spec.encoder and is_encoder_config(config):
        raise HkdError(f"{role}: {str(path)!r} is an encoder ({encoder_reason(config)}), which has no causal LM "
                       f"head; set {role}.encoder: true (loading it as a causal LM would add a randomly "
                       "initialised head)")
    _, architectures = _config_facts(config)
    causal = [a for a in architectures if a.endswith(CAUSAL_SUFFIXES)]
    if spec.encoder and (causal or config_is_decoder(config)):
        raise HkdError(f"{role}.encoder: true, but {str(path)!r} is a causal LM ({encoder_reason(config)}): as an "
                       "encoder it would lose its LM head and final/ would be a sentence-transformers model around a "
                       f"decoder; set {role}.encoder: false (and distil it as a causal LM)")


def load_model(spec: ModelConfig, role: str, run_dir: Path | None = None) -> tuple[PreTrainedModel, Any]:
    """Load ``role`` ("teacher"/"student") from ``spec``; returns (model, tokenizer or None)."""
    if spec.preset is not None:
        if run_dir is None:
            raise HkdError(f"{role}.preset needs a run directory to write the preset model into")
        path = preset_dir(spec, role, run_dir)
    else:
        assert spec.path is not None
        path = Path(spec.path).expanduser()
    _check_model_dir(path, spec, role)
    try:
        check_weight_files(path)
    except HkdError as exc:
        raise HkdError(f"{role}: {exc}") from None
    kwargs: dict[str, Any] = {
        "trust_remote_code": spec.trust_remote_code,
        "use_safetensors": not spec.allow_pickle or any(path.glob("*.safetensors")),
        "dtype": getattr(torch, spec.dtype),
        "output_loading_info": True,
        "ignore_mismatched_sizes": True,  # reported in the loading info, refused below with the names
    }
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
        loader = encoder_loader(config) if spec.encoder else AutoModelForCausalLM
        check_role(config, spec, role, path)
        with _quiet_transformers(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notes; refusals are raised, not warned
            model, info = loader.from_pretrained(path, config=config, **kwargs)  # type: ignore[misc]
    except (HkdError, KeyboardInterrupt, MemoryError):
        raise
    except pickle.UnpicklingError as exc:  # allow_pickle, but torch's weights-only unpickler found more than tensors
        reason = next((line.strip() for line in str(exc).splitlines() if "Unsupported" in line), "not only tensors")
        raise HkdError(f"{role}: refused to unpickle the weights in {str(path)!r}: they hold something other than "
                       f"tensors, which could run code ({reason}); get safetensors weights instead") from None
    except Exception as exc:  # transformers and safetensors raise many types for a bad directory
        raise HkdError(f"{role}: could not load the model in {str(path)!r}: {' '.join(str(exc).split())}") from exc
    check_loading_info(info, spec, role, path)
    tokenizer = load_tokenizer(path, spec.trust_remote_code)
    return model, tokenizer


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase | None:
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise HkdError(f"could not load the tokenizer in {str(path)!r}: {exc}") from exc


def check_compatible(teacher: PreTrainedModel, student: PreTrainedModel, teacher_tok: Any, student_tok: Any,
                     cross_tokenizer: dict[str, bool] | None = None) -> None:
    """Most stages compare the two models token by token: the vocabularies must agree.

    ``cross_tokenizer`` maps each stage of the schedule to its ``StageSpec.cross_tokenizer``;
    when every stage handles different tokenizers (the ``uld`` stage) they are allowed, and
    otherwise the error names the stages that need the same tokenizer.
    """
    tv = getattr(teacher.config, "vocab_size", None)
    sv = getattr(student.config, "vocab_size", None)
    problem = None
    if tv != sv:
        problem = f"vocabulary mismatch: teacher has vocab_size {tv}, student has {sv}"
    elif teacher_tok is not None and student_tok is not None and teacher_tok.get_vocab() != student_tok.get_vocab():
        differing = sorted(set(teacher_tok.get_vocab().items()) ^ set(student_tok.get_vocab().items()))[:3]
        problem = f"tokenizer mismatch: teacher and student map tokens differently (e.g. {differing})"
    if problem is None or (cross_tokenizer and all(cross_tokenizer.values())):
        return
    blocking = sorted(name for name, ok in (cross_tokenizer or {}).items() if not ok)
    needs = f"stage(s) {blocking} compare token by token and need" if blocking else "distillation needs"
    raise HkdError(f"{problem}; {needs} the same tokenizer (resize the student's embeddings, pick a student from the "
                   "teacher's family, or distil across tokenizers with stages that handle it: uld)")


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """The teacher never trains: eval mode (no dropout) and no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def num_layers(model: PreTrainedModel) -> int:
    return int(model.config.num_hidden_layers)


def decoder_body(model: PreTrainedModel) -> torch.nn.Module:
    """The transformer without its head: ``model.<base_model_prefix>`` (``model.model`` for Llama/Qwen,
    ``model.gpt_neox`` for GPT-NeoX, ``model.roberta`` for an MLM head), the model itself for bare models."""
    body = getattr(model, model.base_model_prefix, None) if model.base_model_prefix else None
    return body if isinstance(body, torch.nn.Module) else model
