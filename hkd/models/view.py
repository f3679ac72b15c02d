"""What a stage asks of a model (:class:`TapRequest`) and what it gets back (:class:`ModelView`).

Both sides of a distillation step are views: the student's comes from its own forward pass,
the teacher's from a :class:`hkd.teachers.sources.TeacherSource` (a live forward, or the offline
cache). Layers are numbered 0 = embeddings output, k = output of block k.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from hkd.models.taps import QKV


@dataclass
class TapRequest:
    """What one model's forward must expose. Empty means: no forward at all."""

    hidden: set[int] = field(default_factory=set)  # hidden-state layers (0 = embeddings)
    attention: set[int] = field(default_factory=set)  # blocks whose q/k/v (attention maps) are recorded
    logits: bool = False  # full logits from the model's LM head
    final_hidden: bool = False  # input of the LM head (for the fused logits loss)
    sparse_logits: bool = False  # top-k teacher targets (:class:`SparseTargets`), e.g. from an offline cache
    # with the sparse targets, the teacher's log-normaliser at the run's temperature (the tail bucket)
    sparse_logsumexp: bool = False

    def merge(self, other: TapRequest) -> TapRequest:
        return TapRequest(**{
            f.name: getattr(self, f.name) | getattr(other, f.name) for f in fields(self)
        })

    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))

    def missing_from(self, available: TapRequest) -> dict[str, str]:
        """What this request asks for that ``available`` cannot serve: ``{field: what is missing}``.

        Derived from every field, so a field added later is checked without new code.
        """
        missing: dict[str, str] = {}
        for f in fields(self):
            wanted, offered = getattr(self, f.name), getattr(available, f.name)
            if isinstance(wanted, set):
                lacking = wanted - offered
                if lacking:
                    missing[f.name] = f"layers {sorted(lacking)} (available: {sorted(offered) or 'none'})"
            elif wanted and not offered:
                missing[f.name] = "not available"
        return missing


def unserved(offered: TapRequest, requests: dict[str, TapRequest]) -> list[str]:
    """One line per stage and field that ``offered`` cannot serve, e.g. for a teacher source."""
    return [f"stage {stage!r} needs the teacher's {name} ({what})"
            for stage, request in requests.items() for name, what in request.missing_from(offered).items()]


@dataclass
class SparseTargets:
    """Teacher targets kept at ``k`` vocabulary entries per position.

    ``ids`` ``[B, S, k]`` (int64) and ``values`` ``[B, S, k]``. Positions outside ``loss_mask``
    hold zeros. What the values mean depends on ``kind``:

    * ``"topk"``: the teacher's logits at its ``k`` most likely ids, at temperature 1 (raw
      logits). ``logsumexp`` ``[B, S]`` (optional) is the teacher's full log-normaliser of
      ``logits / temperature``, so ``exp(values / temperature - logsumexp)`` are the teacher's exact
      probabilities at ``temperature`` and the tail outside the ``k`` ids has the rest of the mass.
      ``None`` means only the ``k`` entries are known and stages renormalise within them.
    * ``"sampled"``: ``values`` are ``log(count / K)`` of ``K`` tokens drawn with replacement from
      the teacher at ``temperature``; slots with ``-inf`` are empty (fewer distinct ids than
      slots). ``exp(values)`` is an unbiased estimate of the teacher's distribution at that
      temperature (its expectation is the distribution itself).

    ``temperature``: for ``"sampled"`` and for a ``logsumexp``, the only temperature at which
    the targets are exact; a loss at another temperature must refuse them.
    """

    ids: Tensor
    values: Tensor
    logsumexp: Tensor | None = None
    temperature: float = 1.0
    kind: Literal["topk", "sampled"] = "topk"


@dataclass
class ModelView:
    """What a stage sees of one model for one micro-batch. Unrequested fields are empty/None.

    * ``hidden_states``: tuple indexed by layer, ``[B, S, H]`` each; index 0 is the embedding
      output, index ``L`` the model's ``output_hidden_states[L]`` (for most Hugging Face
      decoders the last entry is taken after the final norm). Entries that were not requested
      may be ``None`` (the offline cache holds only mapped layers).
    * ``attention``: ``{block: QKV}`` for requested blocks (1-based); ``QKV.attention_logprobs()``
      gives the per-head maps as the model computed them.
    * ``logits``: ``[B, S, V]`` full logits, when requested.
    * ``final_hidden``: ``[B, S, H]``, the LM head's input, when requested.
    * ``lm_head``: the model's output projection (weights for the fused loss), or ``None``.
    * ``sparse``: top-k teacher targets (:class:`SparseTargets`) when the source serves them
      instead of logits (the offline cache); ``None`` otherwise.
    """

    hidden_states: tuple[Tensor | None, ...] | None = None
    attention: dict[int, QKV] = field(default_factory=dict)
    logits: Tensor | None = None
    final_hidden: Tensor | None = None
    lm_head: torch.nn.Module | None = None
    sparse: SparseTargets | None = None
    logit_softcap: float | None = None  # final-logit soft-cap c (Gemma 2): logits = c * tanh(final_hidden @ W.T / c)
