"""Distillation across tokenizers: align two tokenizations of one text, compare distributions over two vocabularies.

**Alignment by character offsets.** Both tokenizations cover the same text. A token's
character span is found by decoding prefixes (``len(decode(ids[:k+1]))`` is where token ``k``
ends), which works for any tokenizer that decodes a prefix of its ids to a prefix of the
text (byte-level BPE, WordPiece without normalisation, character-level). Walking both lists
of token ends together, a *span* closes wherever both have a token boundary at the same
character: the tokens of span ``k`` on each side cover exactly the same text
(:func:`align_spans`). Special tokens (bos, eos, ...) have no text; they are matched by role.

**Which predictions meet.** The prediction for the *first* token of a span is made from the
same text on both sides (everything before the span). So for every span the stage compares
the student's distribution at the position before its first student token with the
teacher's at the position before its first teacher token (:func:`retokenize` returns these
position pairs). Later tokens inside a multi-token span have no teacher prediction made
from the same text; they are left to the hard-label term. (TRL's GOLD instead multiplies the
distributions inside a span and renormalises; comparing only same-prefix predictions keeps
each comparison between two distributions over "what comes next" given identical text.)

**Comparing distributions over different vocabularies** (:func:`cross_vocab_distance`).
Vocabulary entries that decode to the same string in both tokenizers (and specials of the
same role) are *shared* (:class:`VocabMatch`); their probabilities are compared entry by
entry: generalized KL ``sum p log(p/q) - p + q`` (``shared="kl"``: non-negative on
sub-distributions, and exactly the forward KL when every entry is shared, i.e. the same
tokenizer) or ``|p - q|`` (``shared="l1"``). The remaining entries are compared by
**Universal Logit Distillation** (Boizard et al. 2024): sort each side's probabilities in
decreasing order, pad the shorter with zeros and take ``sum_i |p_(i) - q_(i)|``, the
Wasserstein-1 distance between the two sorted distributions, which needs no correspondence
between tokens. ``shared="none"`` applies ULD to the whole vocabularies (the original ULD).
``shared="first_char"`` compares, instead of shared entries, the probability of each *first
character* of the next token (each side's entries summed by the character their text starts
with; specials by role; a character only one side can start a token with is left out), by
generalized KL, plus ULD over the whole vocabularies. Entry-by-entry matching treats the
student's ``1`` and the teacher's ``1`` as the same event, but for a student that also has
``12`` they are not (the teacher's ``1`` covers the student's ``12``); summing by first
character compares the same event on both sides (exactly, against a character-level teacher).
On the demo (``bench/cross_tokenizer.py``) entry-by-entry ``kl`` pulled a BPE student towards
single-character tokens it then could not continue.
As in GOLD, shared entries are compared directly and the rest through ULD; unlike GOLD's
JSD on the shared part, the default generalized KL makes the loss reduce to the ordinary
logits KD when both tokenizers are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from hkd.data.labels import IGNORE_INDEX
from hkd.errors import HkdError

SPECIAL_ROLES = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
Shared = Literal["kl", "l1", "none", "first_char"]


def token_ends(tokenizer: Any, ids: list[int]) -> list[int]:
    """Character offset where each token ends in ``decode(ids)`` (prefix decoding)."""
    return [len(tokenizer.decode(ids[: k + 1], clean_up_tokenization_spaces=False)) for k in range(len(ids))]


def align_spans(student_ends: list[int], teacher_ends: list[int]) -> list[tuple[range, range]]:
    """Spans of tokens covering the same text: ``[(student token range, teacher token range), ...]``.

    ``*_ends`` are the character offsets where each token ends (increasing; both reach the
    text's length). A span closes where both sides end a token at the same character.
    """
    if (student_ends[-1:] or [0]) != (teacher_ends[-1:] or [0]):
        raise HkdError(f"align_spans: the tokenizations cover different text lengths "
                       f"({student_ends[-1:] or [0]} vs {teacher_ends[-1:] or [0]})")
    spans: list[tuple[range, range]] = []
    i = j = i0 = j0 = 0
    while i < len(student_ends) and j < len(teacher_ends):
        if student_ends[i] == teacher_ends[j]:
            spans.append((range(i0, i + 1), range(j0, j + 1)))
            i0, j0 = i + 1, j + 1
            i, j = i0, j0
        elif student_ends[i] < teacher_ends[j]:
            i += 1
        else:
            j += 1
    return spans


def _special_roles(tokenizer: Any) -> dict[int, str]:
    return {int(getattr(tokenizer, role)): role for role in SPECIAL_ROLES if getattr(tokenizer, role, None) is not None}


@dataclass
class VocabMatch:
    """Entries of two vocabularies that mean the same text: ``student_ids[k]`` <-> ``teacher_ids[k]``."""

    student_ids: Tensor  # [M] int64
    teacher_ids: Tensor  # [M] int64
    # for shared="first_char": each entry's first character (specials: their role) as a class index, -1 for none
    student_first: Tensor | None = None  # [len(student tokenizer)]
    teacher_first: Tensor | None = None  # [len(teacher tokenizer)]
    first_classes: int = 0  # number of first-character classes

    @classmethod
    def build(cls, student_tok: Any, teacher_tok: Any) -> VocabMatch:
        """Match by decoded string and specials by role. Entries that decode to the replacement
        character are partial UTF-8 bytes: those match only each other, by their raw token string
        (two byte-level BPEs share the byte alphabet)."""
        def by_text(tokenizer: Any) -> dict[str, int]:
            specials = set(_special_roles(tokenizer)) | set(getattr(tokenizer, "all_special_ids", []))
            ids = [i for i in range(len(tokenizer)) if i not in specials]
            texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
            found: dict[str, int] = {}
            for i, text in zip(ids, texts):
                if "\ufffd" in text:
                    found.setdefault("\x00partial:" + str(tokenizer.convert_ids_to_tokens(i)), i)
                elif text:
                    found.setdefault(text, i)
            return found

        student_text, teacher_text = by_text(student_tok), by_text(teacher_tok)
        pairs = [(student_text[t], teacher_text[t]) for t in student_text if t in teacher_text]
        teacher_roles = {role: i for i, role in _special_roles(teacher_tok).items()}
        pairs += [(i, teacher_roles[role]) for i, role in _special_roles(student_tok).items() if role in teacher_roles]
        pairs = sorted(set(pairs))
        classes: dict[str, int] = {}

        def first_chars(tokenizer: Any) -> Tensor:
            roles = _special_roles(tokenizer)
            texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)
            first = []
            for i, text in enumerate(texts):
                key = f"\x00{roles[i]}" if i in roles else (text[0] if text and text[0] != "\ufffd" else None)
                first.append(-1 if key is None else classes.setdefault(key, len(classes)))
            return torch.tensor(first, dtype=torch.long)

        student_first, teacher_first = first_chars(student_tok), first_chars(teacher_tok)
        return cls(torch.tensor([s for s, _ in pairs], dtype=torch.long),
                   torch.tensor([t for _, t in pairs], dtype=torch.long), student_first, teacher_first, len(classes))


def _uld(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """Per row ``sum_i |sort(q)_i - sort(p)_i|`` with both sorted decreasingly, the shorter padded with 0."""
    student_sorted = student_probs.sort(dim=-1, descending=True).values
    teacher_sorted = teacher_probs.sort(dim=-1, descending=True).values
    width = max(student_sorted.shape[-1], teacher_sorted.shape[-1])
    student_sorted = torch.nn.functional.pad(student_sorted, (0, width - student_sorted.shape[-1]))
    teacher_sorted = torch.nn.functional.pad(teacher_sorted, (0, width - teacher_sorted.shape[-1]))
    return (student_sorted - teacher_sorted).abs().sum(-1)


def _by_class(probs: Tensor, classes: Tensor, count: int) -> Tensor:
    """``[N, count]``: probability summed over the entries of each class (entries at -1 or beyond ``classes`` dropped)."""
    index = torch.full((probs.shape[-1],), count, dtype=torch.long, device=probs.device)  # column ``count``: dropped
    width = min(probs.shape[-1], classes.numel())
    index[:width] = torch.where(classes[:width] < 0, count, classes[:width]).to(probs.device)
    return probs.new_zeros(probs.shape[0], count + 1).index_add(1, index, probs)[:, :-1]


def cross_vocab_distance(student_logits: Tensor, teacher_logits: Tensor, match: VocabMatch | None,
                         temperature: float = 1.0, shared: Shared = "kl") -> Tensor:
    """Per-row distance ``[N]`` between student ``[N, Vs]`` and teacher ``[N, Vt]`` distributions at ``temperature``.

    Shared entries (``match``) compared directly (``shared``), every other entry through ULD.
    Computed in fp32 (or the inputs' dtype when wider); gradients flow to the student logits.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student_logp = (student_logits.to(dtype) / temperature).log_softmax(-1)
    teacher_logp = (teacher_logits.to(dtype) / temperature).log_softmax(-1)
    if shared == "first_char":
        if match is None or match.student_first is None or match.teacher_first is None:
            raise HkdError("cross_vocab_distance: shared='first_char' needs a VocabMatch built from both tokenizers")
        # a first character only one vocabulary can start with is unreachable for the other: left out
        both = torch.zeros(match.first_classes + 1, dtype=torch.bool).index_fill_(0, match.student_first + 1, True)
        both &= torch.zeros_like(both).index_fill_(0, match.teacher_first + 1, True)
        both = both[1:].to(student_logits.device)
        # classes outside ``both`` are zeroed, not removed (no boolean-mask selection): they add 0 below
        q1 = _by_class(student_logp.exp(), match.student_first, match.first_classes).masked_fill(~both, 0.0)
        p1 = _by_class(teacher_logp.exp(), match.teacher_first, match.first_classes).masked_fill(~both, 0.0)
        direct = (torch.where(p1 > 0, p1 * (p1.clamp_min(1e-30).log() - q1.clamp_min(1e-30).log()), 0.0) - p1 + q1)
        return direct.sum(-1) + _uld(student_logp.exp(), teacher_logp.exp())
    if shared == "none" or match is None or match.student_ids.numel() == 0:
        return _uld(student_logp.exp(), teacher_logp.exp())
    device = student_logits.device
    s_ids, t_ids = match.student_ids.to(device), match.teacher_ids.to(device)
    q_logp, p_logp = student_logp[:, s_ids], teacher_logp[:, t_ids]
    q, p = q_logp.exp(), p_logp.exp()
    if shared == "kl":
        direct = (torch.where(p > 0, p * (p_logp - q_logp), 0.0) - p + q).sum(-1)
    elif shared == "l1":
        direct = (p - q).abs().sum(-1)
    else:
        raise HkdError(f"cross_vocab_distance: shared must be kl, l1 or none, got {shared!r}")
    s_rest = torch.ones(student_logits.shape[-1], dtype=torch.bool, device=device)
    t_rest = torch.ones(teacher_logits.shape[-1], dtype=torch.bool, device=device)
    s_rest[s_ids] = False
    t_rest[t_ids] = False
    # the shared entries are zeroed rather than removed (a boolean-mask selection would wait for the device to
    # count them): sorted decreasingly they are trailing zeros on both sides, which add nothing to the ULD sum
    return direct + _uld(student_logp.exp().masked_fill(~s_rest, 0.0), teacher_logp.exp().masked_fill(~t_rest, 0.0))


@dataclass
class Retokenized:
    """One student row re-encoded for the teacher, with the positions whose predictions meet."""

    teacher_ids: list[int]
    pairs: list[tuple[int, int]]  # (student position, teacher position): both predict the first token of a span
    spans: int  # aligned spans over student target tokens


def _items(ids: list[int], labels: list[int], specials: dict[int, str]) -> list[tuple[str, list[int]]]:
    """Split a row into ("special:<role>", [id]) and ("text", [ids]) items; text never crosses prompt/completion."""
    items: list[tuple[str, list[int]]] = []
    for k, token in enumerate(ids):
        if token in specials:
            items.append((f"special:{specials[token]}", [k]))
        elif items and items[-1][0] == "text" and (labels[k] == IGNORE_INDEX) == (labels[items[-1][1][-1]] == IGNORE_INDEX):
            items[-1][1].append(k)
        else:
            items.append(("text", [k]))
    return items


def retokenize(ids: list[int], labels: list[int], student_tok: Any, teacher_tok: Any) -> Retokenized:
    """Re-encode a student row (prompt and completion text, specials by role) with the teacher's tokenizer.

    Prompt and completion are tokenized separately on both sides (as :func:`hkd.data.encoding.encode`
    does), so no token crosses that boundary. A teacher tokenizer that does not decode its own
    encoding back to the text (normalisation, lowercasing) cannot be aligned and is an error.
    """
    student_specials = _special_roles(student_tok)
    teacher_roles = {role: i for i, role in _special_roles(teacher_tok).items()}
    teacher_ids: list[int] = []
    pairs: list[tuple[int, int]] = []
    spans = 0
    for kind, positions in _items(ids, labels, student_specials):
        if kind.startswith("special:"):
            role = kind.split(":", 1)[1]
            if role in teacher_roles:  # the teacher has this special: its prediction meets the student's
                if positions[0] > 0 and teacher_ids and labels[positions[0]] != IGNORE_INDEX:
                    pairs.append((positions[0] - 1, len(teacher_ids) - 1))
                    spans += 1
                teacher_ids.append(teacher_roles[role])
            continue
        piece = [ids[k] for k in positions]
        text = student_tok.decode(piece, clean_up_tokenization_spaces=False)
        encoded = teacher_tok(text, add_special_tokens=False)["input_ids"]
        if teacher_tok.decode(encoded, clean_up_tokenization_spaces=False) != text:
            raise HkdError(f"the teacher's tokenizer does not decode its encoding of {text[:40]!r} back to the same "
                           "text (normalisation?); character alignment needs exact round trips")
        offset = len(teacher_ids)
        for s_range, t_range in align_spans(token_ends(student_tok, piece), token_ends(teacher_tok, encoded)):
            s_first, t_first = positions[s_range.start], offset + t_range.start
            if s_first > 0 and t_first > 0 and labels[s_first] != IGNORE_INDEX:
                pairs.append((s_first - 1, t_first - 1))
                spans += 1
        teacher_ids.extend(encoded)
    return Retokenized(teacher_ids, pairs, spans)


def train_bpe_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` with hkd's special tokens (tests, benchmarks)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hkd.models.loading import SPECIAL_TOKENS

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")
