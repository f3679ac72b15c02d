"""Evaluation: pass@k with verifiers, teacher-student agreement, perplexity.

* **pass@k** (Chen et al. 2021): sample ``n`` completions per held-out prompt, count the
  ``c`` that pass every verifier, and average the unbiased estimator
  ``1 - C(n-c, k) / C(n, k)`` over prompts. The ratio of binomials is evaluated as the
  product ``prod_{i=n-c+1..n} (1 - k/i)``, which neither overflows nor loses precision.
* **agreement** on a text set, over target tokens: how often the student's top-1 token is
  the teacher's, and the mean per-token ``KL(teacher || student)`` at temperature 1.
* **perplexity**: ``exp`` of the mean per-token negative log-likelihood of the labels.

``hkd eval CONFIG`` runs what the config asks for, writes JSON and prints a table; the
functions below are the same thing for use from Python.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from hkd.config import (MAX_SEED, DataConfig, ModelConfig, PluginsConfig, apply_overrides, from_dict, ranged,
                        read_yaml)
from hkd.config.load import check_synthetic
from hkd.config.needs import EVAL_NEEDS, check_needs
from hkd.config.outputs import check_output_file, write_text_atomic
from hkd.data.encoding import collate, encode, encode_dataset, read_jsonl
from hkd.data.labels import IGNORE_INDEX, next_token_labels
from hkd.errors import ConfigError, HkdError
from hkd.commands.generate import pick_device
from hkd.train.seeding import derive_seed
from hkd.sampling.verify import VerifierConfig
from hkd.plugin.manager import build_manager
from hkd.models.loading import check_compatible, freeze, load_model
from hkd.sampling.backends import PromptBatch
from hkd.sampling.hf_sampler import sample
from hkd.sampling.verify import Verifier, build_verifier


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)``."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def evaluate_pass_at_k(
    model: PreTrainedModel,
    tokenizer: Any,
    records: list[dict[str, Any]],
    verifiers: Verifier | Sequence[Verifier],
    n: int,
    k: int | Sequence[int] = (1,),
    *,
    prompt_field: str = "prompt",
    temperature: float = 0.8,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
    backend: Any = None,
    chat_template: bool = False,
) -> dict[str, Any]:
    """Sample ``n`` completions per record; a completion is correct when every verifier passes it.

    ``backend``: a generation backend (:mod:`hkd.sampling.backends`) to sample through; ``None`` samples
    ``model`` directly with the built-in KV-cache sampler. A record's prompt is text or a
    conversation; both reach the sampler as token ids rendered as training data renders prompts
    (text in the chat template as a user turn with ``chat_template``).

    Returns ``{"pass@K": mean estimate for each K, "n": n, "prompts": P, "correct": [c per prompt]}``.
    Sampling is seeded per batch of prompts, so the numbers are reproducible.
    """
    checks = [verifiers] if callable(verifiers) else list(verifiers)
    ks = [k] if isinstance(k, int) else list(k)
    for value in ks:
        if not 1 <= value <= n:
            raise ConfigError(f"k: each k must be between 1 and n={n}, got {value}")
    correct: list[int] = []
    starts = range(0, len(records), batch_size)
    for start in tqdm(starts, disable=not progress, unit="batch", desc="pass@k"):
        chunk = records[start: start + batch_size]
        prompts = PromptBatch.from_texts(tokenizer, [r[prompt_field] for r in chunk], chat_template, prompt_field)
        if backend is None:
            samples = sample(model, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, seed=derive_seed(seed, str(start)))
        else:
            from hkd.sampling.backends import SamplingParams

            samples = backend.generate(prompts, SamplingParams(n=n, max_new_tokens=max_new_tokens,
                                                               temperature=temperature, top_p=top_p,
                                                               seed=derive_seed(seed, str(start))))
        for p, record in enumerate(chunk):
            texts = samples.texts[p * n: (p + 1) * n]
            correct.append(sum(all(check(record, text).passed for check in checks) for text in texts))
    result: dict[str, Any] = {f"pass@{value}": sum(pass_at_k(n, c, value) for c in correct) / max(len(correct), 1)
                              for value in ks}
    return result | {"n": n, "prompts": len(correct), "correct": correct}


@torch.no_grad()
def text_metrics(
    student: PreTrainedModel,
    teacher: PreTrainedModel | None,
    encoded: list[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, float]:
    """Perplexity of the student (and teacher), top-1 agreement and mean KL(teacher||student) per target token."""
    if not encoded:
        raise HkdError("the evaluation text set is empty")
    device = next(student.parameters()).device
    totals = {"student_nll": 0.0, "teacher_nll": 0.0, "agree": 0.0, "kl": 0.0, "tokens": 0.0}
    for start in tqdm(range(0, len(encoded), batch_size), disable=not progress, unit="batch", desc="text"):
        batch = {k: v.to(device) for k, v in collate(encoded[start: start + batch_size], pad_id).items()}
        labels = next_token_labels(batch["labels"])
        keep = labels != IGNORE_INDEX
        targets = labels[keep]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        student_logp = student(**inputs).logits[:, :-1][keep].float().log_softmax(-1)  # [N, V]
        totals["student_nll"] -= float(student_logp.gather(-1, targets[:, None]).sum())
        totals["tokens"] += int(keep.sum())
        if teacher is not None:
            teacher_logp = teacher(**inputs).logits[:, :-1][keep].float().log_softmax(-1)
            totals["teacher_nll"] -= float(teacher_logp.gather(-1, targets[:, None]).sum())
            totals["agree"] += float((teacher_logp.argmax(-1) == student_logp.argmax(-1)).sum())
            totals["kl"] += float((teacher_logp.exp() * (teacher_logp - student_logp)).sum())
    tokens = max(totals["tokens"], 1.0)
    metrics = {"perplexity": math.exp(totals["student_nll"] / tokens), "tokens": totals["tokens"]}
    if teacher is not None:
        metrics |= {
            "teacher_perplexity": math.exp(totals["teacher_nll"] / tokens),
            "top1_agreement": totals["agree"] / tokens,
            "kl_teacher_student": totals["kl"] / tokens,
        }
    return metrics


def _encode_texts(tokenizer: Any, texts: Sequence[str | tuple[str, str]], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Plain strings are modelled in full; (prompt, completion) pairs only on the completion."""
    pairs = [("", t) if isinstance(t, str) else t for t in texts]
    return [encode(tokenizer, prompt, completion, max_length) for prompt, completion in pairs]


