"""``final/`` as a sentence-transformers model when the student is an encoder.

sentence-transformers loads a directory through its ``modules.json``: here a ``Transformer``
module (the Hugging Face model and tokenizer in the directory itself, configured by
``sentence_bert_config.json``) followed by a ``Pooling`` module (``1_Pooling/config.json``).
:func:`write_sentence_transformers` writes those three files next to the weights and tokenizer
that ``save_pretrained`` already put there, so ``SentenceTransformer("RUN/final")`` works and
its ``encode()`` is the pooled last hidden state the run distilled. The pooling is the sentence
stage's (``stages.sentence.pooling``, a phase's options overriding it), ``mean`` when the run
has no sentence stage (what the encoder benchmark measures). Nothing here imports
sentence-transformers: the files are plain JSON in the format its releases since 2.0 read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hkd.config import Config
from hkd.errors import HkdError

POOLING_MODES = ("mean", "cls")
MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
]


def write_sentence_transformers(final_dir: Path, *, pooling: str, hidden_size: int, max_seq_length: int,
                                do_lower_case: bool = False) -> None:
    """Write ``modules.json``, ``sentence_bert_config.json`` and ``1_Pooling/config.json`` into ``final_dir``.

    ``max_seq_length`` is what the run trained on (``data.max_length``); sentence-transformers
    truncates longer inputs to it. ``do_lower_case`` stays ``False``: the tokenizer saved beside
    it lower-cases itself when its family does.
    """
    if pooling not in POOLING_MODES:
        raise HkdError(f"sentence-transformers export: pooling {pooling!r} is not one of {list(POOLING_MODES)}")
    pooling_config: dict[str, Any] = {
        "word_embedding_dimension": int(hidden_size),
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (final_dir / "1_Pooling").mkdir(parents=True, exist_ok=True)
    _write_json(final_dir / "1_Pooling" / "config.json", pooling_config)
    _write_json(final_dir / "sentence_bert_config.json",
                {"max_seq_length": int(max_seq_length), "do_lower_case": do_lower_case})
    _write_json(final_dir / "modules.json", MODULES)


def save_student(student: Any, tokenizer: Any, out: Path, state_dict: dict[str, Any], config: Config,
                 options: dict[str, Any]) -> None:
    """A loadable model directory (``final/``, ``best/``): weights, tokenizer, and for an encoder
    student the sentence-transformers files. ``options`` are the stages' :meth:`~hkd.Stage.export_options`."""
    student.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out)
    export_encoder(out, config, student.config, options)


def export_encoder(final_dir: Path, config: Config, student_config: Any, options: dict[str, Any]) -> None:
    """An encoder student's ``final/`` also becomes a sentence-transformers model, pooled as the
    stages say (``mean`` when none says)."""
    if not config.student.encoder:
        return
    write_sentence_transformers(final_dir, pooling=str(options.get("pooling", "mean")),
                                hidden_size=student_config.hidden_size, max_seq_length=config.data.max_length)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
