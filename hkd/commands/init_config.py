"""``hkd init-config``: an annotated starter config for a teacher/student pair.

Reads the two models' ``config.json`` (no weights are loaded) and writes a YAML config
whose comments explain each choice: which student layer learns from which teacher layer,
how attention is compared when head counts differ, whether hidden states need projectors,
and whether the vocabulary is large enough to want the fused LM-head loss. The text is
checked with the same loader ``hkd distill`` uses before it is written, so a starter
config always loads.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hkd.config.outputs import check_output_file, write_text_atomic
from hkd.errors import HkdError
from hkd.models.layermap import build_layer_map
from hkd.models.loading import is_encoder_config

FUSED_VOCAB = 32_000  # above this the [tokens, vocab] logits dominate memory; fuse the LM head into the loss


@dataclass(frozen=True)
class ModelShape:
    """The facts about a model that decide a distillation config."""

    path: Path
    model_type: str
    layers: int
    width: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    encoder: bool

    def describe(self) -> str:
        kv = f", {self.kv_heads} kv head{'s' * (self.kv_heads > 1)}" if self.kv_heads != self.heads else ""
        return f"{self.model_type}: {self.layers} layers, width {self.width}, {self.heads} heads{kv}, vocab {self.vocab}"


def read_shape(model_dir: str | Path, role: str) -> ModelShape:
    """Read ``config.json`` of a local Hugging Face model directory."""
    path = Path(model_dir)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise HkdError(f"init-config: --{role} {str(path)!r} has no config.json (expected a Hugging Face model directory)")
    try:
        cfg: dict[str, Any] = json.loads(config_path.read_text())
        heads = int(cfg["num_attention_heads"])
        width = int(cfg["hidden_size"])
        return ModelShape(
            path=path.resolve(), model_type=str(cfg.get("model_type", "?")), layers=int(cfg["num_hidden_layers"]),
            width=width, heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or width // heads), vocab=int(cfg["vocab_size"]),
            encoder=is_encoder_config(cfg),  # the same test hkd distill applies before loading
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise HkdError(f"init-config: {config_path}: cannot read the model shape ({exc!r})") from exc


MAX_RELATION_HEADS = 64  # MiniLMv2: 48 relation heads for base-size teachers, 64 for large ones
MIN_RELATION_DIM = 8  # MiniLMv2's 384-wide students split q/k/v into 48 relation heads of 8


def relation_heads(teacher: ModelShape, student: ModelShape) -> int:
    """The most relation heads dividing every q/k/v width of both models, each at least MIN_RELATION_DIM wide.

    Not capped at either model's attention-head count: MiniLMv2 uses many more relation heads
    than attention heads (48 for a 12-head BERT-base teacher), since relation heads are only a
    split of the concatenated q/k/v vectors.
    """
    widths = [m.heads * m.head_dim for m in (teacher, student)] + [m.kv_heads * m.head_dim for m in (teacher, student)]
    common = math.gcd(*widths)
    limit = max(1, min(MAX_RELATION_HEADS, min(widths) // MIN_RELATION_DIM))
    return max(r for r in range(1, limit + 1) if common % r == 0)


def model_path(model: ModelShape, out_dir: Path | None) -> str:
    """Relative to the config file where possible, so a project folder can move as a whole; absolute when the
    text goes to stdout (``out_dir`` None), where no file's location is known."""
    if out_dir is None:
        return str(model.path)
    try:
        return os.path.relpath(model.path, out_dir.resolve())
    except ValueError:  # another drive on Windows
        return str(model.path)


def attention_block(teacher: ModelShape, student: ModelShape) -> tuple[str, str]:
    """(comment, YAML body) for the structural stage."""
    if teacher.heads == student.heads:
        return (f"# Both models have {teacher.heads} attention heads: match each head's attention map (TinyBERT).",
                "{mode: maps, heads: per_head, log_layers: false}")
    r = relation_heads(teacher, student)
    return (f"# Head counts differ (teacher {teacher.heads}, student {student.heads}): compare q/k/v self-relations\n"
            f"# split into {r} relation heads (MiniLMv2), which works for any head count and GQA; {r} divides\n"
            "# every q/k/v width of both models. Alternative: {mode: maps, heads: average}.",
            f"{{mode: relations, relation_heads: {r}, log_layers: false}}")


