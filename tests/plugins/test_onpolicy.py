"""On-policy distillation stage (GKD): prompts from the batch, the loss on the student's own samples
against an fp64 reference, the lambda coin, the refreshed sampling policy, config errors, and a
run that resumes bit-exactly."""

from __future__ import annotations

import json

import pytest
import torch

from hkd.config import Config, ConfigError, from_dict
from hkd.train.loop import distill
from hkd.plugin.manager import build_manager
from hkd.plugin.hookspecs import hookimpl
from hkd.models.loading import char_tokenizer
from hkd.plugins.logits import LogitsStage, LogitsStageConfig
from hkd.plugins.onpolicy import OnPolicyStage, OnPolicyStageConfig, batch_prompts
from hkd.data.chat import encode_conversation
from hkd.data.encoding import collate
from hkd.sampling.backends import GenerationBackendSpec, PromptBatch, build_generation_backend
from hkd.sampling.hf_sampler import sample
from hkd.train.seeding import derive_seed
from hkd.plugin.stage import StageContext, StepState
from tests.conftest import BASE_CONFIG
from tests.plugins.helpers import batch, models, run_stage


def stage(config: OnPolicyStageConfig, teacher, student, **context) -> OnPolicyStage:
    return OnPolicyStage(config, StageContext("onpolicy", teacher, student, {}, "stages.onpolicy",
                                              tokenizer=char_tokenizer(), **context))


