"""One small run configuration per built-in stage (and per teacher setup), shared by the precision,
device-discipline and distributed tests: each runs a few steps of the real loop."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from tests.conftest import BASE_CONFIG

TEXTS = ["the teacher model encodes each sentence into hidden states", "a smaller student learns",
         "knowledge distillation transfers what a large network has learned into a compact one",
         "similar sentences get similar vectors"]
BERT_STUDENT = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
OTHER_TEACHER = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2}

# scenario -> (stages of its one phase, stages.* options, what else differs from the base config)
SCENARIOS: dict[str, tuple[dict[str, float], dict[str, Any], dict[str, Any]]] = {
    "logits": ({"logits": 1.0}, {"logits": {"alpha": 0.2}}, {}),
    "logits_fused": ({"logits": 1.0}, {"logits": {"alpha": 0.2, "fused": True}}, {}),
    "hidden": ({"hidden": 1.0}, {"hidden": {"include_embeddings": True}}, {}),
    "attention": ({"attention": 1.0}, {}, {}),
    "attention_relations": ({"attention": 1.0}, {"attention": {"mode": "relations", "relation_heads": 2}}, {}),
    "uld": ({"uld": 1.0}, {"uld": {"alpha": 0.2}}, {}),
    "sft": ({"sft": 1.0}, {}, {}),
    "onpolicy": ({"onpolicy": 1.0}, {"onpolicy": {"lmbda": 0.5, "max_new_tokens": 6}}, {}),
    "onpolicy_refresh": ({"onpolicy": 1.0}, {"onpolicy": {"lmbda": 1.0, "max_new_tokens": 6, "refresh_every": 2}},
                         {}),
    "rl": ({"rl": 1.0}, {"rl": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 6,
                                "kl_weight": 0.1}}, {}),
    "teachers": ({"logits": 1.0, "hidden": 0.5}, {"logits": {"teachers": "mixture"}},
                 {"teachers": [{"preset": "tiny-llama", "preset_overrides": OTHER_TEACHER, "seed": 7,
                                "weight": 2.0}]}),
    "teacher_cache": ({"logits": 1.0, "hidden": 0.5}, {}, {"cache": True}),
    "sentence": ({"sentence": 1.0, "hidden": 0.5}, {"sentence": {"similarity": 0.5}}, {"encoder": "bert"}),
    "mlm": ({"mlm": 1.0}, {"mlm": {"alpha": 0.5}}, {"encoder": "mlm"}),
}


def mlm_model_dirs(root: Path) -> dict[str, Path]:
    """A BertForMaskedLM teacher and student (the mlm stage's models) written to ``root``."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from hkd.models.loading import wordpiece_tokenizer

    tok = wordpiece_tokenizer()
    dirs = {}
    for role, width, layers, seed in (("teacher", 48, 2, 1), ("student", 32, 1, 2)):
        if not (root / role / "config.json").is_file():
            # no dropout: a run then does not depend on how its micro-batches are spread over ranks
            config = BertConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                                num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=64,
                                pad_token_id=tok.pad_token_id, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0,
                                # FSDP refuses a student whose head is tied to its embeddings (fsdp_refusal)
                                tie_word_embeddings=role == "teacher")
            torch.manual_seed(seed)
            BertForMaskedLM(config).save_pretrained(root / role, safe_serialization=True)
            tok.save_pretrained(root / role)
        dirs[role] = root / role
    return dirs


def scenario_config(name: str, root: Path, steps: int = 3, grad_accum: int = 2, **train: Any) -> dict[str, Any]:
    """The raw config of scenario ``name``: one phase of ``steps`` steps; files it needs go under ``root``
    (a teacher_cache is built there on first use)."""
    stages, options, extra = SCENARIOS[name]
    raw = copy.deepcopy(BASE_CONFIG)
    raw["schedule"] = {"ramp_steps": 0, "phases": [{"name": "p", "steps": steps, "stages": dict(stages)}]}
    raw["stages"] = copy.deepcopy(options)
    raw["optim"] = {"lr": 1e-3, "grad_accum": grad_accum}
    raw["train"] = {"progress": False, **train}
    raw["data"]["num_examples"] = 16
    encoder = extra.get("encoder")
    if encoder:
        data = root / "text.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 4))
        raw["data"] = {"kind": "jsonl", "path": str(data), "text_field": "text", "batch_size": 2, "max_length": 20}
        if encoder == "mlm":
            dirs = mlm_model_dirs(root / "mlm-models")
            raw["teacher"] = {"path": str(dirs["teacher"]), "encoder": True}
            raw["student"] = {"path": str(dirs["student"]), "encoder": True}
        else:
            raw["teacher"] = {"preset": "tiny-bert", "preset_overrides": {"num_hidden_layers": 2}, "encoder": True,
                              "seed": 1}
            raw["student"] = {"preset": "tiny-bert", "preset_overrides": BERT_STUDENT, "encoder": True, "seed": 2}
    if "teachers" in extra:
        raw["teachers"] = copy.deepcopy(extra["teachers"])
    if extra.get("cache"):
        cache = root / "cache"
        if not (cache / "index.json").is_file():
            from hkd.config import Config, from_dict
            from hkd.teachers.cache import build_cache

            build_cache(from_dict(Config, copy.deepcopy(raw)), cache, top_k=16, examples_per_shard=5,
                        progress=False, work_dir=root / "cache-work")
        raw["teacher_cache"] = str(cache)
        raw["teacher"] = {"path": str(root / "cache-work" / "models" / "teacher")}
    return raw


# several stages in one run, phase after phase (2 steps each), for the distributed tests: one torchrun
# launch covers them all. name -> (phases: (phase name, stage weights), stages.* options, scenario for the models)
SUITES: dict[str, tuple[list[tuple[str, dict[str, float]]], dict[str, Any], str]] = {
    "decoder": ([("fused", {"logits": 1.0, "hidden": 0.5}), ("onpolicy", {"onpolicy": 1.0}), ("uld", {"uld": 1.0}),
                 ("rl", {"rl": 1.0})],
                {"logits": {"alpha": 0.2, "fused": True}, "hidden": {"include_embeddings": True},
                 "onpolicy": {"lmbda": 1.0, "max_new_tokens": 6, "refresh_every": 2},
                 "rl": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 6, "kl_weight": 0.1},
                 "uld": {"alpha": 0.2}}, "logits"),
    "teachers": ([("mixed", {"logits": 1.0, "hidden": 0.5, "attention": 0.5})], {"logits": {"teachers": "mixture"}},
                 "teachers"),
    "encoder": ([("pooled", {"sentence": 1.0, "hidden": 0.5}), ("masked", {"mlm": 1.0})],
                {"sentence": {"similarity": 0.5}, "mlm": {"alpha": 0.5}}, "mlm"),
}


def suite_config(name: str, root: Path, steps: int = 2, **train: Any) -> dict[str, Any]:
    """The raw config of suite ``name``: its phases one after another, ``steps`` steps each."""
    phases, options, models = SUITES[name]
    raw = scenario_config(models, root, grad_accum=1, **train)
    raw["schedule"]["phases"] = [{"name": phase, "steps": steps, "stages": dict(stages)} for phase, stages in phases]
    raw["stages"] = copy.deepcopy(options)
    return raw
