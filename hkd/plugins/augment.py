"""Built-in prompt transforms (augmentation): new operands for templated arithmetic, and
TinyBERT-style word replacement proposed by a masked-LM teacher.

* ``arith_operands``: a prompt of the arithmetic task (``A+B=``, :mod:`hkd.tasks.arith`) gets
  new operands with the same number of digits each. The variant's answer is computed
  (``with_answer: true``, the default), so it is verified like any labelled prompt; with
  ``with_answer: false`` the answer is dropped and pseudo-labelling supplies one. ``exclude``
  names a JSONL file whose prompts are never produced (keep the evaluation split out of the
  training data). Prompts that are not of that form get no variants.
* ``mlm_replace`` (TinyBERT's data augmentation, Jiao et al. 2020, for encoder text): each
  whitespace-separated word that the masked-LM's tokenizer keeps as one piece is, with
  probability ``replace_prob``, masked in the original sentence; the masked-LM (``model``, a
  directory; by default the teacher, which must then be a ``*ForMaskedLM``) ranks the
  vocabulary at that position and the word becomes one of the ``candidates`` most likely
  whole-word tokens other than itself, drawn uniformly. Words of several pieces stay as they
  are (TinyBERT replaces them with GloVe neighbours; hkd has no word vectors). Other fields
  (a classification label) are kept, as in TinyBERT. Words are re-joined with single spaces.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from hkd import hookimpl
from hkd import PromptTransform, PromptTransformSpec, TransformContext
from hkd import ConfigError, HkdError
from hkd.tasks.arith import Problem

ARITH_PROMPT = re.compile(r"(\d+)\+(\d+)=")


def _random_operand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def arith_operands(context: TransformContext, with_answer: bool = True, exclude: str | None = None) -> PromptTransform:
    """Variants of ``A+B=`` with fresh operands of the same digit counts."""
    excluded: set[str] = set()
    if exclude is not None:
        from hkd import read_jsonl

        path = Path(exclude) if Path(exclude).is_absolute() else context.base_dir / exclude
        if not path.is_file():
            raise ConfigError(f"{context.where}.options.exclude: file {str(path)!r} does not exist")
        excluded = {str(r[context.prompt_field]) for r in read_jsonl(path, "fail", (context.prompt_field,))}

    def transform(record: dict[str, Any], rng: random.Random, count: int) -> list[dict[str, Any]]:
        match = ARITH_PROMPT.fullmatch(str(record[context.prompt_field]).strip())
        if match is None:
            return []
        da, db = len(match.group(1)), len(match.group(2))
        seen = {match.group(0)} | excluded
        out: list[dict[str, Any]] = []
        for _ in range(20 * count):  # rejection sampling; a tiny operand space may hold fewer than count
            if len(out) == count:
                break
            problem = Problem(_random_operand(rng, da), _random_operand(rng, db))
            if problem.prompt in seen:
                continue
            seen.add(problem.prompt)
            variant = {**record, context.prompt_field: problem.prompt}
            if with_answer:
                variant[context.answer_field] = problem.answer
            else:
                variant.pop(context.answer_field, None)
            out.append(variant)
        return out

    return transform


class MlmReplace:
    """TinyBERT-style replacement: the masked-LM proposes whole-word tokens for masked words."""

    def __init__(self, context: TransformContext, model: str | None = None, replace_prob: float = 0.4, candidates: int = 15,
                 field: str | None = None, max_words: int = 128) -> None:
        if not 0 <= replace_prob <= 1:
            raise ConfigError(f"{context.where}.options.replace_prob: must be in [0, 1], got {replace_prob}")
        if candidates < 1:
            raise ConfigError(f"{context.where}.options.candidates: must be >= 1, got {candidates}")
        import torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        if model is None and context.teacher_path is None:
            raise ConfigError(f"{context.where}.options.model: name the masked-LM directory (there is no teacher)")
        path = context.teacher_path if model is None else Path(model) if Path(model).is_absolute() \
            else context.base_dir / model
        assert path is not None
        if not (path / "config.json").is_file():
            raise ConfigError(f"{context.where}.options.model: {str(path)!r} is not a model directory (no config.json)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForMaskedLM.from_pretrained(path).eval()
        except Exception as exc:  # transformers raises many types for a directory that is not a masked-LM
            raise HkdError(f"{context.where}.options.model: could not load a masked-LM from {str(path)!r}: "
                           f"{' '.join(str(exc).split())}") from exc
        if self.tokenizer.mask_token_id is None:
            raise ConfigError(f"{context.where}.options.model: the tokenizer in {str(path)!r} has no mask token")
        if context.device is not None:
            self.model.to(context.device)
        self.field = field or context.prompt_field
        self.replace_prob, self.candidates, self.max_words = replace_prob, candidates, max_words
        vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        special = set(self.tokenizer.all_special_ids)
        # whole-word tokens only: a "##" continuation or a special token cannot stand for a word
        self.allowed = torch.tensor([i not in special and not str(t).startswith("##") for i, t in enumerate(vocab)],
                                    device=next(self.model.parameters()).device)
        self.cache: dict[str, list[list[int] | None]] = {}

    def proposals(self, words: list[str]) -> list[list[int] | None]:
        """Per word: the top whole-word token ids at its masked position (None: several pieces)."""
        import torch

        key = "\x1f".join(words)
        if key in self.cache:
            return self.cache[key]
        pieces = [self.tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
        ids = [self.tokenizer.cls_token_id] + [p for ps in pieces for p in ps] + [self.tokenizer.sep_token_id]
        starts, offset = [], 1
        for ps in pieces:
            starts.append(offset)
            offset += len(ps)
        single = [i for i, ps in enumerate(pieces) if len(ps) == 1]
        out: list[list[int] | None] = [None] * len(words)
        if single:
            device = next(self.model.parameters()).device
            batch = torch.tensor([ids] * len(single), device=device)
            rows = torch.arange(len(single), device=device)
            cols = torch.tensor([starts[i] for i in single], device=device)
            batch[rows, cols] = self.tokenizer.mask_token_id  # one masked word per row, the rest original
            with torch.no_grad():
                logits = self.model(input_ids=batch).logits[rows, cols].float()
            logits[:, ~self.allowed.to(device)] = float("-inf")
            logits[rows, batch.new_tensor([pieces[i][0] for i in single])] = float("-inf")  # never the word itself
            top = logits.topk(min(self.candidates, int(self.allowed.sum()) - 1), -1).indices.tolist()
            for row, i in enumerate(single):
                out[i] = top[row]
        self.cache = {key: out}  # variants of one record are asked for together
        return out

    def __call__(self, record: dict[str, Any], rng: random.Random, count: int) -> list[dict[str, Any]]:
        text = record.get(self.field)
        if not isinstance(text, str):
            raise HkdError(f"mlm_replace: the record has no text field {self.field!r}")
        words = text.split()[: self.max_words]
        if not words:
            return []
        proposals = self.proposals(words)
        out = []
        for _ in range(count):
            new: list[str] = [str(self.tokenizer.convert_ids_to_tokens(rng.choice(options)))
                   if options and rng.random() < self.replace_prob else word
                   for word, options in zip(words, proposals)]
            if new != words:
                out.append({**record, self.field: " ".join(new + text.split()[self.max_words:])})
        return out


@hookimpl
def hkd_add_prompt_transforms() -> list[PromptTransformSpec]:
    return [
        PromptTransformSpec("arith_operands", arith_operands, "arithmetic prompts A+B= with new operands (answer computed)"),
        PromptTransformSpec("mlm_replace", MlmReplace, "TinyBERT word replacement proposed by a masked-LM (encoder text)"),
    ]
