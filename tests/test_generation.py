"""Generation backends: the transformers backend's log-probs against a full-forward reference,
the plugin contract (lookup, options, shape checks), the docs' table backend through
``hkd generate``, and the RL stage sampling through a backend it syncs each step."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

import hkd.commands.generate as gen
from hkd import GenerationBackendSpec, GenerationContext, Samples, SamplingParams, hookimpl
from hkd.cli import main
from hkd.config import ModelConfig
from hkd.errors import ConfigError, HkdError
from hkd.sampling.backends import build_generation_backend, get_generation_backend
from hkd.plugin.manager import build_manager
from hkd.models.loading import char_tokenizer, load_model
from hkd.plugins.rl import RlStage, RlStageConfig
from hkd.plugin.stage import StageContext, StepState
from hkd.tasks.arith import make_problems
from hkd.sampling.verify import VerifierConfig
from tests.plugins.helpers import models
from tests.test_docs import example

def reference_logprobs(model, samples: Samples, temperature: float, top_p: float) -> torch.Tensor:
    """log p(sampled token) recomputed with one full forward, temperature and top-p applied by hand."""
    ids = torch.cat([samples.prompt_ids, samples.completion_ids], 1)
    mask = torch.cat([samples.prompt_mask, samples.completion_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0)).logits
    logits = logits[:, samples.prompt_ids.shape[1] - 1: -1].double() / temperature
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    drop_sorted = sorted_probs.cumsum(-1) - sorted_probs > top_p  # outside the nucleus (the top token stays)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    logp = logits.masked_fill(drop, float("-inf")).log_softmax(-1)
    return logp.gather(-1, samples.completion_ids[..., None]).squeeze(-1) * samples.completion_mask


@pytest.fixture(scope="module")
def teacher(model_dirs):
    model, tokenizer = load_model(ModelConfig(path=str(model_dirs["teacher"])), "teacher")
    # a model's own sampling defaults (Llama/Qwen ship some) must not leak into the distribution
    model.generation_config.top_k, model.generation_config.temperature = 3, 0.2
    return model, tokenizer


@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.3, 0.6)])
def test_transformers_backend_logprobs_are_the_sampling_distributions(teacher, temperature, top_p):
    model, tokenizer = teacher
    backend = build_generation_backend(build_manager(), "transformers", GenerationContext("teacher", tokenizer, model))
    params = SamplingParams(n=3, max_new_tokens=6, temperature=temperature, top_p=top_p, seed=5)
    samples = backend.generate(["12+34=", "5+6="], params)
    assert samples.completion_ids.shape == (6, 6) and len(samples.texts) == 6
    expected = reference_logprobs(model, samples, temperature, top_p)
    torch.testing.assert_close(samples.token_logprobs.double(), expected, atol=1e-4, rtol=1e-4)
    assert (samples.token_logprobs[samples.completion_mask.bool()] < 0).any()
    again = backend.generate(["12+34=", "5+6="], params)  # exact resume relies on this
    assert torch.equal(again.completion_ids, samples.completion_ids) and again.texts == samples.texts


def test_greedy_has_logprob_zero_and_takes_the_argmax(teacher):
    model, tokenizer = teacher
    backend = build_generation_backend(build_manager(), "transformers", GenerationContext("teacher", tokenizer, model))
    samples = backend.generate(["12+34="], SamplingParams(n=2, max_new_tokens=5, temperature=0.0))
    assert torch.equal(samples.token_logprobs, torch.zeros(2, 5))
    ids = torch.cat([samples.prompt_ids, samples.completion_ids], 1)
    with torch.no_grad():
        argmax = model(input_ids=ids).logits[:, samples.prompt_ids.shape[1] - 1: -1].argmax(-1)
    assert torch.equal(argmax, samples.completion_ids)


class Recording:
    """A backend plugin: wraps the transformers backend, counts weight syncs, can break the contract."""

    def __init__(self, drop_row: bool = False) -> None:
        self.syncs: list[torch.nn.Module] = []
        self.calls: list[SamplingParams] = []
        self.drop_row = drop_row

    @hookimpl
    def hkd_add_generation_backends(self):
        outer = self

        class Backend:
            def __init__(self, context: GenerationContext) -> None:
                self.inner = build_generation_backend(build_manager(), "transformers", context)

            def generate(self, prompts, params):
                outer.calls.append(params)
                samples = self.inner.generate(prompts, params)
                if outer.drop_row:
                    samples.texts = samples.texts[1:]
                return samples

            def sync_weights(self, model):
                outer.syncs.append(model)

        return [GenerationBackendSpec("recording", Backend, "test")]


def test_lookup_names_unknown_backends_options_and_contract_breaches(teacher):
    model, tokenizer = teacher
    pm = build_manager(extra_plugins=[("rec", Recording(drop_row=True)), ("table", example("hkd_add_generation_backends"))])
    assert get_generation_backend(pm, "table").needs_model is False
    with pytest.raises(ConfigError, match=r"stages.rl.backend: unknown generation backend 'vllm'; "
                                          r"available: \['recording', 'table', 'transformers'\]"):
        get_generation_backend(pm, "vllm", "stages.rl.backend")
    context = GenerationContext("teacher", tokenizer, model)
    with pytest.raises(ConfigError, match=r"backend_options: bad options for generation backend 'table'"):
        build_generation_backend(pm, "table", context, {"tabel": {}})
    with pytest.raises(ConfigError, match=r"bad options for generation backend 'transformers'.*takes no options"):
        build_generation_backend(pm, "transformers", context, {"top_k": 5})
    with pytest.raises(HkdError, match=r"backend: generation backend 'transformers' samples a live model"):
        build_generation_backend(pm, "transformers", GenerationContext("teacher", tokenizer))
    broken = build_generation_backend(pm, "recording", context)
    with pytest.raises(HkdError, match=r"generation backend 'recording' broke the contract: 3 texts for 2 prompts x n=2"):
        broken.generate(["1+1=", "2+2="], SamplingParams(n=2, max_new_tokens=2, seed=0))
    twice = build_manager(extra_plugins=[("a", example("hkd_add_generation_backends")), ("b", example("hkd_add_generation_backends"))])
    with pytest.raises(HkdError, match=r"generation backend 'table' is provided by both 'a' and 'b'"):
        get_generation_backend(twice, "table")


def test_hkd_generate_runs_through_a_plugin_backend(tmp_path, model_dirs, monkeypatch, capsys):
    problems = make_problems(5, 2, seed=1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p.prompt, "answer": p.answer}) + "\n"
                               for i, p in enumerate(problems)))
    table = {p.prompt: p.worked_solution() for p in problems[:4]}
    table[problems[4].prompt] = "2+2+0=4 c0; => 4"  # wrong: the verifier must reject it
    config = tmp_path / "gen.yaml"
    config.write_text(yaml.safe_dump({
        "teacher": {"path": str(model_dirs["teacher"])}, "prompts": "prompts.jsonl", "output": "out.jsonl",
        "n": 2, "batch_size": 2, "backend": "table", "backend_options": {"table": table},
        "verifiers": [{"name": "exact_answer"}], "filters": {"dedupe": False},
    }))
    monkeypatch.setattr(gen, "build_manager", lambda disable: build_manager(disable, [("table", example("hkd_add_generation_backends"))]))

    def no_model(*args, **kwargs):
        raise AssertionError("a needs_model=False backend must not make hkd generate load the teacher")

    monkeypatch.setattr(gen, "load_model", no_model)
    assert main(["generate", str(config), "--no-progress"]) == 0
    assert "5 prompts, 10 samples: kept 8, rejected 2" in capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(line["id"], line["sample"]) for line in lines] == [(f"p{i}", j) for i in range(4) for j in range(2)]
    assert all(line["completion"] == table[line["prompt"]] for line in lines)
    assert lines[0]["teacher"]["backend"] == "table" and lines[0]["sampling"]["backend"] == "table"
    config.write_text(config.read_text().replace("backend: table", "backend: tabel"))
    (tmp_path / "out.jsonl").unlink()
    assert main(["generate", str(config), "--no-progress", "--out", str(tmp_path / "other.jsonl")]) != 0
    assert "backend: unknown generation backend 'tabel'; available: ['table', 'transformers']" in capsys.readouterr().err
    assert not (tmp_path / "other.jsonl").exists()  # refused before any work


def test_rl_stage_samples_through_its_backend_and_syncs_the_student_each_step():
    teacher, student = models()
    recording = Recording()
    pm = build_manager(extra_plugins=[("rec", recording)])
    ctx = StageContext("rl", teacher, student, {}, "stages.rl", plugins=pm, tokenizer=char_tokenizer())
    config = RlStageConfig(num_prompts=6, prompts_per_step=2, samples_per_prompt=3, max_new_tokens=3,
                           generation_backend="recording", verifier=VerifierConfig("regex_format", {"pattern": r"\d.*"}))
    stage = RlStage(config, ctx)
    for step in range(2):
        terms = stage.loss({}, None, None, StepState(step=step, temperature=1.0, tokens=1))
        assert torch.isfinite(terms["rl"]) and terms["rl"].requires_grad
    assert recording.syncs == [student, student]  # before every step's sampling
    assert [(p.n, p.max_new_tokens, p.temperature) for p in recording.calls] == [(3, 3, 1.0)] * 2
    assert recording.calls[0].seed != recording.calls[1].seed
    with pytest.raises(ConfigError, match=r"stages.rl.generation_backend: unknown generation backend 'vllm'"):
        RlStage(RlStageConfig(num_prompts=2, generation_backend="vllm"), ctx)


def test_a_ledger_written_before_backends_and_modes_existed_still_resumes(tmp_path, model_dirs, monkeypatch):
    # catches: settings keys added later (backend, mode, augment, ...) making old outputs "different settings"
    import hkd.sampling.hf_sampler as sampling
    from tests.fakes import scripted

    monkeypatch.setattr(sampling, "sample", scripted(lambda p, n, seed: [f"{p} => 1"] * n))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"{i}+1="}) + "\n" for i in range(4)))
    config = gen.GenerateConfig(teacher=ModelConfig(path=str(model_dirs["teacher"])), prompts=str(prompts),
                                output=str(tmp_path / "o.jsonl"), n=1, batch_size=2, progress=False)
    gen.generate(dataclasses.replace(config, prompts=str(tmp_path / "p.jsonl")))
    ledger = gen.ledger_path(Path(config.output))
    old = [json.loads(line) for line in ledger.read_text().splitlines()]
    for entry in old[:1]:
        for key in gen.SETTINGS_DEFAULTS:
            del entry["settings"][key]
    ledger.write_text("".join(json.dumps(entry) + "\n" for entry in old[:1]))  # an old, unfinished run
    summary = gen.generate(config)
    assert summary.prompts == 4 and len(Path(config.output).read_text().splitlines()) == 4
    with pytest.raises(ConfigError, match=r"different settings \(mode\)"):  # a new key still counts
        gen.generate(dataclasses.replace(config, mode="pseudo_label"))
