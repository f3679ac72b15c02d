"""Which student layer learns from which teacher layer.

Layers are numbered as in ``output_hidden_states``: 0 is the embedding output and ``k`` is
the output of transformer block ``k`` (1-based). Attention maps exist only for blocks, so
attention stages use 1..L.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import Tensor

from hkd.errors import ConfigError

Strategy = Literal["uniform", "last", "explicit", "init", "auto"]


def read_layer_record(record: Path, where: str) -> list[list[int]]:
    """The ``layer_map`` of an ``hkd-init.json``, checked: a damaged or foreign record is named, not a traceback."""
    try:
        pairs = json.loads(record.read_text(encoding="utf-8"))["layer_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{where}.strategy: init reads {str(record)!r}, which is not an hkd init-student record "
                          f"({type(exc).__name__}: {exc}); re-run hkd init-student or use another strategy") from None
    if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in p)
            for p in pairs):
        raise ConfigError(f"{where}.strategy: init reads {str(record)!r}, whose layer_map is not a list of "
                          "[student_layer, teacher_layer] pairs; re-run hkd init-student or use another strategy")
    return pairs


def build_layer_map(
    strategy: Strategy,
    student_layers: int,
    teacher_layers: int,
    *,
    pairs: list[list[int]] | None = None,
    include_embeddings: bool = False,
    where: str = "layer_map",
    student_dir: str | Path | None = None,
) -> list[tuple[int, int]]:
    """Return ``[(student_layer, teacher_layer), ...]``.

    * ``uniform`` (TinyBERT): student block ``s`` learns from teacher block
      ``round(s * L_t / L_s)``, so the last blocks always meet. A student deeper than its
      teacher maps block ``s`` to ``ceil(s * L_t / L_s)``, the teacher block whose share of the
      depth holds the student block's end: several student blocks share a teacher block, and
      none maps to 0 (the embeddings, which ``round`` gave the first blocks).
    * ``last``: only the two final blocks.
    * ``explicit``: ``pairs`` as given, each checked against both models.
    * ``init``: the layers the student was cut from (``hkd init-student`` records them in
      ``student_dir/hkd-init.json``); ``auto``: ``init`` when that record exists, else ``uniform``.
    ``include_embeddings`` adds (0, 0) for the feature stage.
    """
    record = Path(student_dir) / "hkd-init.json" if student_dir is not None else None
    if strategy == "auto":
        strategy = "init" if record is not None and record.is_file() else "uniform"
    if strategy == "init":
        if record is None or not record.is_file():
            raise ConfigError(f"{where}.strategy: init reads the student's hkd-init.json (written by hkd init-student); "
                              f"{str(record) if record else 'the student directory'} has none")
        strategy = "explicit"
        pairs = [p for p in read_layer_record(record, where) if include_embeddings or p != [0, 0]]
    if strategy == "uniform":
        if student_layers <= teacher_layers:
            mapping = [(s, round(s * teacher_layers / student_layers)) for s in range(1, student_layers + 1)]
        else:
            mapping = [(s, -(-s * teacher_layers // student_layers)) for s in range(1, student_layers + 1)]
    elif strategy == "last":
        mapping = [(student_layers, teacher_layers)]
    elif strategy == "explicit":
        if not pairs:
            raise ConfigError(f"{where}.pairs: explicit mapping needs a list of [student, teacher] pairs")
        mapping = []
        for i, pair in enumerate(pairs):
            if len(pair) != 2:
                raise ConfigError(f"{where}.pairs[{i}]: expected [student_layer, teacher_layer], got {pair}")
            mapping.append((int(pair[0]), int(pair[1])))
    else:
        raise ConfigError(f"{where}.strategy: unknown strategy {strategy!r}; use uniform, last, explicit, init or auto")
    if include_embeddings and (0, 0) not in mapping:
        mapping.insert(0, (0, 0))
    lowest = 0 if include_embeddings or strategy == "explicit" else 1
    for s, t in mapping:
        if not lowest <= s <= student_layers:
            raise ConfigError(f"{where}: student layer {s} is out of range {lowest}..{student_layers}")
        if not lowest <= t <= teacher_layers:
            raise ConfigError(f"{where}: teacher layer {t} is out of range {lowest}..{teacher_layers}")
    return mapping


@dataclass
class LayerMapConfig:
    """Config block shared by the structural and feature stages."""

    strategy: Strategy = "uniform"  # uniform (block s -> round(s * L_t / L_s)), last, explicit (pairs), init (hkd-init.json), auto (init if recorded, else uniform)
    pairs: list[list[int]] | None = None  # for "explicit": [[student_layer, teacher_layer], ...]


def layer_metrics(stage: str, pair_sums: dict[tuple[int, int], Tensor], mask: Tensor) -> dict[str, Tensor]:
    """The opt-in per-pair diagnostic (``log_layers: true``) of the structural and feature stages.

    ``pair_sums`` holds each mapped pair's loss summed over this micro-batch's target tokens;
    each becomes a detached per-token mean named ``metric/layer/<stage>/<student>_<teacher>``,
    which the loop logs and ``hkd report`` draws as a teacher-layer x student-layer heatmap.
    Dividing by the micro-batch's own tokens (not the step's) keeps the value a per-token
    loss whatever ``optim.grad_accum`` is; the mean over pairs equals the stage's loss when a
    step has one micro-batch.
    """
    tokens = mask.sum().clamp_min(1.0)  # a tensor: the loop reads metrics once per step
    return {f"metric/layer/{stage}/{s}_{t}": (total.detach() / tokens) for (s, t), total in pair_sums.items()}