def hidden_block(teacher: ModelShape, student: ModelShape) -> tuple[str, str]:
    if teacher.width == student.width:
        why = f"# Equal widths ({teacher.width}): hidden states are compared directly, no projector."
    else:
        why = (f"# Widths differ (student {student.width} -> teacher {teacher.width}): each mapped pair gets a\n"
               "# learned linear projector (trained with the student, saved in checkpoints).")
    why += ("\n# include_embeddings: false leaves the embedding output (layer 0) unmapped. Mapping it halved\n"
            "# nearest-neighbour agreement for a random encoder student and cost a cut one 0.002 Spearman\n"
            "# (bench/quality_encoder.py, docs/benchmarks.md \"Encoder quality\"); the demo's recipe leaves it out too.")
    if student.encoder:
        why += ("\n# nmse: squared error over the teacher layer's mean squared norm, so every mapped layer\n"
                "# weighs the same (1.0 = predicting zeros) whatever its scale.")
        return why, "{loss: nmse, projector: auto, include_embeddings: false, log_layers: false}"
    return why, "{loss: mse, projector: auto, include_embeddings: false, log_layers: false}"


def starter_config(teacher_dir: str | Path, student_dir: str | Path, out_dir: Path | None) -> str:
    """The annotated YAML text for distilling ``teacher_dir`` into ``student_dir``, to be saved in ``out_dir``
    (None: printed, with absolute model paths)."""
    teacher, student = read_shape(teacher_dir, "teacher"), read_shape(student_dir, "student")
    if teacher.vocab != student.vocab:
        raise HkdError(f"init-config: vocabulary sizes differ (teacher {teacher.vocab}, student {student.vocab}); "
                       "distillation needs a shared tokenizer (pick a student from the teacher's family)")
    if teacher.encoder != student.encoder:
        raise HkdError("init-config: one model is an encoder and the other a causal LM; pick two of the same kind")
    layer_map = build_layer_map("uniform", student.layers, teacher.layers)
    pairs = ", ".join(f"{s}->{t}" for s, t in layer_map)
    deeper = ("" if student.layers <= teacher.layers else
              "\n#   The student is deeper than the teacher: several student layers share a teacher layer.")
    attention_why, attention = attention_block(teacher, student)
    hidden_why, hidden = hidden_block(teacher, student)
    encoder_flag = "\n  encoder: true" if student.encoder else ""
    lines = [
        "# Starter config written by `hkd init-config`. Edit freely; run with:",
        "#   hkd distill THIS_FILE --out runs/NAME        (then: hkd report runs/NAME)",
        f"# teacher  {teacher.describe()}",
        f"# student  {student.describe()}",
        "teacher:",
        f"  path: {model_path(teacher, out_dir)}{encoder_flag}",
        "student:",
        f"  path: {model_path(student, out_dir)}{encoder_flag}",
        "",
    ]
    if student.encoder:
        lines += [
            "# Training text: one JSON object per line with a \"text\" field (sentences or passages of the",
            "# domain the encoder will embed); the path is relative to this file. Each text is encoded",
            "# with the tokenizer's own special tokens ([CLS] text [SEP] for BERT).",
            "data: {kind: jsonl, path: data.jsonl, text_field: text, batch_size: 16, max_length: 128}",
            "",
            "# One feature phase: every mapped hidden state, normalised MSE (loss: nmse). Chosen by",
            "# bench/quality_encoder.py (docs/benchmarks.md, \"Encoder quality\"): all-MiniLM-L6-v2 into a",
            "# 3-block student cut from it, 60 steps, 3 data orders; it beat last-layer-only alignment and",
            "# the progressive structure -> feature schedule by more than the seed spread; for a random",
            "# 3x192 student it also beat last-layer-only on Spearman (200 and 600 steps, a random",
            "# student in the same section). The sentence stage ties it on a cut student. To add attention transfer, put",
            "# {attention: 0.5} in the phase (stages.attention below is ready).",
            "# (No temperature: encoders have no logits stage.)",
            "schedule:",
            "  phases:",
            "    - {name: feature, steps: 1000, stages: {hidden: 1.0}}",
        ]
    else:
        lines += [
            "# Training text. synthetic = generated arithmetic with worked solutions, handy for a first run.",
            "# For your own data: {kind: jsonl, path: data.jsonl, text_field: text}, or prompt_field +",
            "# completion_field to put the loss on completions only.",
            "data: {kind: synthetic, num_examples: 4096, batch_size: 8, max_length: 256}",
            "",
            "# Progressive schedule: structure (attention) -> feature (hidden states) -> decision, with the",
            "# logits loss on from the first step. Chosen by bench/hard_task.py (docs/benchmarks.md, \"Hard task: budget",
            "# curves\"; python bench/hard_task.py --points 100 200 300 400 500 570 600, 5 seeds): of the",
            "# recipes without RL it had the highest mean pass@1 at every budget from 300 steps (570 steps:",
            "# 0.995 +- 0.006, against 0.968 +- 0.045 with logits only in the decision phase; 600 steps:",
            "# 0.997 +- 0.003, hidden -> logits 0.983 +- 0.012), as on the demo task (bench/quality.py, 800",
            "# steps: 0.988 vs 0.972).",
            "# Stage weights ramp linearly between phases over ramp_steps; the temperature softens the",
            "# teacher's distribution early and anneals to 1.",
            "schedule:",
            "  ramp_steps: 50",
            "  temperature: {kind: cosine, start: 2.0, end: 1.0}",
            "  phases:",
            "    - {name: structure, steps: 300, stages: {attention: 1.0, logits: 1.0}}",
        ]
    if not student.encoder:
        lines += ["    - {name: feature,   steps: 300, stages: {attention: 0.5, hidden: 1.0, logits: 1.0}}",
                  "    - {name: decision,  steps: 400, stages: {hidden: 0.5, logits: 1.0}}"]
    lines += [
        "",
        "# Layer map (uniform, TinyBERT): student block s learns from teacher block round(s * "
        f"{teacher.layers} / {student.layers}):",
        f"#   student->teacher: {pairs}{deeper}",
        "# To choose pairs yourself: layer_map: {strategy: explicit, pairs: [[1, 2], [2, 4]]}.",
        "# log_layers: true logs each pair's loss; `hkd report` then draws teacher x student heatmaps.",
        "stages:",
        *(f"  {line}" for line in attention_why.splitlines()),
        f"  attention: {attention}",
        *(f"  {line}" for line in hidden_why.splitlines()),
        f"  hidden: {hidden}",
    ]
    if not student.encoder:
        fused = "true" if teacher.vocab >= FUSED_VOCAB else "false"
        reason = (f"vocab {teacher.vocab} >= {FUSED_VOCAB}: fuse the LM head into the loss so no [tokens, vocab]"
                  " logits tensor is built" if fused == "true" else
                  f"vocab {teacher.vocab} is small: plain logits are cheap (fused: true saves memory on big vocabularies)")
        lines += [
            "  # Forward KL to the teacher's tempered distribution, plus 0.2 x cross-entropy on the data;",
            f"  # {reason}.",
            f"  logits: {{divergence: forward_kl, alpha: 0.2, fused: {fused}}}",
        ]
    lines += [
        "",
        "# AdamW with warmup then cosine decay to lr * min_lr_ratio; grad_accum multiplies the batch.",
        "optim: {lr: 3.0e-4, warmup_steps: 50, grad_accum: 1, grad_clip: 1.0}",
        "train: {seed: 0, checkpoint_every: 250, keep_checkpoints: 2}",
        "# Add tensorboard or wandb (pip install tensorboard / wandb) to also log there.",
        "logging: {backends: [jsonl]}",
    ]
    text = "\n".join(lines) + "\n"
    check(text, out_dir)
    return text


def check(text: str, out_dir: Path | None) -> None:
    """Refuse to write a config ``hkd distill`` would reject (a bug here, never the user's)."""
    from hkd.config import Config, from_dict, validate

    raw = yaml.safe_load(text)
    for role in ("teacher", "student"):  # paths are relative to the file, as load_config resolves them
        raw[role]["path"] = str((out_dir or Path.cwd()) / raw[role]["path"])
    validate(from_dict(Config, raw))


def write_starter_config(teacher_dir: str | Path, student_dir: str | Path, out: str | Path) -> Path:
    """Write the starter config to ``out`` (refusing to overwrite an existing file)."""
    target = Path(out)
    if target.is_file():
        raise HkdError(f"--out: {str(target)!r} already exists; choose another --out or remove it")
    check_output_file(target, "--out", "init-config", example="distill.yaml")  # a directory, a path below a file
    text = starter_config(teacher_dir, student_dir, target.parent)
    write_text_atomic(target, text)
    return target