def perplexity(model: PreTrainedModel, tokenizer: Any, texts: Sequence[str | tuple[str, str]], *,
               max_length: int = 256, batch_size: int = 8) -> float:
    """Perplexity of ``model`` on ``texts``."""
    encoded = _encode_texts(tokenizer, texts, max_length)
    return text_metrics(model, None, encoded, tokenizer.pad_token_id or 0, batch_size)["perplexity"]


def agreement(teacher: PreTrainedModel, student: PreTrainedModel, tokenizer: Any,
              texts: Sequence[str | tuple[str, str]], *, max_length: int = 256, batch_size: int = 8) -> dict[str, float]:
    """Top-1 agreement, mean KL(teacher||student) and both perplexities on ``texts``."""
    encoded = _encode_texts(tokenizer, texts, max_length)
    return text_metrics(student, teacher, encoded, tokenizer.pad_token_id or 0, batch_size)


# --------------------------------------------------------------------------- hkd eval CONFIG


@dataclass
class EvalPromptsConfig:
    """Held-out prompts for pass@k."""

    path: str  # JSONL of held-out prompt records (with their answers for the verifiers)
    prompt_field: str = "prompt"  # field holding the prompt: text, or a conversation (a list of {role, content} messages)
    chat_template: bool = False  # wrap text prompts in the model tokenizer's chat template as a user turn
    on_bad_line: Literal["fail", "skip"] = "fail"  # a malformed JSONL line: stop, naming file and line (fail), or skip it
    n: int = ranged(8, low=1, high=2**16)  # samples per prompt
    k: list[int] = ranged(default_factory=lambda: [1], low=1, high=2**16)  # report pass@k for each k (1 <= k <= n; unbiased estimator)
    temperature: float = ranged(0.8, low=0, high=1e4)  # sampling temperature (0: greedy)
    top_p: float = ranged(1.0, low=0, low_open=True, high=1)  # nucleus sampling (1: off)
    max_new_tokens: int = ranged(64, low=1, high=2**20)  # tokens per completion, at most
    batch_size: int = ranged(8, low=1, high=2**16)  # prompts per sampling call
    seed: int = ranged(0, low=0, high=MAX_SEED, high_open=True)  # sampling seed
    verifiers: list[VerifierConfig] = field(default_factory=list)  # a sample counts as correct when every one passes
    backend: str = "transformers"  # generation backend (hkd_add_generation_backends) the samples come from
    backend_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of its factory

    def validate(self, path: str = "") -> None:
        if not self.verifiers:
            raise ConfigError(f"{path}.verifiers: pass@k needs at least one verifier")
        for value in self.k:
            if not 1 <= value <= self.n:
                raise ConfigError(f"{path}.k: each k must be between 1 and n={self.n}, got {value}")


