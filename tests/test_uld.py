"""Distillation across tokenizers: ULD and span alignment against independent references.

References: a direct fp64 computation in plain Python (sorted lists, explicit sums) for the
distance, finite differences (gradcheck) for its gradient, hand-made token spans for the
alignment, prefix text equality for every aligned prediction, and the ordinary forward KL
(the kernels' torch reference) for the stage when both tokenizers are the same.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hkd import kernels
from hkd.tasks.arith import make_problems
from hkd.data.encoding import collate, encode
from hkd.errors import HkdError
from hkd.models.loading import build_preset, char_tokenizer, check_compatible
from hkd.plugins.uld import UldStage, UldStageConfig
from hkd.plugin.stage import StageContext, StepState
from hkd.data.tokenalign import VocabMatch, align_spans, cross_vocab_distance, retokenize, train_bpe_tokenizer
from hkd.models.view import ModelView

TEXTS = [p.prompt + p.worked_solution() for p in make_problems(300, 2, 0)]


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, object]:
    return {"bpe300": train_bpe_tokenizer(TEXTS, 300), "bpe400": train_bpe_tokenizer(TEXTS, 400),
            "char": char_tokenizer()}


def _reference_distance(q_logits: list[float], p_logits: list[float], pairs: list[tuple[int, int]], shared: str,
                        temperature: float, firsts: tuple[list[int], list[int]] = ([], [])) -> float:
    """fp64 by hand: softmax, the shared entries entry by entry (or summed per first character), the rest sorted."""
    def softmax(z: list[float]) -> list[float]:
        top = max(z)
        e = [math.exp((x - top) / temperature) for x in z]
        return [x / sum(e) for x in e]

    q, p = softmax(q_logits), softmax(p_logits)
    direct = 0.0
    if shared == "first_char":
        q1: dict[int, float] = {}
        p1: dict[int, float] = {}
        for probs, classes, sums in ((q, firsts[0], q1), (p, firsts[1], p1)):
            for x, c in zip(probs, classes):
                if c >= 0:
                    sums[c] = sums.get(c, 0.0) + x
        for c in set(q1) & set(p1):  # a class only one side can produce is left out
            a, b = p1.get(c, 0.0), q1.get(c, 0.0)
            direct += (a * math.log(a / b) if a > 0 else 0.0) - a + b
        shared = "none"
    if shared != "none":
        for s, t in pairs:
            direct += p[t] * math.log(p[t] / q[s]) - p[t] + q[s] if shared == "kl" else abs(p[t] - q[s])
    s_shared = {s for s, _ in pairs} if shared != "none" else set()
    t_shared = {t for _, t in pairs} if shared != "none" else set()
    q_rest = sorted((x for i, x in enumerate(q) if i not in s_shared), reverse=True)
    p_rest = sorted((x for i, x in enumerate(p) if i not in t_shared), reverse=True)
    width = max(len(q_rest), len(p_rest))
    q_rest += [0.0] * (width - len(q_rest))
    p_rest += [0.0] * (width - len(p_rest))
    return direct + sum(abs(a - b) for a, b in zip(q_rest, p_rest))


@pytest.mark.parametrize("shared", ["kl", "l1", "none", "first_char"])
def test_distance_matches_direct_fp64_value_and_gradient(shared: str) -> None:
    # catches: sorting ascending on one side, padding the wrong side, comparing shared entries
    # again inside ULD (double counting), the temperature applied after softmax, plain KL on
    # sub-distributions (can go negative), first-character sums over the wrong entries (or
    # counting the dropped ones), and a sort or scatter that blocks the gradient
    g = torch.Generator().manual_seed(0)
    student = torch.randn(5, 11, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(5, 17, generator=g, dtype=torch.float64) * 2
    pairs = [(0, 3), (4, 0), (7, 16), (10, 9)]
    student_first = [0, 1, 2, -1, 0, 3, 1, 2, 2, -1, 4]  # first-character classes; -1: none (partial bytes)
    teacher_first = [1, 0, 0, 2, -1, 3, 3, 1, 2, 0, 1, 1, 2, -1, 0, 3, 5]  # class 5: the teacher's alone
    match = VocabMatch(torch.tensor([s for s, _ in pairs]), torch.tensor([t for _, t in pairs]),
                       torch.tensor(student_first), torch.tensor(teacher_first), 6)
    got = cross_vocab_distance(student, teacher, match, temperature=1.7, shared=shared)  # type: ignore[arg-type]
    expected = [_reference_distance(student[r].tolist(), teacher[r].tolist(), pairs, shared, 1.7,
                                    (student_first, teacher_first)) for r in range(5)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert (got >= 0).all()
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: cross_vocab_distance(s, teacher, match, temperature=1.7, shared=shared), (student,))  # type: ignore[arg-type]


def test_identical_vocabularies_give_forward_kl() -> None:
    # catches: a distance that does not reduce to the standard logits KD when nothing differs
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 13, generator=g), torch.randn(6, 13, generator=g)
    same = VocabMatch(torch.arange(13), torch.arange(13))
    expected = kernels.distill_loss(student, teacher, temperature=2.0, scale_t2=False, reduction="none",
                                    backend="torch")
    torch.testing.assert_close(cross_vocab_distance(student, teacher, same, 2.0, "kl"), expected, rtol=1e-5, atol=1e-6)


def test_align_spans_hand_made() -> None:
    # catches: closing a span at the first boundary of one side only, and losing the last span
    # "abcdef": student "ab" "c" "def" (ends 2 3 6); teacher "a" "bc" "d" "ef" (ends 1 3 4 6)
    assert align_spans([2, 3, 6], [1, 3, 4, 6]) == [(range(0, 2), range(0, 2)), (range(2, 3), range(2, 4))]
    assert align_spans([1, 2, 3], [1, 2, 3]) == [(range(i, i + 1), range(i, i + 1)) for i in range(3)]
    assert align_spans([6], [1, 2, 3, 4, 5, 6]) == [(range(0, 1), range(0, 6))]
    with pytest.raises(HkdError, match="different text lengths"):
        align_spans([2, 4], [2, 5])


def test_retokenized_pairs_predict_from_the_same_text(tokenizers: dict[str, object]) -> None:
    # catches: an off-by-one between the token a span starts with and the position predicting it,
    # specials mapped to the wrong role, prompt tokens counted as targets, and teacher text that
    # differs from the student's (a tokenizer that merges across the prompt/completion boundary)
    student_tok = tokenizers["bpe300"]
    for name in ("bpe400", "char"):
        teacher_tok: object = tokenizers[name]
        for problem in make_problems(20, 2, 7):
            ids, labels = encode(student_tok, problem.prompt, problem.worked_solution(), 64)
            result = retokenize(ids, labels, student_tok, teacher_tok)
            text = student_tok.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]
            assert teacher_tok.decode(result.teacher_ids, skip_special_tokens=True) == text  # type: ignore[attr-defined]
            assert result.teacher_ids[0] == teacher_tok.bos_token_id  # type: ignore[attr-defined]
            assert result.teacher_ids[-1] == teacher_tok.eos_token_id  # type: ignore[attr-defined]
            for s, t in result.pairs:
                assert labels[s + 1] != -100
                s_prefix = student_tok.decode(ids[: s + 1], skip_special_tokens=True)  # type: ignore[attr-defined]
                t_prefix = teacher_tok.decode(result.teacher_ids[: t + 1], skip_special_tokens=True)  # type: ignore[attr-defined]
                assert s_prefix == t_prefix
            # independent count: student target tokens starting where the teacher also starts a token
            targets = [k for k in range(1, len(ids)) if labels[k] != -100]
            t_starts = {len(teacher_tok.decode(result.teacher_ids[:j], skip_special_tokens=True))  # type: ignore[attr-defined]
                        for j in range(1, len(result.teacher_ids))}
            starts = [len(student_tok.decode(ids[:k], skip_special_tokens=True)) for k in targets]  # type: ignore[attr-defined]
            expected = sum(1 for k, c in zip(targets, starts) if c in t_starts and ids[k] != student_tok.eos_token_id)
            assert len(result.pairs) == expected + 1  # + the eos, matched by role
            if name == "char":  # every student token starts at a character: all targets align
                assert len(result.pairs) == len(targets)


def _llama(tokenizer: object, seed: int) -> torch.nn.Module:
    return build_preset("tiny-llama", {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,  # type: ignore[arg-type]
                                       "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1},
                        seed=seed)


def _stage(teacher: torch.nn.Module, student: torch.nn.Module, teacher_tok: object, student_tok: object,
           tmp_path: Path, **options: object) -> UldStage:
    teacher_tok.save_pretrained(tmp_path / "teacher-tok")  # type: ignore[attr-defined]
    config = UldStageConfig(teacher_tokenizer=str(tmp_path / "teacher-tok"), **options)  # type: ignore[arg-type]
    return UldStage(config, StageContext("uld", teacher, student, {}, "stages.uld", tokenizer=student_tok))


def _batch(tokenizer: object) -> dict[str, torch.Tensor]:
    rows = [encode(tokenizer, p.prompt, p.worked_solution(), 64) for p in make_problems(4, 2, 11)]
    return collate(rows, tokenizer.pad_token_id)  # type: ignore[attr-defined]


def test_stage_with_one_tokenizer_is_the_logits_stage(tokenizers: dict[str, object], tmp_path: Path) -> None:
    # catches: misaligned teacher positions (shifted by the bos), a wrong normalisation, T^2
    # missing, and the hard-label term mixed in with the wrong weight
    tok = tokenizers["bpe300"]
    teacher, student = _llama(tok, 1).eval(), _llama(tok, 2)
    stage = _stage(teacher, student, tok, tok, tmp_path, alpha=0.3)
    batch = _batch(tok)
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    tokens = int(batch["loss_mask"].sum())
    state = StepState(step=0, temperature=2.0, tokens=tokens)
    got = stage.loss(batch, None, ModelView(logits=logits), state)
    labels = batch["labels"][:, 1:]
    expected = kernels.distill_loss(logits[:, :-1], teacher_logits[:, :-1], labels=labels, temperature=2.0,
                                    alpha=0.3, reduction="sum", backend="torch") / tokens
    torch.testing.assert_close(got["uld"], expected, rtol=1e-5, atol=1e-6)
    assert float(got["metric/uld_aligned"]) == 1.0


def test_stage_across_tokenizers_trains_the_student(tokenizers: dict[str, object], tmp_path: Path) -> None:
    # catches: teacher logits indexed with student positions, gradients cut by the alignment,
    # and a schedule mixing token-by-token stages with different tokenizers slipping through
    student_tok, teacher_tok = tokenizers["bpe300"], tokenizers["char"]
    teacher, student = _llama(teacher_tok, 1).eval(), _llama(student_tok, 2)
    stage = _stage(teacher, student, teacher_tok, student_tok, tmp_path)
    batch = _batch(student_tok)
    state = StepState(step=0, temperature=1.0, tokens=int(batch["loss_mask"].sum()))
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        terms = stage.loss(batch, None, ModelView(logits=logits), state)
        optimizer.zero_grad()
        terms["uld"].backward()
        optimizer.step()
        losses.append(float(terms["uld"].detach()))
    assert float(terms["metric/uld_aligned"]) == 1.0  # char-level teacher: every student token starts a span
    assert losses[-1] < 0.7 * losses[0]

    check_compatible(teacher, student, teacher_tok, student_tok, {"uld": True})
    with pytest.raises(HkdError, match=r"stage\(s\) \['hidden'\] compare token by token.*uld"):
        check_compatible(teacher, student, teacher_tok, student_tok, {"uld": True, "hidden": False})
    with pytest.raises(HkdError, match="vocabulary mismatch"):
        check_compatible(teacher, student, teacher_tok, student_tok)
