"""hkd generate: rejection sampling with verifiers and filters, provenance, crash-safe resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import hkd.commands.generate as gen
import hkd.sampling.hf_sampler as sampling
from hkd.tasks.arith import Problem, make_problems
from hkd.cli import main
from hkd.config import DataConfig, from_dict
from hkd.data.encoding import load_records
from hkd.errors import ConfigError, HkdError
from hkd.commands.generate import GenerateConfig, generate, ledger_path
from hkd.plugin.manager import build_manager
from hkd.sampling.verify import build_verifier
from tests.fakes import crash_after, scripted

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PROBLEMS = make_problems(10, 2, seed=3)


def write_prompts(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for i, p in enumerate(PROBLEMS):
            handle.write(json.dumps({"id": f"q{i}", "prompt": p.prompt, "answer": p.answer}) + "\n")
    return path


def solution(prompt: str) -> str:
    a, b = prompt.rstrip("=").split("+")
    return Problem(int(a), int(b)).worked_solution()


def config(tmp_path: Path, model_dirs, **changes) -> GenerateConfig:
    raw = {
        "teacher": {"path": str(model_dirs["teacher"])},
        "prompts": str(write_prompts(tmp_path / "prompts.jsonl")),
        "output": str(tmp_path / "out" / "kept.jsonl"),
        "n": 5, "batch_size": 3, "seed": 11, "progress": False,
        "verifiers": [{"name": "exact_answer"},
                      {"name": "regex_format", "options": {"pattern": r"(\d\+\d\+\d=\d+ c\d; )+=> \d+"}}],
        "filters": {"max_chars": 60},
    }
    raw.update(changes)
    return from_dict(GenerateConfig, raw)


def five_kinds(prompt, n, seed):
    right = solution(prompt)
    return [right, right.rsplit("=> ", 1)[0] + "=> 999", "I think it is big", right, "1+1+0=2 c0; " * 6 + "=> 2"]


def test_rejection_sampling_keeps_exactly_the_verified_completions(tmp_path, model_dirs, monkeypatch):
    monkeypatch.setattr(sampling, "sample", scripted(five_kinds))
    summary = generate(config(tmp_path, model_dirs))
    assert (summary.prompts, summary.samples, summary.kept) == (10, 50, 10)
    assert summary.rejected == {"duplicate": 10, "exact_answer:wrong_answer": 10, "no_answer": 10, "too_long": 10}
    lines = [json.loads(line) for line in summary.output.read_text().splitlines()]
    assert [(line["id"], line["sample"]) for line in lines] == [(f"q{i}", 0) for i in range(10)]
    first = lines[0]
    assert first["verdicts"]["exact_answer"] == {"passed": True, "score": 1.0, "reason": ""}
    assert first["teacher"]["path"] == str(model_dirs["teacher"]) and first["teacher"]["model_type"] == "llama"
    assert first["sampling"]["n"] == 5 and first["sampling"]["temperature"] == 0.8
    assert first["seed"] == gen.derive_seed(11, "q0\x1fq1\x1fq2") and first["answer"] == PROBLEMS[0].answer
    # the output is training data as it stands
    pairs = load_records(DataConfig(kind="jsonl", path=str(summary.output), prompt_field="prompt"), seed=0)
    assert pairs == [(p.prompt, p.worked_solution()) for p in PROBLEMS]


def test_cap_per_prompt_and_disabled_dedupe(tmp_path, model_dirs, monkeypatch):
    monkeypatch.setattr(sampling, "sample", scripted(lambda p, n, seed: [solution(p)] * n))
    summary = generate(config(tmp_path, model_dirs, filters={"dedupe": False, "max_kept_per_prompt": 2}))
    assert summary.kept == 20 and summary.rejected == {"over_cap": 30}


def random_texts(prompt, n, seed):
    """Depends on the seed like real sampling: a resumed run must pass the same seeds."""
    rng = random.Random(f"{seed}:{prompt}")
    right = solution(prompt)
    return [right if rng.random() < 0.5 else right.rsplit("=> ", 1)[0] + f"=> {rng.randint(0, 99)}" for _ in range(n)]


def test_resume_after_crashes_gives_the_uninterrupted_file(tmp_path, model_dirs, monkeypatch):
    monkeypatch.setattr(sampling, "sample", scripted(random_texts))
    reference = generate(config(tmp_path / "a", model_dirs, filters={"dedupe": False})).output.read_text()
    assert reference.count("\n") > 5

    cfg = config(tmp_path / "b", model_dirs, filters={"dedupe": False})
    fake = scripted(random_texts)

    crash_on_third_batch = crash_after(fake, 2)

    monkeypatch.setattr(sampling, "sample", crash_on_third_batch)
    with pytest.raises(RuntimeError):
        generate(cfg)
    out = Path(cfg.output)
    assert len(ledger_path(out).read_text().splitlines()) == 2
    # and a crash between writing a batch's lines and its ledger line, with a torn tail
    real_append = gen.append_lines

    def die_before_ledger(path, rows):
        if path.name.endswith(".ledger.jsonl"):
            with path.open("a") as handle:
                handle.write('{"batch": 2, "ids": ["q6"')  # torn mid-line
            with out.open("a") as handle:
                handle.write('{"id": "q9", "sam')  # and a torn output line after batch 2's whole ones
            raise RuntimeError("killed")
        real_append(path, rows)

    monkeypatch.setattr(sampling, "sample", scripted(random_texts))
    monkeypatch.setattr(gen, "append_lines", die_before_ledger)
    with pytest.raises(RuntimeError):
        generate(cfg)
    written = {json.loads(line)["id"] for line in out.read_text().split("\n")[:-1]}  # whole lines
    assert written & {"q6", "q7", "q8"}  # batch 2's lines are in the output, but the ledger never finished it

    monkeypatch.setattr(gen, "append_lines", real_append)
    resumed_sampler = scripted(random_texts)
    monkeypatch.setattr(sampling, "sample", resumed_sampler)
    summary = generate(cfg)
    assert out.read_text() == reference  # no duplicates, no losses, same lines
    assert len(resumed_sampler.calls) == 2  # only the unfinished batches (4 batches of 3, 2 done)
    assert summary.prompts == 10 and summary.samples == 50

    monkeypatch.setattr(sampling, "sample", scripted(random_texts))
    assert generate(cfg).kept == summary.kept and out.read_text() == reference  # a finished run is a no-op

    with open(cfg.prompts, "a") as handle:  # prompts added later are new work; old lines stay unique
        handle.write(json.dumps({"id": "q10", "prompt": "10+10=", "answer": "20"}) + "\n")
    assert generate(cfg).prompts == 11
    ids = [(line["id"], line["sample"]) for line in map(json.loads, out.read_text().splitlines())]
    assert len(ids) == len(set(ids)) and out.read_text().startswith(reference) and ids[-1][0] == "q10"


def test_resume_refuses_changed_settings_and_foreign_files(tmp_path, model_dirs, monkeypatch):
    monkeypatch.setattr(sampling, "sample", scripted(five_kinds))
    generate(config(tmp_path, model_dirs))
    with pytest.raises(ConfigError, match="different settings.*temperature"):
        generate(config(tmp_path, model_dirs, temperature=0.5))
    foreign = tmp_path / "mine.jsonl"
    foreign.write_text('{"keep": "me"}\n')
    with pytest.raises(HkdError, match="no ledger"):
        generate(config(tmp_path, model_dirs, output=str(foreign)))


def test_duplicate_prompt_ids_and_bad_config_are_named(tmp_path, model_dirs):
    cfg = config(tmp_path, model_dirs)
    Path(cfg.prompts).write_text('{"id": 1, "prompt": "1+1="}\n{"id": 1, "prompt": "2+2="}\n')
    with pytest.raises(HkdError, match="prompt id '1' appears twice"):
        generate(cfg)
    with pytest.raises(ConfigError, match="filters.max_char: unknown key"):
        config(tmp_path, model_dirs, filters={"max_char": 3})
    with pytest.raises(ConfigError, match=r"verifiers\[0\]: unknown verifier 'exact'"):
        generate(config(tmp_path, model_dirs, verifiers=[{"name": "exact"}]))


def test_builtin_verifiers():
    pm = build_manager()
    exact = build_verifier(pm, "exact_answer", {"pattern": r"answer: (\d+)", "answer_field": "gold"})
    assert exact({"gold": "42"}, "answer: 7\nanswer: 42 ").passed  # the last match counts
    assert exact({"gold": "42"}, "answer: 41").reason == "wrong_answer"
    assert exact({"gold": "42"}, "forty-two").reason == "no_answer"
    assert exact({}, "answer: 42").reason == "no_reference"
    default = build_verifier(pm, "exact_answer")
    assert default({"answer": "12"}, "5+7+0=12 c1; => 12\n").passed
    search = build_verifier(pm, "regex_format", {"pattern": r"=> \d+", "mode": "search"})
    full = build_verifier(pm, "regex_format", {"pattern": r"=> \d+"})
    assert search({}, "x => 3").passed and full({}, "x => 3").reason == "bad_format"
    with pytest.raises(ConfigError, match=r"invalid regex '\('"):
        build_verifier(pm, "regex_format", {"pattern": "("})


def test_cli_runs_the_example_config(tmp_path, capsys, model_dirs):
    # the example names the demo's trained teacher; any local teacher directory stands in for it
    out = tmp_path / "gen.jsonl"
    code = main(["generate", str(EXAMPLES / "generate.yaml"), "--out", str(out), "--no-progress",
                 f"--teacher.path={model_dirs['teacher']}", "--n=1", "--max_new_tokens=8", "--batch_size=12"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "24 prompts, 24 samples" in printed and out.is_file()
    assert len(ledger_path(out).read_text().splitlines()) == 2


def test_parts_of_an_interrupted_multi_rank_run_are_merged_in_order(tmp_path, model_dirs, monkeypatch):
    from hkd.train.distributed import DistInfo

    monkeypatch.setattr(sampling, "sample", scripted(random_texts))
    reference = generate(config(tmp_path / "a", model_dirs, filters={"dedupe": False})).output.read_text()

    cfg = config(tmp_path / "b", model_dirs, filters={"dedupe": False})
    out = Path(cfg.output)
    fake = scripted(random_texts)

    crash_on_second_batch = crash_after(fake, 1)

    # rank 1 of 2 takes batches 1 and 3 of 4, finishes batch 1, dies in batch 3
    monkeypatch.setattr(gen, "init_distributed", lambda: DistInfo(rank=1, world_size=2))
    monkeypatch.setattr(gen, "barrier", lambda info: None)
    monkeypatch.setattr(sampling, "sample", crash_on_second_batch)
    with pytest.raises(RuntimeError):
        generate(cfg)
    part = gen.part_path(out, 1)
    assert [e["batch"] for e in map(json.loads, ledger_path(part).read_text().splitlines())] == [1]
    assert not out.exists()
    with part.open("a") as handle:
        handle.write('{"id": "q9", "sam')  # torn tail of the part

    # one process resumes: batches 0, 2, 3 remain; the merge puts batch 1's lines in their place
    monkeypatch.setattr(gen, "init_distributed", lambda: DistInfo())
    resumed = scripted(random_texts)
    monkeypatch.setattr(sampling, "sample", resumed)
    summary = generate(cfg)
    assert len(resumed.calls) == 3 and summary.prompts == 10
    assert out.read_text() == reference
    assert [e["batch"] for e in map(json.loads, ledger_path(out).read_text().splitlines())] == [0, 1, 2, 3]
    assert gen.existing_parts(out) == []


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_single_process_file(tmp_path, subprocess_env, model_dirs):
    import subprocess
    import sys

    import yaml

    raw = yaml.safe_load((EXAMPLES / "generate.yaml").read_text())
    # keep every sample (an untrained teacher passes no verifier): the files then hold all completions
    raw.update(prompts=str(EXAMPLES / raw["prompts"]), n=2, max_new_tokens=8, batch_size=5, verifiers=[],
               teacher={"path": str(model_dirs["teacher"])},
               filters={"require_answer": False, "max_chars": 0, "max_kept_per_prompt": 0, "dedupe": False})
    config_path = tmp_path / "gen.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    options = ["--no-progress"]
    single = tmp_path / "single" / "gen.jsonl"
    assert main(["generate", str(config_path), "--out", str(single), *options]) == 0
    multi = tmp_path / "multi" / "gen.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "hkd.cli", "generate", str(config_path), "--out", str(multi), *options]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("24 prompts, 48 samples") == 1  # rank 0 alone reports
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "teacher"}  # noqa: E731
                          for line in path.read_text().splitlines()]
    assert len(strip(single)) > 24 and strip(multi) == strip(single)
    entries = [json.loads(line) for line in ledger_path(multi).read_text().splitlines()]
    assert [e["batch"] for e in entries] == [0, 1, 2, 3, 4]
    assert gen.existing_parts(multi) == []
