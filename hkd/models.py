"""Loading teacher and student from local Hugging Face directories, and tiny presets.

Presets exist so tests and demos need no downloads: ``write_preset`` saves a randomly
initialised tiny model plus a character-level tokenizer to a directory, and from then on
the ordinary ``from_pretrained`` path loads it, exactly as it would a real checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
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

from hkd.config import ModelConfig
from hkd.errors import HkdError

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


def build_preset(name: str, overrides: dict[str, Any] | None = None, seed: int = 0) -> PreTrainedModel:
    if name not in PRESETS:
        raise HkdError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    config_cls, defaults = PRESETS[name]
    tokenizer = char_tokenizer()
    fields = {
        **defaults,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **(overrides or {}),
    }
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
    char_tokenizer().save_pretrained(out)
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
    kwargs: dict[str, Any] = {
        "trust_remote_code": spec.trust_remote_code,
        "use_safetensors": not spec.allow_pickle or any(path.glob("*.safetensors")),
        "dtype": getattr(torch, spec.dtype),
    }
    loader = AutoModel if spec.encoder else AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
        model = loader.from_pretrained(path, config=config, **kwargs)
    except (OSError, ValueError) as exc:
        raise HkdError(f"{role}: could not load the model in {str(path)!r}: {exc}") from exc
    tokenizer = load_tokenizer(path, spec.trust_remote_code)
    return model, tokenizer


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase | None:
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise HkdError(f"could not load the tokenizer in {str(path)!r}: {exc}") from exc


def check_compatible(teacher: PreTrainedModel, student: PreTrainedModel, teacher_tok: Any, student_tok: Any) -> None:
    """Logit distillation compares distributions token by token: the vocabularies must agree."""
    tv = getattr(teacher.config, "vocab_size", None)
    sv = getattr(student.config, "vocab_size", None)
    if tv != sv:
        raise HkdError(
            f"vocabulary mismatch: teacher has vocab_size {tv}, student has {sv}; distillation needs the "
            "same tokenizer (resize the student's embeddings or pick a student from the teacher's family)"
        )
    if teacher_tok is not None and student_tok is not None and teacher_tok.get_vocab() != student_tok.get_vocab():
        differing = sorted(set(teacher_tok.get_vocab().items()) ^ set(student_tok.get_vocab().items()))[:3]
        raise HkdError(f"tokenizer mismatch: teacher and student map tokens differently (e.g. {differing})")


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """The teacher never trains: eval mode (no dropout) and no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def num_layers(model: PreTrainedModel) -> int:
    return int(model.config.num_hidden_layers)


def decoder_body(model: PreTrainedModel) -> torch.nn.Module:
    """The transformer without its LM head (``model.model`` for Llama/Qwen, the model itself for encoders)."""
    return model.get_decoder() if hasattr(model, "get_decoder") and hasattr(model, "lm_head") else model
