"""Augmentation: prompt transforms as plugins; arithmetic operand variation (answers computed,
verified like any prompt), TinyBERT-style masked-LM word replacement against a reference
forward, provenance, and resume of augmented generate runs."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

import hkd.commands.generate as gen
import hkd.sampling.hf_sampler as sampling
from hkd.sampling.augment import TransformConfig, TransformContext, build_prompt_transform
from hkd.config import from_dict
from hkd.errors import ConfigError, HkdError
from hkd.commands.generate import GenerateConfig, generate
from hkd.plugin.manager import build_manager
from hkd.models.loading import wordpiece_tokenizer
from hkd.tasks.arith import Problem, make_problems
from tests.fakes import crash_after, scripted
from tests.test_docs import example


def context(tmp_path: Path, **changes) -> TransformContext:
    return TransformContext(**({"prompt_field": "prompt", "answer_field": "answer", "base_dir": tmp_path} | changes))


def test_arith_operands_keeps_digit_counts_computes_answers_and_avoids_excluded(tmp_path):
    excluded = tmp_path / "eval.jsonl"
    excluded.write_text("".join(json.dumps({"prompt": f"{a}+7="}) + "\n" for a in range(10, 100) if a % 2))
    pm = build_manager()
    transform = build_prompt_transform(pm, TransformConfig("arith_operands", options={"exclude": "eval.jsonl"}),
                                       context(tmp_path))
    record = {"id": "q", "prompt": "12+7=", "answer": "19", "source": "x"}
    variants = transform(record, random.Random(0), 30)
    assert len(variants) == 30 and len({v["prompt"] for v in variants}) == 30
    for v in variants:
        a, b = map(int, v["prompt"].rstrip("=").split("+"))
        assert 10 <= a <= 99 and 0 <= b <= 9 and v["answer"] == str(a + b) and v["source"] == "x"
        assert a % 2 == 0 or b != 7  # never an excluded (evaluation) prompt
        assert v["prompt"] != "12+7="
    assert transform(record, random.Random(0), 30) == variants  # the rng alone decides
    assert transform({"prompt": "what is 2+2?"}, random.Random(0), 3) == []  # not the template: no variants
    assert transform({"prompt": "1+2="}, random.Random(0), 200).__len__() == 99  # only 99 other 1-digit pairs
    unlabelled = build_prompt_transform(pm, TransformConfig("arith_operands", options={"with_answer": False}),
                                        context(tmp_path))
    assert all("answer" not in v for v in unlabelled(record, random.Random(1), 3))


def test_the_docs_transform_example_runs_as_a_plugin(tmp_path):
    pm = build_manager(extra_plugins=[("swap", example("hkd_add_prompt_transforms"))])
    swap = build_prompt_transform(pm, TransformConfig("swap_operands"), context(tmp_path))
    assert swap({"prompt": "12+7=", "answer": "19"}, random.Random(0), 1) == [{"prompt": "7+12=", "answer": "19"}]


def test_unknown_transforms_and_bad_options_are_named(tmp_path):
    pm = build_manager()
    with pytest.raises(ConfigError, match=r"augment\[0\].name: unknown prompt transform 'synonyms'; available: "
                                          r"\['arith_operands', 'mlm_replace'\]"):
        build_prompt_transform(pm, TransformConfig("synonyms"), context(tmp_path, where="augment[0]"))
    with pytest.raises(ConfigError, match=r"augment.options: bad options for prompt transform 'arith_operands'"):
        build_prompt_transform(pm, TransformConfig("arith_operands", options={"digits": 3}), context(tmp_path))
    with pytest.raises(ConfigError, match=r"augment.options.exclude: file .*nope.jsonl' does not exist"):
        build_prompt_transform(pm, TransformConfig("arith_operands", options={"exclude": "nope.jsonl"}),
                               context(tmp_path))
    with pytest.raises(ConfigError, match=r"augment.options.model: .*not a model directory"):
        build_prompt_transform(pm, TransformConfig("mlm_replace", options={"model": "missing"}), context(tmp_path))


@pytest.fixture(scope="module")
def masked_lm(tmp_path_factory) -> Path:
    """A tiny BertForMaskedLM with the preset WordPiece vocabulary, made here (no download)."""
    out = tmp_path_factory.mktemp("mlm")
    tokenizer = wordpiece_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, pad_token_id=tokenizer.pad_token_id)
    BertForMaskedLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def reference_candidates(model_dir: Path, words: list[str], position: int, k: int) -> list[str]:
    """Top-k whole-word tokens (not the word itself) with word ``position`` masked, by a plain forward."""
    tokenizer = wordpiece_tokenizer()
    model = BertForMaskedLM.from_pretrained(model_dir).eval()
    masked = [tokenizer.mask_token if i == position else w for i, w in enumerate(words)]
    ids = tokenizer(" ".join(masked), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, (ids[0] == tokenizer.mask_token_id).nonzero()[0, 0]]
    ranked = [tokenizer.convert_ids_to_tokens(i) for i in logits.argsort(descending=True).tolist()]
    ranked = [t for t in ranked if t not in tokenizer.all_special_tokens and not t.startswith("##") and t != words[position]]
    return ranked[:k]


def test_mlm_replace_draws_from_the_masked_lms_top_candidates(tmp_path, masked_lm):
    pm = build_manager()
    words = "the teacher model encodes each zebra sentence".split()  # "zebra" is several word pieces
    record = {"text": " ".join(words), "label": 3}
    transform = build_prompt_transform(pm, TransformConfig("mlm_replace", options={
        "model": str(masked_lm), "replace_prob": 1.0, "candidates": 3, "field": "text"}), context(tmp_path))
    variants = transform(record, random.Random(0), 6)
    assert len(variants) == 6 and all(v["label"] == 3 for v in variants)  # the label is kept (TinyBERT)
    reference = {i: reference_candidates(masked_lm, words, i, 3) for i in range(len(words)) if words[i] != "zebra"}
    seen_choices = set()
    for v in variants:
        new = v["text"].split()
        assert len(new) == len(words) and new[5] == "zebra"  # a multi-piece word stays
        for i, options in reference.items():
            assert new[i] in options, (i, new[i], options)  # every single-piece word replaced from the top 3
            seen_choices.add((i, new[i]))
    assert len(seen_choices) > len(reference)  # it draws among the candidates, not always the first
    assert transform(record, random.Random(0), 6) == variants
    keep_all = build_prompt_transform(pm, TransformConfig("mlm_replace", options={
        "model": str(masked_lm), "replace_prob": 0.0, "field": "text"}), context(tmp_path))
    assert keep_all(record, random.Random(0), 3) == []  # nothing replaced: no variant
    with pytest.raises(ConfigError, match=r"augment.options.replace_prob: must be in \[0, 1\], got 1.5"):
        build_prompt_transform(pm, TransformConfig("mlm_replace", options={"model": str(masked_lm),
                                                                           "replace_prob": 1.5}), context(tmp_path))


def test_mode_augment_writes_encoder_text_with_provenance_and_the_teacher_as_default_mlm(tmp_path, masked_lm):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"id": f"s{i}", "text": t}) + "\n" for i, t in enumerate(
        ["the teacher model encodes each sentence", "a smaller student learns to reproduce", "zebra"])))
    config = from_dict(GenerateConfig, {
        "teacher": {"path": str(masked_lm), "encoder": True}, "prompts": str(data), "prompt_field": "text",
        "output": str(tmp_path / "aug.jsonl"), "mode": "augment", "progress": False, "batch_size": 2,
        "augment": [{"name": "mlm_replace", "variants": 2, "options": {"replace_prob": 0.5}}]})
    summary = generate(config)
    lines = [json.loads(line) for line in summary.output.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["s0", "s0~mlm_replace~0", "s0~mlm_replace~1",
                                               "s1", "s1~mlm_replace~0", "s1~mlm_replace~1", "s2"]
    assert lines[1]["augmented_from"] == {"id": "s0", "text": "the teacher model encodes each sentence",
                                          "transform": "mlm_replace", "options": {"replace_prob": 0.5}}
    assert lines[1]["text"] != lines[0]["text"] and len(lines[1]["text"].split()) == 6
    assert summary.kept == 7
    assert generate(config).kept == 7 and len(summary.output.read_text().splitlines()) == 7  # finished: a no-op
    # a record without the transform's field: the error names the transform, the prompt and the file
    other = dataclasses.replace(config, output=str(tmp_path / "other.jsonl"), augment=[
        TransformConfig("mlm_replace", 1, {"field": "body"})])
    with pytest.raises(HkdError, match=r"augment\[0\] \(mlm_replace\) on prompt 's0' of .*text.jsonl: .*no text field 'body'"):
        generate(other)
    with pytest.raises(ConfigError, match=r"mode: augment writes the augment: variants, but augment: is empty"):
        from_dict(GenerateConfig, {"teacher": {"path": str(masked_lm)}, "prompts": str(data), "output": "x",
                                   "mode": "augment", "prompt_field": "text"})


PROBLEMS = make_problems(6, 2, seed=4)


def solve_sometimes(prompt, n, seed):
    """The teacher solves a prompt right or wrong depending on the batch seed (to test resume)."""
    a, b = map(int, prompt.rstrip("=").split("+"))
    right = Problem(a, b).worked_solution()
    rng = random.Random(seed + a * 100 + b)
    return [right if rng.random() < 0.6 else right.rsplit("=> ", 1)[0] + "=> 0" for _ in range(n)]


def augmented_config(tmp_path: Path, model_dirs) -> GenerateConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p.prompt, "answer": p.answer}) + "\n"
                               for i, p in enumerate(PROBLEMS)))
    return from_dict(GenerateConfig, {
        "teacher": {"path": str(model_dirs["teacher"])}, "prompts": str(prompts), "output": str(tmp_path / "o.jsonl"),
        "n": 2, "batch_size": 2, "progress": False, "filters": {"dedupe": False},
        "verifiers": [{"name": "exact_answer"}], "augment": [{"name": "arith_operands", "variants": 2}]})


def test_variants_are_solved_and_verified_like_any_prompt_and_resume_exactly(tmp_path, model_dirs, monkeypatch):
    monkeypatch.setattr(sampling, "sample", first := scripted(solve_sometimes))
    summary = generate(augmented_config(tmp_path / "a", model_dirs))
    assert summary.prompts == 18 and summary.samples == 36  # 6 sources + 2 variants each, n=2
    assert len(first.calls) == 3 and all(len(call) == 6 for call in first.calls)  # variants join their batch
    lines = [json.loads(line) for line in summary.output.read_text().splitlines()]
    variants = [line for line in lines if "augmented_from" in line]
    assert variants and all(line["id"].startswith(line["augmented_from"]["id"] + "~arith_operands~") for line in variants)
    for line in lines:  # the computed answer is what exact_answer checked
        a, b = map(int, line["prompt"].rstrip("=").split("+"))
        assert line["answer"] == str(a + b) and line["completion"].endswith(f"=> {a + b}")
    assert summary.rejected == {"exact_answer:wrong_answer": 36 - len(lines)}
    reference = summary.output.read_text()

    cfg = augmented_config(tmp_path / "b", model_dirs)
    crashing = scripted(solve_sometimes)

    crash_on_second_batch = crash_after(crashing, 1)

    monkeypatch.setattr(sampling, "sample", crash_on_second_batch)
    with pytest.raises(RuntimeError):
        generate(cfg)
    monkeypatch.setattr(sampling, "sample", resumed := scripted(solve_sometimes))
    generate(cfg)
    assert Path(cfg.output).read_text() == reference and len(resumed.calls) == 2
    with open(cfg.prompts, "a") as handle:  # an id that a variant id would shadow is refused by name
        handle.write(json.dumps({"id": "q7~arith_operands~0", "prompt": "5+5=", "answer": "10"}) + "\n")
        handle.write(json.dumps({"id": "q7", "prompt": "6+6=", "answer": "12"}) + "\n")
    with pytest.raises(HkdError, match=r"prompt id 'q7~arith_operands~0' collides with a variant id"):
        generate(cfg)