def test_prompts_are_each_rows_token_ids_before_its_first_target():
    # catches: an off-by-one that leaks the first completion token into the prompt (or drops the
    # prompt's last token), padding kept, or the prompt decoded to text and re-encoded
    tok = char_tokenizer()
    b = batch(texts=("12+34=", "7+8="), completions=("46", "15 ok"))
    got = batch_prompts(b)
    assert isinstance(got, PromptBatch)
    assert got.ids == [[tok.bos_token_id] + tok("12+34=", add_special_tokens=False)["input_ids"],
                       [tok.bos_token_id] + tok("7+8=", add_special_tokens=False)["input_ids"]]


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_chat_prompts_reach_the_sampler_as_the_templates_own_ids(template):
    # catches: the prompt decoded with skip_special_tokens and re-encoded with a BOS (a ChatML
    # prompt reached the sampler as "<bos>user\n12+34=\nassistant\n"), or a sample that does not
    # stop at the template's end-of-turn token
    from tests.chat import CONVERSATION, END_OF_TURN, chat_models, chat_tokenizer

    tok = chat_tokenizer(template)
    teacher, student = chat_models(tok)
    received = []

    class Spy:
        @hookimpl
        def hkd_add_generation_backends(self):
            def factory(context):
                inner = build_generation_backend(build_manager(), "transformers", context)

                class Backend:
                    def generate(self, prompts, params):
                        received.append((prompts, params))
                        return inner.generate(prompts, params)
                return Backend()
            return [GenerationBackendSpec("spy", factory, "test", takes_token_ids=True)]

    s = OnPolicyStage(OnPolicyStageConfig(lmbda=1.0, max_new_tokens=6, generation_backend="spy"), StageContext(
        "onpolicy", teacher, student, {}, "stages.onpolicy", build_manager(extra_plugins=[("spy", Spy())]), tok))
    conversations = [CONVERSATION[:3], [{"role": "user", "content": "7+8="}, {"role": "assistant", "content": "15"}]]
    b = collate([encode_conversation(tok, c, 128) for c in conversations], tok.pad_token_id)
    terms = s.loss(b, None, None, StepState(step=0, temperature=1.0, tokens=1))
    assert torch.isfinite(terms["onpolicy"])
    (prompts, params), = received
    expected = [tok.apply_chat_template(c[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
                for c in conversations]
    assert prompts.ids == [list(e) for e in expected]
    assert params.stop_token_ids == (tok.convert_tokens_to_ids(END_OF_TURN[template]),)


def reference_reverse_kl(student, teacher, samples, temperature: float, skew: float = 0.0) -> torch.Tensor:
    """fp64 mean over sampled tokens of T^2 KL(q || skew q + (1 - skew) p), q the student's and p the
    teacher's distribution at T (skew 0: the reverse KL), written from the formula."""
    ids = torch.cat([samples.prompt_ids, samples.completion_ids], 1)
    mask = torch.cat([samples.prompt_mask, samples.completion_mask], 1)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    width = samples.prompt_ids.shape[1]
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        s = student(input_ids=ids, attention_mask=mask, position_ids=positions).logits.double()
        t = teacher(input_ids=ids, attention_mask=mask, position_ids=positions).logits.double()
    for row in range(ids.shape[0]):
        for j in range(samples.completion_ids.shape[1]):
            if samples.completion_mask[row, j] == 0:
                continue
            col = width + j - 1  # the logits that predicted completion token j
            log_q = torch.log_softmax(s[row, col] / temperature, -1)
            log_p = torch.log_softmax(t[row, col] / temperature, -1)
            log_m = torch.log(skew * log_q.exp() + (1 - skew) * log_p.exp())
            total += (log_q.exp() * (log_q - log_m)).sum() * temperature ** 2
            count += 1
    return total / count


@pytest.mark.parametrize("divergence,skew", [("reverse_kl", 0.0), ("skew_reverse_kl", 0.3)])
def test_on_policy_loss_is_the_reverse_kl_on_the_students_own_samples(divergence, skew):
    # catches: scoring the wrong columns (prompt positions or shifted by one), counting padding after
    # EOS, the wrong normalisation, a sample that is not the one the seed draws, or the skew option
    # not reaching the kernel
    teacher, student = models()
    config = OnPolicyStageConfig(lmbda=1.0, max_new_tokens=5, seed=7, divergence=divergence, skew=skew)
    s = stage(config, teacher, student)
    b = batch()
    state = StepState(step=3, temperature=2.0, tokens=999)
    terms = s.loss(b, None, None, state)
    samples = sample(student, char_tokenizer(), ["12+34=", "7+8="], n=1, max_new_tokens=5, temperature=1.0,
                     seed=derive_seed(7, "onpolicy-sample:3:0:0"))
    assert samples.completion_mask.sum() > 2  # the check sees real sampled tokens
    expected = reference_reverse_kl(student, teacher, samples, temperature=2.0, skew=skew)
    torch.testing.assert_close(terms["onpolicy"].double(), expected, rtol=1e-4, atol=1e-6)
    assert terms["metric/onpolicy_steps"].item() == 1.0
    terms["onpolicy"].backward()  # the student is what learns
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_off_policy_steps_equal_logits_kd_on_the_data():
    # catches: an off-policy branch that is not supervised KD on the data's completions
    # (another divergence direction, other positions, or a different normaliser)
    teacher, student = models()
    b = batch()
    mine = stage(OnPolicyStageConfig(lmbda=0.0, divergence="forward_kl"), teacher, student)
    state = StepState(step=0, temperature=1.5, tokens=int(b["loss_mask"].sum()))
    got = mine.loss(b, None, None, state)["onpolicy"]
    logits = LogitsStage(LogitsStageConfig(divergence="forward_kl"), StageContext("logits", teacher, student, {},
                                                                                   "stages.logits"))
    want = run_stage(logits, teacher, student, b, temperature=1.5)["logits"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_lambda_is_the_fraction_of_on_policy_steps_and_the_same_after_a_restart():
    # catches: a coin that ignores lambda, differs between ranks/restarts (it would be drawn from
    # global RNG state), or is inverted
    teacher, student = models()
    for lmbda in (0.0, 0.3, 1.0):
        s = stage(OnPolicyStageConfig(lmbda=lmbda), teacher, student)
        again = stage(OnPolicyStageConfig(lmbda=lmbda), teacher, student)
        torch.manual_seed(123)
        coins = [s.on_policy(step) for step in range(400)]
        assert coins == [again.on_policy(step) for step in range(400)]
        assert abs(sum(coins) / 400 - lmbda) < 0.06


def test_the_sampling_copy_is_refreshed_by_step_count_whatever_the_coin_says():
    # catches: refreshing only when an on-policy step lands on a multiple of refresh_every (with
    # lmbda 0.5 and refresh_every 10 the copy was up to 49 steps old), sampling from live weights
    # between refreshes, or a copy the checkpoint does not carry
    teacher, student = models()
    s = stage(OnPolicyStageConfig(lmbda=0.5, refresh_every=3, max_new_tokens=2, seed=0), teacher, student)
    coins = [s.on_policy(step) for step in range(12)]
    assert not coins[3] and coins[4]  # seed 0: step 3 is a refresh on a data step, step 4 samples
    weights_at = {}
    for step in range(12):
        weights_at[step] = [p.detach().clone() for p in student.parameters()]
        s.loss(batch(), None, None, StepState(step=step, temperature=1.0, tokens=5))
        due = step - step % 3
        assert all(torch.equal(a, b) for a, b in zip(s.policy.parameters(), weights_at[due])), step
        with torch.no_grad():  # an optimizer step
            for p in student.parameters():
                p.add_(0.01)
    assert any(key.startswith("policy.") for key in s.state_dict())
    assert not any(p.requires_grad for p in s.parameters())  # the copy is never trained
    assert stage(OnPolicyStageConfig(refresh_every=1), teacher, student).sampling_model(5) is student


def test_a_stage_resumed_between_refreshes_keeps_the_checkpoints_copy():
    # catches: a resumed stage that re-copies the student at its first step (the uninterrupted run
    # samples from the copy of the last multiple of refresh_every), or one that never refreshes again
    teacher, student = models()
    first = stage(OnPolicyStageConfig(lmbda=1.0, refresh_every=4, max_new_tokens=2), teacher, student)
    first.refresh(4)
    saved = {k: v.clone() for k, v in first.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01)
    resumed = stage(OnPolicyStageConfig(lmbda=1.0, refresh_every=4, max_new_tokens=2), teacher, student)
    resumed.load_state_dict(saved)
    resumed.refresh(6)
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in saved.items())
    resumed.refresh(8)
    assert all(torch.equal(a, b) for a, b in zip(resumed.policy.parameters(), student.parameters()))


def test_bad_onpolicy_config_names_the_option():
    teacher, student = models()
    with pytest.raises(ConfigError, match=r"stages.onpolicy.lmbda: .*\[0, 1\], got 1.5"):
        stage(OnPolicyStageConfig(lmbda=1.5), teacher, student)
    with pytest.raises(ConfigError, match=r"stages.onpolicy.divergence: unknown 'nope'"):
        stage(OnPolicyStageConfig(divergence="nope"), teacher, student)
    with pytest.raises(ConfigError, match=r"stages.onpolicy.skew: must be in \[0, 1\), got 1.0"):
        stage(OnPolicyStageConfig(divergence="skew_reverse_kl", skew=1.0), teacher, student)
    with pytest.raises(ConfigError, match=r"stages.onpolicy.sample_temperature"):
        stage(OnPolicyStageConfig(sample_temperature=0.0), teacher, student)
    with pytest.raises(ConfigError, match=r"stages.onpolicy.refresh_every"):
        stage(OnPolicyStageConfig(refresh_every=0), teacher, student)
    with torch.device("meta"):  # what a teacher_cache run passes: an architecture without weights
        skeleton = type(teacher)(teacher.config)
    with pytest.raises(ConfigError, match=r"stages.onpolicy: .*needs a live teacher"):
        stage(OnPolicyStageConfig(), skeleton, student, teacher_live=False)


def onpolicy_config() -> dict:
    raw = json.loads(json.dumps(BASE_CONFIG))
    raw["schedule"] = {"phases": [{"name": "gkd", "steps": 4, "stages": {"onpolicy": 1.0}}]}
    raw["stages"] = {"onpolicy": {"lmbda": 0.5, "max_new_tokens": 4, "refresh_every": 2, "seed": 1}}
    raw["data"]["num_examples"] = 16
    return raw


def test_an_onpolicy_run_resumes_bit_exactly(tmp_path):
    # catches: a sampling copy missing from the checkpoint, sampling seeds that depend on process
    # state, or a coin drawn from the global RNG — any of them changes the resumed run's samples
    from transformers import AutoModelForCausalLM

    raw = onpolicy_config()
    full = distill(from_dict(Config, raw), tmp_path / "full")
    raw["train"]["checkpoint_every"] = 3

    class StopAfter3:
        @hookimpl
        def hkd_on_checkpoint(self, step):
            if step == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(from_dict(Config, raw), tmp_path / "resumed", pm=build_manager(extra_plugins=[("stop", StopAfter3())]))
    resumed = distill(from_dict(Config, raw), tmp_path / "resumed", resume=True)
    a = AutoModelForCausalLM.from_pretrained(full.final_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed.final_dir).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    metrics = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    # seed 1's coins: the resumed step (index 3) samples on-policy from the copy taken at step 2
    assert [m["metric/onpolicy_steps"] for m in metrics] == [0.0, 1.0, 1.0, 1.0]


def test_samples_come_from_the_configured_backend_which_gets_the_policy_at_each_refresh():
    # catches: a stage that bypasses the generation backend (an engine plugin would never be used),
    # syncs stale or live weights instead of the refreshed copy, or syncs on every step (a full
    # weight transfer per step to an engine)
    from tests.test_generation import Recording

    teacher, student = models()
    recording = Recording()
    pm = build_manager(extra_plugins=[("rec", recording)])
    s = stage(OnPolicyStageConfig(lmbda=1.0, refresh_every=2, max_new_tokens=3, generation_backend="recording"),
              teacher, student, plugins=pm)
    for step in range(5):
        terms = s.loss(batch(), None, None, StepState(step=step, temperature=1.0, tokens=1))
        assert torch.isfinite(terms["onpolicy"]) and terms["onpolicy"].requires_grad
    assert [p.max_new_tokens for p in recording.calls] == [3] * 5
    assert recording.syncs == [s.policy] * 3  # at steps 0, 2 and 4
    with pytest.raises(ConfigError, match=r"stages.onpolicy.generation_backend: unknown generation backend 'vllm'"):
        stage(OnPolicyStageConfig(generation_backend="vllm"), teacher, student, plugins=pm)


def test_packed_rows_are_refused_on_on_policy_steps():
    # catches: sampling from a packed row's first example only (or from all of them glued together)
    teacher, student = models()
    b = batch()
    b["position_ids"] = torch.arange(b["input_ids"].shape[1]).expand_as(b["input_ids"])
    with pytest.raises(ConfigError, match=r"stages.onpolicy: .*packed .*data.packing: false"):
        stage(OnPolicyStageConfig(lmbda=1.0), teacher, student).loss(b, None, None, StepState(0, 1.0, 1))
    off = stage(OnPolicyStageConfig(lmbda=0.0), teacher, student).loss(b, None, None, StepState(0, 1.0, 1))
    assert torch.isfinite(off["onpolicy"])  # data steps use the packed positions as the loop does
