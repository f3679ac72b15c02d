"""Chat models end to end: conversations in (JSONL and HF datasets), the loss on the assistant turns
only, every sampler given the chat template's own token ids and stopping at its end-of-turn token,
and a chat teacher and student running every stage, hkd generate and hkd eval on conversations."""

from __future__ import annotations

import json

import pytest
import torch

from hkd.config import Config, ConfigError, from_dict
from hkd.data.chat import encode_conversation, end_of_turn_ids, prompt_ids
from hkd.data.encoding import encode_dataset
from hkd.errors import HkdError
from hkd.sampling.backends import PromptBatch
from hkd.sampling.hf_sampler import sample
from tests.chat import CONVERSATION, END_OF_TURN, chat_models, chat_tokenizer, write_chat_models

TEMPLATES = ["chatml", "chatml_marked", "llama3", "llama3_marked"]


def template_ids(tok, messages, add_generation_prompt):
    out = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                  return_dict=True)
    return list(out["input_ids"])


def labelled_runs(ids, labels):
    """The labelled tokens as contiguous runs."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == -100:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("template", TEMPLATES)
def test_the_loss_mask_is_the_assistant_tokens(template):
    # catches: system/user turns or template markers (role headers, ChatML's newline between turns)
    # learned, an assistant turn not learned, the end-of-turn token left out (the student would never
    # stop), or a token stream other than the template's own
    tok = chat_tokenizer(template)
    ids, labels = encode_conversation(tok, CONVERSATION, 512)
    assert ids == template_ids(tok, CONVERSATION, False)
    eot = tok.convert_tokens_to_ids(END_OF_TURN[template.removesuffix("_marked")])
    assistant = [tok(m["content"], add_special_tokens=False)["input_ids"] + [eot]
                 for m in CONVERSATION if m["role"] == "assistant"]
    assert labelled_runs(ids, labels) == assistant


@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_generation_markers_and_the_prefix_method_agree(family):
    # catches: the two ways of finding assistant tokens drifting apart (a model trained on one template
    # variant would learn other tokens than on the other)
    marked = encode_conversation(chat_tokenizer(f"{family}_marked"), CONVERSATION, 512)
    plain = encode_conversation(chat_tokenizer(family), CONVERSATION, 512)
    assert marked == plain


def test_a_template_that_rewrites_earlier_turns_is_refused_by_name():
    # catches: labelling by prefixes when the template renders a turn differently once later turns exist
    # (the labels would land on the wrong tokens without any error)
    tok = chat_tokenizer("chatml")
    tok.chat_template = tok.chat_template.replace(
        "message['content'] + '<|im_end|>\\n'", "(message['content'] if loop.last else 'x') + '<|im_end|>\\n'")
    with pytest.raises(HkdError, match=r"does not render assistant turn 2 as a continuation.*\{% generation %\}"):
        encode_conversation(tok, CONVERSATION, 512)


def test_prompt_completion_data_keeps_its_encoding():
    # catches: the prompt renderer shared with the samplers changing what prompt/completion data encodes to
    from hkd.data.encoding import encode
    from hkd.models.loading import char_tokenizer

    tok = char_tokenizer()
    ids, labels = encode(tok, "1+1=", "2", 64)
    assert ids == [tok.bos_token_id] + tok("1+1=2", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert prompt_ids(tok, "1+1=") == ids[:5]
    chat = chat_tokenizer("chatml")
    ids, labels = encode(chat, "1+1=", "2", 64, chat_template=True)
    assert ids[: labels.index(next(x for x in labels if x != -100))] == prompt_ids(chat, "1+1=", chat_template=True)
    assert prompt_ids(chat, "1+1=", chat_template=True) == template_ids(chat, [{"role": "user", "content": "1+1="}], True)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


CONVERSATIONS = [
    CONVERSATION,
    [{"role": "user", "content": "7+8="}, {"role": "assistant", "content": "15"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2="},
     {"role": "assistant", "content": "4"}],
]


@pytest.mark.parametrize("kind", ["jsonl", "hf"])
def test_conversations_are_read_from_jsonl_and_hf_datasets_alike(tmp_path, kind):
    # catches: kind hf encoding conversations differently from kind jsonl, or the messages field
    # read as text
    from hkd.config.schema import DataConfig

    tok = chat_tokenizer("chatml")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c, "id": i} for i, c in enumerate(CONVERSATIONS)])
    config = DataConfig(kind=kind, path=str(path), messages_field="messages", max_length=256)
    encoded = [tuple(map(list, row)) for row in encode_dataset(tok, config, 0)]
    assert encoded == [encode_conversation(tok, c, 256) for c in CONVERSATIONS]


def test_a_bad_conversation_names_file_and_line(tmp_path):
    # catches: a malformed conversation crashing inside the template, or training on it silently
    from hkd.config.schema import DataConfig

    tok = chat_tokenizer("chatml")
    rows = [{"messages": CONVERSATIONS[1]}, {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
            {"messages": "just text"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    config = DataConfig(kind="jsonl", path=str(path), messages_field="messages")
    with pytest.raises(HkdError, match=r"bad.jsonl:2: field 'messages': no assistant message"):
        encode_dataset(tok, config, 0)
    skipping = DataConfig(kind="jsonl", path=str(path), messages_field="messages", on_bad_line="skip")
    assert len(encode_dataset(tok, skipping, 0)) == 1
    for line, problem in ((3, r"message 0: 'content' must be text, got a int"), (4, r"expected a non-empty list")):
        only = write_jsonl(tmp_path / f"bad{line}.jsonl", [rows[line - 1]])
        with pytest.raises(HkdError, match=rf"bad{line}.jsonl:1: field 'messages': {problem}"):
            encode_dataset(tok, DataConfig(kind="jsonl", path=str(only), messages_field="messages"), 0)
    from hkd.models.loading import char_tokenizer

    good = write_jsonl(tmp_path / "good.jsonl", rows[:1])
    with pytest.raises(HkdError, match=r"good.jsonl: conversation 1 \(messages\): the tokenizer has no chat template"):
        encode_dataset(char_tokenizer(), DataConfig(kind="jsonl", path=str(good), messages_field="messages"), 0)


def test_conversation_config_mistakes_name_the_key(raw_config):
    from hkd.config import validate

    raw_config["data"] = {"kind": "jsonl", "path": "x.jsonl", "messages_field": "messages", "prompt_field": "p"}
    with pytest.raises(ConfigError, match=r"data.messages_field: records are either conversations or prompt/"):
        validate(from_dict(Config, raw_config))
    raw_config["data"] = {"kind": "synthetic", "messages_field": "messages"}
    with pytest.raises(ConfigError, match=r"data.messages_field: conversations are read from a file"):
        validate(from_dict(Config, raw_config))
    raw_config["data"] = {"kind": "jsonl", "path": "x.jsonl", "messages_field": "messages", "chat_template": True}
    validate(from_dict(Config, raw_config))  # conversations use the template anyway


# --------------------------------------------------------------------------- samplers


def test_samples_stop_at_a_stop_token_which_belongs_to_the_completion():
    # catches: a sample running on past the template's end-of-turn token (the student would learn
    # to continue after it), or the stop token dropped from what is scored
    tok = chat_tokenizer("chatml")
    _, student = chat_models(tok)
    prompts = PromptBatch([prompt_ids(tok, CONVERSATION[:2])])
    free = sample(student, tok, prompts, max_new_tokens=6, temperature=0.0, stop_token_ids=())
    stop = int(free.completion_ids[0, 2])
    cut = sample(student, tok, prompts, max_new_tokens=6, temperature=0.0, stop_token_ids=(stop,))
    first = free.completion_ids[0].tolist().index(stop)
    assert cut.completion_mask[0].tolist() == [1] * (first + 1) + [0] * (cut.completion_ids.shape[1] - first - 1)
    assert end_of_turn_ids(tok) == (tok.convert_tokens_to_ids("<|im_end|>"),)


def test_sampling_never_touches_the_global_random_state():
    # catches: sample() reseeding torch's global generator (dropout and every other global draw
    # would become a function of the sampling seed), or samples that depend on the global state
    tok = chat_tokenizer("chatml")
    _, student = chat_models(tok)
    prompts = PromptBatch([prompt_ids(tok, CONVERSATION[:2])] * 2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = sample(student, tok, prompts, n=2, max_new_tokens=5, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(456)
    b = sample(student, tok, prompts, n=2, max_new_tokens=5, seed=7)
    assert torch.equal(a.completion_ids, b.completion_ids)
    c = sample(student, tok, prompts, n=2, max_new_tokens=5, seed=8)
    assert not torch.equal(a.completion_ids, c.completion_ids)


class Spy:
    """Wraps hkd.sampling.hf_sampler.sample (behind every built-in sampler) and records the prompts."""

    def __init__(self, monkeypatch):
        import hkd.commands.evaluate as ev
        import hkd.sampling.hf_sampler as hf

        self.received: list[tuple[list[list[int]], tuple[int, ...] | None]] = []
        real = hf.sample

        def spy(model, tokenizer, prompts, **kwargs):
            stops = kwargs.get("stop_token_ids")  # None: sample() stops at the template's end-of-turn
            self.received.append((list(prompts.ids), end_of_turn_ids(tokenizer) if stops is None else tuple(stops)))
            return real(model, tokenizer, prompts, **kwargs)

        monkeypatch.setattr(hf, "sample", spy)
        monkeypatch.setattr(ev, "sample", spy)


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_every_sampler_gets_the_templates_own_ids(template, tmp_path, monkeypatch, model_dirs):
    # catches: a sampler given text (decoded without the template's special tokens and re-encoded
    # with a BOS), a sampler that applies no template (RL did not), or one that does not stop at
    # the template's end-of-turn token
    import hkd.commands.generate as gen
    from hkd.commands.evaluate import evaluate_pass_at_k
    from hkd.config import ModelConfig
    from hkd.data.encoding import collate
    from hkd.plugin.stage import StageContext, StepState
    from hkd.plugins.onpolicy import OnPolicyStage, OnPolicyStageConfig
    from hkd.plugins.rl import RlStage, RlStageConfig
    from hkd.sampling.verify import VerifierConfig

    spy = Spy(monkeypatch)
    tok = chat_tokenizer(template)
    eot = (tok.convert_tokens_to_ids(END_OF_TURN[template]),)
    teacher, student = chat_models(tok)
    prompts = [CONVERSATION[:2], CONVERSATION[:4], [{"role": "user", "content": "7+8="}]]
    expected = [template_ids(tok, p, True) for p in prompts]
    records = [{"id": f"p{i}", "prompt": p, "answer": "46"} for i, p in enumerate(prompts)]
    path = write_jsonl(tmp_path / "prompts.jsonl", records)

    # on-policy: the batch's prompts
    onpolicy = OnPolicyStage(OnPolicyStageConfig(lmbda=1.0, max_new_tokens=3), StageContext(
        "onpolicy", teacher, student, {}, "stages.onpolicy", tokenizer=tok))
    batch = collate([encode_conversation(tok, p + [{"role": "assistant", "content": "46"}], 256) for p in prompts],
                    tok.pad_token_id)
    onpolicy.loss(batch, None, None, StepState(step=0, temperature=1.0, tokens=1))
    # RL: conversation prompts from a file, and text prompts with chat_template
    context = StageContext("rl", teacher, student, {}, "stages.rl", tokenizer=tok)
    rl = RlStage(RlStageConfig(prompts=str(path), prompts_per_step=3, samples_per_prompt=2, max_new_tokens=3,
                               verifier=VerifierConfig("regex_format", {"pattern": ".*"})), context)
    order = rl.step_indices(0)
    rl.loss({}, None, None, StepState(step=0, temperature=1.0, tokens=1))
    text_rl = RlStage(RlStageConfig(num_prompts=2, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=3,
                                    chat_template=True), context)
    text_rl.loss({}, None, None, StepState(step=0, temperature=1.0, tokens=1))
    text_prompts = [[{"role": "user", "content": text_rl.records[i]["prompt"]}] for i in text_rl.step_indices(0)]
    # hkd generate (solve and pseudo_label), then pass@k
    tok.save_pretrained(tmp_path / "teacher")
    teacher.save_pretrained(tmp_path / "teacher")
    for mode in ("solve", "pseudo_label"):
        gen.generate(gen.GenerateConfig(teacher=ModelConfig(path=str(tmp_path / "teacher")), prompts=str(path),
                                        output=str(tmp_path / f"{mode}.jsonl"), n=2, max_new_tokens=3,
                                        mode=mode, progress=False, filters=gen.FilterConfig(require_answer=False)))
    evaluate_pass_at_k(student, tok, records, lambda record, text: type("V", (), {"passed": True})(), n=2,
                       max_new_tokens=3)

    got = [ids for ids, _ in spy.received]
    assert got[0] == expected  # on-policy
    assert got[1] == [expected[i] for i in order]  # RL, the step's prompts in their order
    assert got[2] == [template_ids(tok, p, True) for p in text_prompts]
    assert got[3] == expected and got[4] == expected  # generate: solve, pseudo_label
    assert got[5] == expected  # pass@k
    assert len(got) == 6 and all(stops == eot for _, stops in spy.received)


def test_a_text_backend_gets_the_template_as_text_that_encodes_back_to_the_same_ids():
    # catches: prompts decoded without their special tokens for backends written before token ids
    # (their re-encoding would lose the chat template), or a BOS doubled on the way
    tok = chat_tokenizer("llama3")
    batch = PromptBatch([prompt_ids(tok, CONVERSATION[:2]), prompt_ids(tok, "plain")])
    texts = batch.texts(tok)
    assert "<|start_header_id|>user<|end_header_id|>" in texts[0]
    assert PromptBatch.from_texts(tok, texts).ids == batch.ids


# --------------------------------------------------------------------------- end to end


def chat_run_config(dirs, data, prompts, held_out) -> dict:
    return {
        "teacher": {"path": str(dirs["teacher"])},
        "student": {"path": str(dirs["student"])},
        "data": {"kind": "jsonl", "path": str(data), "messages_field": "messages", "batch_size": 2, "max_length": 128},
        "schedule": {"phases": [
            {"name": "structure", "steps": 1, "stages": {"attention": 1.0, "hidden": 1.0}},
            {"name": "decision", "steps": 1, "stages": {"logits": 1.0, "sft": 0.5}},
            {"name": "gkd", "steps": 2, "stages": {"onpolicy": 1.0}},
            {"name": "rl", "steps": 1, "stages": {"rl": 1.0}},
        ]},
        "stages": {"onpolicy": {"lmbda": 1.0, "max_new_tokens": 4, "refresh_every": 2},
                   "rl": {"prompts": str(prompts), "prompts_per_step": 2, "samples_per_prompt": 2,
                          "max_new_tokens": 4, "kl_weight": 0.1,
                          "verifier": {"name": "regex_format", "options": {"pattern": ".*"}}}},
        "optim": {"lr": 1e-3, "grad_accum": 2},
        "eval": {"every": 5, "path": str(held_out), "max_batches": 2},
        "train": {"progress": False},
    }


@pytest.mark.slow
def test_a_chat_teacher_and_student_run_every_stage_generate_and_eval_on_conversations(tmp_path):
    # catches: any stage, hkd generate or hkd eval that cannot take conversational data or a chat
    # template end to end (text round trips, masks, stop tokens, a template never applied)
    from hkd.cli import main
    from hkd.plugins.loggers import read_metrics

    dirs = write_chat_models(tmp_path / "models")
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": c} for c in CONVERSATIONS * 2])
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [{"messages": c} for c in CONVERSATIONS[1:]])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": f"p{i}", "prompt": c[:-1], "answer": c[-1]["content"]} for i, c in enumerate(CONVERSATIONS)])
    from hkd.train.loop import distill

    result = distill(from_dict(Config, chat_run_config(dirs, data, prompts, held_out)), tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 5 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert "eval/kl" in metrics[-1] and "metric/reward" in metrics[-1] and metrics[2]["metric/onpolicy_steps"] == 1
    (tmp_path / "gen.yaml").write_text(json.dumps({
        "teacher": {"path": str(dirs["teacher"])}, "prompts": "prompts.jsonl", "output": "distilled.jsonl",
        "n": 2, "max_new_tokens": 4, "filters": {"require_answer": False}}))
    assert main(["generate", str(tmp_path / "gen.yaml"), "--no-progress"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "distilled.jsonl").read_text().splitlines()]
    assert lines and all(line["messages"][:-1] == line["prompt"] and line["messages"][-1]["role"] == "assistant"
                         for line in lines)
    # the generated conversations train directly (data.messages_field: messages)
    again = chat_run_config(dirs, tmp_path / "distilled.jsonl", prompts, held_out)
    again["schedule"] = {"phases": [{"name": "sft", "steps": 1, "stages": {"logits": 1.0}}]}
    again["eval"] = {"every": 0}
    distill(from_dict(Config, again), tmp_path / "run2")
    (tmp_path / "eval.yaml").write_text(json.dumps({
        "model": {"path": str(result.final_dir)}, "teacher": {"path": str(dirs["teacher"])}, "output": "eval.json",
        "prompts": {"path": "prompts.jsonl", "n": 2, "k": [1], "max_new_tokens": 4,
                    "verifiers": [{"name": "regex_format", "options": {"pattern": "(?s).*"}}]},
        "text": {"kind": "jsonl", "path": "held_out.jsonl", "messages_field": "messages"}}))
    assert main(["eval", str(tmp_path / "eval.yaml"), "--no-progress"]) == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["pass_at_k"]["pass@1"] == 1.0 and results["text"]["tokens"] > 0


def test_the_teacher_cache_keys_conversations_by_their_token_ids(tmp_path):
    # catches: a cache built on conversations that training reads back differently from the live teacher,
    # or one reused after the chat template changed the token ids (its targets would sit on other tokens)
    import shutil

    from transformers import AutoTokenizer

    from hkd.teachers.cache import build_cache
    from hkd.train.loop import distill

    dirs = write_chat_models(tmp_path / "models")
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": c} for c in CONVERSATIONS * 2])
    raw = {"teacher": {"path": str(dirs["teacher"])}, "student": {"path": str(dirs["student"])},
           "data": {"kind": "jsonl", "path": str(data), "messages_field": "messages", "batch_size": 2,
                    "max_length": 128},
           "schedule": {"phases": [{"name": "kd", "steps": 2, "stages": {"logits": 1.0}}]},
           "optim": {"grad_accum": 1}, "train": {"progress": False}}
    # top-k of V - 1 with the exact tail bucket: the teacher's whole distribution (k = V itself gives an
    # infinite loss with the bucket tail, a kernel edge case outside this test)
    build_cache(from_dict(Config, raw), tmp_path / "cache", top_k=len(chat_tokenizer()) - 1, progress=False,
                work_dir=tmp_path / "work")
    live = distill(from_dict(Config, raw), tmp_path / "live")
    cached = distill(from_dict(Config, dict(raw, teacher_cache=str(tmp_path / "cache"))), tmp_path / "cached")
    assert cached.last_metrics["loss/logits"] == pytest.approx(live.last_metrics["loss/logits"], rel=1e-4)
    other = tmp_path / "other-student"
    shutil.copytree(dirs["student"], other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.chat_template = tok.chat_template.replace("message['content']", "message['content'] | upper")
    tok.save_pretrained(other)
    changed = dict(raw, teacher_cache=str(tmp_path / "cache"), student={"path": str(other)})
    with pytest.raises(HkdError, match=r"built for a different setup: data"):
        distill(from_dict(Config, changed), tmp_path / "changed")
