"""Pseudo-labelling (hkd generate, mode: pseudo_label): majority answer over the n samples,
agreement kept in the provenance, min_agreement filtering, crash-safe resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import hkd.commands.generate as gen
import hkd.sampling.hf_sampler as sampling
from hkd.config import from_dict
from hkd.errors import ConfigError
from hkd.commands.generate import GenerateConfig, generate, ledger_path, majority_answer
from hkd.tasks.arith import Problem, extract_answer
from hkd.sampling.verify import answer_extractor
from tests.fakes import crash_after, scripted


def solved(prompt: str, answer: str | None = None) -> str:
    a, b = prompt.rstrip("=").split("+")
    right = Problem(int(a), int(b)).worked_solution()
    return right if answer is None else right.rsplit("=> ", 1)[0] + f"=> {answer}"


# per prompt: the n=4 samples the fake teacher writes
SCRIPT = {
    "11+22=": [solved("11+22="), solved("11+22="), solved("11+22=", "34"), solved("11+22=")],  # 3/4 agree on 33
    "40+41=": [solved("40+41=", "80"), solved("40+41="), solved("40+41=", "80"), solved("40+41=")],  # 2-2: 80 first
    "15+15=": [solved("15+15="), "no idea", "still no idea", solved("15+15=", "31")],  # 1/4: below min_agreement
    "50+25=": ["nothing", "at all", "here", "..."],  # no answer at all
    "12+12=": [solved("12+12="), solved("12+12=", "25"), solved("12+12=", "25"), solved("12+12=", "25")],
}


def write_prompts(path: Path) -> Path:
    rows = [{"id": "u0", "prompt": "11+22="}, {"id": "u1", "prompt": "40+41=", "answer": None},
            {"id": "u2", "prompt": "15+15=", "answer": ""}, {"id": "u3", "prompt": "50+25="},
            {"id": "l0", "prompt": "12+12=", "answer": "24"}]  # labelled: verified against its answer, not voted
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path: Path, model_dirs, **changes) -> GenerateConfig:
    raw = {"teacher": {"path": str(model_dirs["teacher"])}, "prompts": str(write_prompts(tmp_path / "p.jsonl")),
           "output": str(tmp_path / "out.jsonl"), "n": 4, "batch_size": 2, "progress": False,
           "mode": "pseudo_label", "min_agreement": 0.5, "verifiers": [{"name": "exact_answer"}],
           "filters": {"dedupe": False}}
    raw.update(changes)
    return from_dict(GenerateConfig, raw)


def test_majority_answer_counts_every_sample_and_breaks_ties_by_first_reached():
    extract = answer_extractor(None)
    assert majority_answer(["a => 5", "b => 5 ", "=> 7", "none"], extract) == {
        "answer": "5", "agreement": 0.5, "votes": {"5": 2, "7": 1}}
    assert majority_answer(["=> 7", "=> 5", "=> 5", "=> 7"], extract)["answer"] == "7"
    assert majority_answer(["=> 5", "=> 7", "=> 7", "=> 5"], extract)["answer"] == "5"
    assert majority_answer(["x", "y"], extract) == {"answer": None, "agreement": 0.0, "votes": {}}
    # a user's answer regex is the same one verifiers use
    assert majority_answer(["ANSWER: 3", "ANSWER: 4", "ANSWER: 3"], answer_extractor(r"ANSWER: (\d+)"))["answer"] == "3"


def test_prompts_without_answers_get_the_majority_answer(tmp_path, model_dirs, monkeypatch):
    monkeypatch.setattr(sampling, "sample", scripted(lambda p, n, seed: SCRIPT[p]))
    summary = generate(config(tmp_path, model_dirs))
    lines = [json.loads(line) for line in summary.output.read_text().splitlines()]
    kept = {(line["id"], line["sample"]) for line in lines}
    assert kept == {("u0", 0), ("u0", 1), ("u0", 3), ("u1", 0), ("u1", 2), ("l0", 0)}
    by_id = {line["id"]: line for line in lines}
    assert by_id["u0"]["answer"] == "33" and by_id["u0"]["pseudo_label"] == {
        "answer": "33", "agreement": 0.75, "votes": {"33": 3, "34": 1}}
    # a tie goes to the answer reached first: the label is only as good as the teacher's majority
    assert by_id["u1"]["answer"] == "80" and by_id["u1"]["pseudo_label"]["agreement"] == 0.5
    assert by_id["l0"]["answer"] == "24" and "pseudo_label" not in by_id["l0"]  # its own answer beats the vote
    assert all(extract_answer(line["completion"]) == line["answer"] for line in lines)
    # exact_answer checks against the pseudo-label: u0's 34, u1's two 81s, u2's 31, l0's three 25s
    assert summary.rejected == {"exact_answer:wrong_answer": 7, "low_agreement": 1, "no_answer": 6}
    ledger = [json.loads(line) for line in ledger_path(summary.output).read_text().splitlines()]
    labels = {pid: label for entry in ledger for pid, label in entry.get("pseudo_labels", {}).items()}
    assert labels["u2"]["agreement"] == 0.25 and labels["u3"]["answer"] is None and "l0" not in labels


def test_without_verifiers_only_completions_reaching_the_majority_are_kept(tmp_path, model_dirs, monkeypatch):
    monkeypatch.setattr(sampling, "sample", scripted(lambda p, n, seed: SCRIPT[p]))
    summary = generate(config(tmp_path, model_dirs, min_agreement=0.0, verifiers=[]))
    ids = [json.loads(line)["id"] for line in summary.output.read_text().splitlines()]
    assert ids.count("u0") == 3 and ids.count("u1") == 2
    assert ids.count("u2") == 1 and "u3" not in ids  # 15+15: the lone "30" is the majority of the answers
    assert ids.count("l0") == 4  # labelled, and no verifier to check it: solve mode's rule
    assert summary.rejected == {"minority_answer": 4, "no_answer": 6}
    no_filter = config(tmp_path / "nf", model_dirs, min_agreement=0.0, verifiers=[],
                       filters={"dedupe": False, "require_answer": False})
    # u2's two samples without an answer now miss its label too; u3 has no majority at all
    assert generate(no_filter).rejected == {"minority_answer": 6, "no_majority": 4}


def random_votes(prompt, n, seed):
    rng = random.Random(seed + sum(map(ord, prompt)))
    return [solved(prompt, str(rng.randint(0, 2) + int(prompt[:2]) + int(prompt[3:5]))) for _ in range(n)]


def test_pseudo_labelling_resumes_to_the_uninterrupted_file(tmp_path, model_dirs, monkeypatch):
    monkeypatch.setattr(sampling, "sample", scripted(random_votes))
    reference = generate(config(tmp_path / "a", model_dirs, min_agreement=0.0)).output.read_text()
    (tmp_path / "b").mkdir()
    cfg = config(tmp_path / "b", model_dirs, min_agreement=0.0)
    fake = scripted(random_votes)

    crash_on_second_batch = crash_after(fake, 1)

    monkeypatch.setattr(sampling, "sample", crash_on_second_batch)
    with pytest.raises(RuntimeError):
        generate(cfg)
    monkeypatch.setattr(sampling, "sample", resumed := scripted(random_votes))
    generate(cfg)
    assert Path(cfg.output).read_text() == reference and len(resumed.calls) == 2  # 3 batches, 1 done
    with pytest.raises(ConfigError, match=r"different settings \(min_agreement\)"):
        generate(config(tmp_path / "b", model_dirs, min_agreement=0.6))


def test_bad_pseudo_label_settings_are_named(tmp_path, model_dirs):
    with pytest.raises(ConfigError, match=r"min_agreement: 1\.5 is outside \[0, 1\]"):  # its range (ranged)
        config(tmp_path, model_dirs, min_agreement=1.5)
    with pytest.raises(ConfigError, match=r"min_agreement: only used with mode: pseudo_label \(mode is solve\)"):
        config(tmp_path, model_dirs, mode="solve")
    with pytest.raises(ConfigError, match=r"mode"):
        config(tmp_path, model_dirs, mode="label")
    with pytest.raises(ConfigError, match=r"n: 4 greedy samples are identical, so their vote always agrees"):
        config(tmp_path, model_dirs, temperature=0.0)
    assert config(tmp_path, model_dirs, temperature=0.0, n=1).n == 1  # the teacher's greedy answer as the label


def test_the_enrich_benchmark_scores_pseudo_labels_against_the_withheld_answers(tmp_path):
    from tests.conftest import load_bench_script

    bench = load_bench_script("enrich")
    prompts = tmp_path / "train.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"t{i}", "prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n"
                               for i in range(4)))
    split = bench.split_prompts(prompts, tmp_path)
    assert [json.loads(line) for line in split["unlabelled"].read_text().splitlines()] == [
        {"id": "t2", "prompt": "2+1="}, {"id": "t3", "prompt": "3+1="}]  # the second half, answers withheld
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text(json.dumps({"pseudo_labels": {"t2": {"answer": "3", "agreement": 1.0},
                                                    "t3": {"answer": "5", "agreement": 0.5}}}) + "\n")
    assert bench.pseudo_label_accuracy(ledger, split["withheld"]) == {
        "prompts": 2, "with_majority": 2, "majority_correct": 1, "agreement_mean": 0.75}


def test_the_docs_generate_example_loads():
    # catches: a docs generate config (docs/data.md) (mode, min_agreement, augment, backend) that the loader refuses
    import re

    import yaml

    page = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", page, re.S) if "mode: pseudo_label" in b]
    config = from_dict(GenerateConfig, yaml.safe_load(block))
    assert (config.mode, config.n, config.min_agreement, config.backend) == ("pseudo_label", 5, 0.6, "transformers")
    assert [(t.name, t.variants, t.options) for t in config.augment] == [
        ("arith_operands", 1, {"exclude": "heldout.jsonl"})]