@dataclass
class EvalConfig:
    model: ModelConfig  # the model under evaluation, usually a distilled student (runs/NAME/final)
    output: str  # JSON results
    teacher: ModelConfig | None = None  # enables agreement metrics on the text set
    prompts: EvalPromptsConfig | None = None  # pass@k
    text: DataConfig | None = None  # perplexity (and agreement) on these records
    text_seed: int = ranged(1, low=0, high=MAX_SEED, high_open=True)  # synthetic text: a seed other than training's (train.seed, default 0) gives other problems
    device: str = "auto"  # auto: cuda if available, else cpu; or cpu, cuda, cuda:N, mps
    progress: bool = True  # a progress bar (plain lines when the output is not a terminal)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)  # plugins switched off (plugins.disable)

    def validate(self, path: str = "") -> None:
        from hkd.config import check_device

        check_device(self.device, "device")  # a typo or a missing GPU is named before any model loads
        if self.prompts is None and self.text is None:
            raise ConfigError("eval: set prompts (pass@k) and/or text (perplexity, agreement)")


def load_eval_config(path: str | Path, overrides: list[str] = ()) -> EvalConfig:  # type: ignore[assignment]
    """Read YAML + ``--a.b=value`` overrides; paths in the file are relative to the file."""
    config = from_dict(EvalConfig, apply_overrides(read_yaml(path), list(overrides)))
    base = Path(path).resolve().parent
    config.output = str(base / config.output)
    for spec in (config.model, config.teacher):
        if spec is not None and spec.path is not None:
            spec.path = str(base / spec.path)
    if config.prompts is not None:
        config.prompts.path = str(base / config.prompts.path)
    if config.text is not None and config.text.path is not None:
        config.text.path = str(base / config.text.path)
    if config.text is not None and config.text.kind in ("jsonl", "hf") and not config.text.path:
        raise ConfigError(f"text.path: required when text.kind is {config.text.kind!r}")
    if config.text is not None:
        check_synthetic(config.text, "text")
    check_needs(config, EVAL_NEEDS)  # options that act only with another (hkd/config/needs.py)
    return config


def is_eval_results(path: Path) -> bool:
    """An existing file is an earlier ``hkd eval`` result (a small JSON mapping of its sections), which may be replaced."""
    if path.stat().st_size > 1 << 24:
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and bool(data) and set(data) <= {"pass_at_k", "text"}


def check_eval_output(path: str | Path, flag: str = "output") -> Path:
    """Where ``hkd eval`` writes its JSON, checked before any model loads (:mod:`hkd.config.outputs`)."""
    return check_output_file(path, flag, "eval", owner=is_eval_results)


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """Everything the config asks for; the results are also written to ``config.output``."""
    output = check_eval_output(config.output)  # before any work
    output.parent.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device)
    model, tokenizer = load_model(config.model, "model", output.parent)
    freeze(model).to(device)  # type: ignore[arg-type]
    if tokenizer is None:
        raise HkdError("model: the model directory has no tokenizer")
    results: dict[str, Any] = {}
    if config.prompts is not None:
        p = config.prompts
        pm = build_manager(config.plugins.disable)
        verifiers = [build_verifier(pm, v.name, v.options, f"prompts.verifiers[{i}]") for i, v in enumerate(p.verifiers)]
        records = read_jsonl(p.path, p.on_bad_line, (p.prompt_field,), conversations={p.prompt_field: False})
        from hkd.sampling.backends import GenerationContext, build_generation_backend

        backend = build_generation_backend(pm, p.backend, GenerationContext(
            "student", tokenizer, model, config.model.path, device, "prompts.backend"), p.backend_options)
        results["pass_at_k"] = evaluate_pass_at_k(
            model, tokenizer, records, verifiers, p.n, p.k, prompt_field=p.prompt_field, temperature=p.temperature,
            top_p=p.top_p, max_new_tokens=p.max_new_tokens, batch_size=p.batch_size, seed=p.seed,
            progress=config.progress, backend=backend, chat_template=p.chat_template)
    if config.text is not None:
        teacher = None
        if config.teacher is not None:
            teacher, teacher_tok = load_model(config.teacher, "teacher", output.parent)
            check_compatible(teacher, model, teacher_tok, tokenizer)  # agreement compares token by token
            freeze(teacher).to(device)  # type: ignore[arg-type]
        encoded = encode_dataset(tokenizer, config.text, config.text_seed)
        results["text"] = text_metrics(model, teacher, encoded, tokenizer.pad_token_id or 0,
                                       config.text.batch_size, config.progress)
    write_text_atomic(output, json.dumps(results, indent=1))
    return results


def result_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric, value) rows for the printed table."""
    rows = []
    for name, value in results.get("pass_at_k", {}).items():
        if name.startswith("pass@"):
            rows.append((name, f"{value:.4f}"))
    if "pass_at_k" in results:
        rows.append(("prompts x samples", f"{results['pass_at_k']['prompts']} x {results['pass_at_k']['n']}"))
    for name, value in results.get("text", {}).items():
        rows.append((name, f"{value:.0f}" if name == "tokens" else f"{value:.4f}"))
    return rows
