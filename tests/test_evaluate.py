"""hkd eval: pass@k against hand-computed values, agreement and perplexity against direct computation."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM

import hkd.commands.evaluate as ev
from hkd.cli import main
from hkd.commands.evaluate import agreement, evaluate_pass_at_k, pass_at_k, perplexity
from hkd.models.loading import char_tokenizer


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 0, 1, 0.0),
    (5, 5, 3, 1.0),
    (5, 2, 1, 0.4),  # c/n
    (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
    (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    (4, 1, 4, 1.0),  # n - c < k: every draw of 4 contains the correct one
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    exact = 1 - math.comb(1000 - 7, 300) / math.comb(1000, 300)  # exact integers, then one division
    assert pass_at_k(1000, 7, 300) == pytest.approx(exact, rel=1e-12)
    with pytest.raises(ValueError, match="n=3, c=4"):
        pass_at_k(3, 4, 1)


def test_evaluate_pass_at_k_counts_verified_samples(monkeypatch):
    # prompt i gets i correct completions out of 4
    from tests.fakes import scripted

    fake_sample = scripted(lambda p, n, seed: [f"=> {'ok' if j < int(p) else 'no'}" for j in range(n)])
    monkeypatch.setattr(ev, "sample", fake_sample)
    records = [{"prompt": str(i)} for i in range(5)]
    verifier = lambda record, text: type("V", (), {"passed": text.endswith("ok")})()  # noqa: E731
    result = evaluate_pass_at_k(None, char_tokenizer(), records, verifier, n=4, k=[1, 2], batch_size=2)
    assert fake_sample.calls == [["0", "1"], ["2", "3"], ["4"]]  # the prompts' ids, [bos] + text
    assert result["correct"] == [0, 1, 2, 3, 4]
    assert result["pass@1"] == pytest.approx(sum(c / 4 for c in range(5)) / 5)
    assert result["pass@2"] == pytest.approx(sum(1 - math.comb(4 - c, 2) / 6 for c in range(5)) / 5)


def test_agreement_and_perplexity_match_direct_computation(model_dirs):
    tok = char_tokenizer()
    teacher = AutoModelForCausalLM.from_pretrained(model_dirs["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(model_dirs["student"]).eval()
    texts = ["12+34=46", ("7+8=", "15")]
    same = agreement(teacher, teacher, tok, texts)
    assert same["top1_agreement"] == 1.0 and same["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)
    assert same["perplexity"] == pytest.approx(same["teacher_perplexity"])
    # by hand: one text, every next character is a target (bos excluded), eos included
    ids = [tok.bos_token_id] + tok("12+34=46", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logits = student(torch.tensor([ids])).logits[0, :-1]
    nll = F.cross_entropy(logits, torch.tensor(ids[1:]))
    assert perplexity(student, tok, ["12+34=46"]) == pytest.approx(math.exp(nll.item()), rel=1e-5)
    # catches: prompt tokens counted as targets, KL the wrong way round or summed instead of averaged,
    # agreement or perplexity over other positions than the targets (the old check was 0 <= x <= 1)
    mixed = agreement(teacher, student, tok, texts)
    agree, kls, nll_s, nll_t = [], [], [], []
    for prompt, completion in [("", "12+34=46"), ("7+8=", "15")]:
        prompt_ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            lt = teacher(torch.tensor([ids])).logits[0].double().log_softmax(-1)
            ls = student(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        for i in range(len(prompt_ids) - 1, len(ids) - 1):  # position i predicts token i + 1
            agree.append(float(lt[i].argmax() == ls[i].argmax()))
            kls.append(float((lt[i].exp() * (lt[i] - ls[i])).sum()))
            nll_s.append(-float(ls[i, ids[i + 1]]))
            nll_t.append(-float(lt[i, ids[i + 1]]))
    assert mixed["tokens"] == len(kls) == 9 + 3
    assert mixed["top1_agreement"] == pytest.approx(sum(agree) / len(agree), abs=1e-9)
    assert mixed["kl_teacher_student"] == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert mixed["perplexity"] == pytest.approx(math.exp(sum(nll_s) / len(nll_s)), rel=1e-4)
    assert mixed["teacher_perplexity"] == pytest.approx(math.exp(sum(nll_t) / len(nll_t)), rel=1e-4)
    assert mixed["kl_teacher_student"] > 1e-3  # the two models do differ: a zero KL cannot pass


def test_cli_eval_writes_json_and_prints_a_table(tmp_path, model_dirs, capsys):
    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(3)))
    config = {
        "model": {"path": str(model_dirs["student"])},
        "teacher": {"path": str(model_dirs["teacher"])},
        "output": "eval.json",
        "prompts": {"path": "heldout.jsonl", "n": 2, "k": [1, 2], "max_new_tokens": 4,
                    "verifiers": [{"name": "exact_answer"}]},
        "text": {"kind": "synthetic", "num_examples": 4, "batch_size": 2},
        "progress": False,
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    assert main(["eval", str(tmp_path / "eval.yaml")]) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["pass_at_k"]["prompts"] == 3 and set(results["text"]) >= {"perplexity", "top1_agreement"}
    assert "pass@2" in printed and "kl_teacher_student" in printed
    config["prompts"]["k"] = [3]
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    assert main(["eval", str(tmp_path / "eval.yaml")]) == 2
    assert "prompts.k: each k must be between 1 and n=2, got 3" in capsys.readouterr().err


def test_eval_samples_through_its_generation_backend(tmp_path, model_dirs, monkeypatch, capsys):
    # catches: pass@k that bypasses the configured backend (an engine plugin would never be used
    # for evaluation) or drops the sampling settings on the way; an unknown backend is named
    from hkd.plugin.manager import build_manager
    from tests.test_generation import Recording

    recording = Recording()
    monkeypatch.setattr(ev, "build_manager", lambda disable=(): build_manager(disable, extra_plugins=[("rec", recording)]))
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n"
                                                    for i in range(3)))
    config = {"model": {"path": str(model_dirs["student"])}, "output": "eval.json", "progress": False,
              "prompts": {"path": "heldout.jsonl", "n": 2, "max_new_tokens": 4, "batch_size": 2, "temperature": 0.5,
                          "backend": "recording", "verifiers": [{"name": "exact_answer"}]}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    assert main(["eval", str(tmp_path / "eval.yaml")]) == 0
    assert [(p.n, p.max_new_tokens, p.temperature) for p in recording.calls] == [(2, 4, 0.5)] * 2  # 3 prompts, batches of 2
    assert recording.calls[0].seed != recording.calls[1].seed
    config["prompts"]["backend"] = "vllm"
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    assert main(["eval", str(tmp_path / "eval.yaml")]) == 2
    assert "prompts.backend: unknown generation backend 'vllm'" in capsys.readouterr().err
