"""The sentence stage (hkd/plugins/sentence.py) against a hand-computed fp64 reference on tiny BERTs."""

from __future__ import annotations

import math

import pytest
import torch

from hkd.data.encoding import collate, encode
from hkd.errors import ConfigError, HkdError
from hkd.models.loading import build_preset, wordpiece_tokenizer
from hkd.plugins.sentence import SentenceStage, SentenceStageConfig
from hkd.plugin.stage import StepState
from hkd.models.taps import forward_with_taps
from tests.plugins.helpers import context

TEXTS = ["the teacher model encodes each sentence", "a smaller student", "similar sentences get similar vectors here"]


@pytest.fixture(scope="module")
def pair():
    teacher = build_preset("tiny-bert", {"num_hidden_layers": 3}, seed=1).eval()
    student = build_preset("tiny-bert", {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64,
                                         "num_attention_heads": 2}, seed=2).eval()  # eval: no dropout in the comparison
    return teacher, student


def bert_batch(texts=TEXTS):
    tok = wordpiece_tokenizer()
    return collate([encode(tok, "", text, 32) for text in texts], tok.pad_token_id, causal=False)


def stage_terms(stage, pair, batch, micro_batches=1):
    teacher, student = pair
    with torch.no_grad():
        t_view = forward_with_taps(teacher, batch, stage.teacher_request())
    s_view = forward_with_taps(student, batch, stage.student_request())
    state = StepState(step=0, temperature=1.0, tokens=int(batch["loss_mask"].sum()), micro_batches=micro_batches)
    return stage.loss(batch, t_view, s_view, state)


def reference(pair, batch, config, projector, micro_batches):
    """fp64, row by row: pool the model's own last_hidden_state over each row's real tokens."""
    teacher, student = pair
    lengths = batch["attention_mask"].sum(1).tolist()
    embeddings = []
    for model in (teacher, student):
        with torch.no_grad():
            hidden = model.double()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        model.float()
        rows = [hidden[r, 0] if config.pooling == "cls" else hidden[r, :n].sum(0) / n for r, n in enumerate(lengths)]
        embeddings.append(rows)
    t_rows, s_rows = embeddings
    weight = projector.detach().double() if projector is not None else None
    total = 0.0
    for t, s in zip(t_rows, s_rows):
        mapped = weight @ s if weight is not None else s
        if config.loss == "cosine":
            total += 1 - float(mapped @ t) / math.sqrt(float(mapped @ mapped) * float(t @ t))
        else:
            total += float(((mapped - t) ** 2).mean())
    terms = {"sentence": total / (len(lengths) * micro_batches)}
    if config.similarity:
        def cos(a, b):
            return float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))
        gaps = [(cos(s_rows[i], s_rows[j]) - cos(t_rows[i], t_rows[j])) ** 2
                for i in range(len(lengths)) for j in range(len(lengths))]
        terms["similarity"] = config.similarity * sum(gaps) / len(gaps) / micro_batches
    return terms


@pytest.mark.parametrize("pooling,loss", [("mean", "cosine"), ("mean", "mse"), ("cls", "cosine"), ("cls", "mse")])
def test_loss_matches_an_fp64_reference(pair, pooling, loss):
    """Catches: padding counted in the mean pool, pooling a layer other than the last, the projector left out or
    applied to the similarity matrix, per-sentence losses not averaged over the step's sentences."""
    config = SentenceStageConfig(pooling=pooling, loss=loss, similarity=0.5)
    torch.manual_seed(0)
    stage = SentenceStage(config, context(*pair, name="sentence"))
    assert stage.projector is not None  # widths 32 -> 64
    batch = bert_batch()
    assert batch["attention_mask"].sum(1).unique().numel() == 3  # three lengths: padding matters
    got = stage_terms(stage, pair, batch, micro_batches=2)
    want = reference(pair, batch, config, stage.projector.weight, micro_batches=2)
    assert set(got) == set(want)
    for key in want:
        assert float(got[key].detach()) == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


def test_gradients_reach_the_student_and_the_projector(pair):
    """Catches: a pooled embedding computed from detached hidden states (the stage would train nothing)."""
    stage = SentenceStage(SentenceStageConfig(similarity=1.0), context(*pair, name="sentence"))
    terms = stage_terms(stage, pair, bert_batch())
    sum(terms.values()).backward()
    student = pair[1]
    assert stage.projector.weight.grad is not None and stage.projector.weight.grad.abs().sum() > 0
    assert student.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    student.zero_grad(set_to_none=True)


def test_two_micro_batches_sum_to_one_big_batch(pair):
    """Catches: each micro-batch's sentence loss averaged over its own rows only, so grad_accum: 2 would double it."""
    stage = SentenceStage(SentenceStageConfig(loss="mse"), context(*pair, name="sentence"))
    texts = TEXTS + ["knowledge distillation transfers what a large network has learned"]
    whole = float(stage_terms(stage, pair, bert_batch(texts))["sentence"].detach())
    halves = sum(float(stage_terms(stage, pair, bert_batch(part), micro_batches=2)["sentence"].detach())
                 for part in (texts[:2], texts[2:]))
    assert halves == pytest.approx(whole, rel=1e-5)


def test_equal_widths_use_no_projector_unless_asked():
    """Catches: a projector added between equal widths (a random map the student must first undo)."""
    teacher = build_preset("tiny-bert", {"num_hidden_layers": 2}, seed=1)
    student = build_preset("tiny-bert", {"num_hidden_layers": 1}, seed=2)
    assert SentenceStage(SentenceStageConfig(), context(teacher, student, name="sentence")).projector is None
    assert SentenceStage(SentenceStageConfig(projector="linear"), context(teacher, student, name="sentence")).projector is not None


def test_bad_options_are_refused_by_name(pair):
    """Catches: projector: none silently comparing 32- and 64-wide vectors, a negative similarity weight, and packed
    rows (several sentences pooled as one)."""
    with pytest.raises(ConfigError, match=r"stages\.sentence\.projector: 'none' needs equal widths, student 32 vs teacher 64"):
        SentenceStage(SentenceStageConfig(projector="none"), context(*pair, name="sentence"))
    with pytest.raises(ConfigError, match=r"stages\.sentence\.similarity: must be >= 0"):
        SentenceStage(SentenceStageConfig(similarity=-1.0), context(*pair, name="sentence"))
    stage = SentenceStage(SentenceStageConfig(), context(*pair, name="sentence"))
    batch = bert_batch()
    batch["position_ids"] = torch.zeros_like(batch["input_ids"])
    with pytest.raises(HkdError, match=r"stages\.sentence: data\.packing puts several sentences in one row"):
        stage.loss(batch, None, None, StepState(step=0, temperature=1.0, tokens=1))  # type: ignore[arg-type]
