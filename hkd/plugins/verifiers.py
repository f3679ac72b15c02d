"""Built-in verifiers: is a completion's final answer right, and is it well formed?

* ``exact_answer``: extract the final answer from the completion and compare it with the
  record's reference (``answer_field``). The default extractor is
  :func:`hkd.tasks.arith.extract_answer` (the text after the last ``=> ``); ``pattern`` swaps in a
  user regex whose last match gives the answer (group 1 if the regex has a group, else the
  whole match). Rejections: ``no_answer`` (nothing extracted), ``no_reference`` (the record
  lacks the field), ``wrong_answer``.
* ``regex_format``: the completion must match ``pattern`` (``mode: fullmatch`` or
  ``search``). Rejection: ``bad_format``.

Both compare text after stripping surrounding whitespace, so a trailing newline or space
the teacher emits does not count as a wrong answer.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from hkd import ConfigError
from hkd import hookimpl
from hkd import Verdict, Verifier, VerifierSpec, answer_extractor, compile_pattern

PASS = Verdict(True, 1.0)


def exact_answer(answer_field: str = "answer", pattern: str | None = None) -> Verifier:
    """Pass when the extracted final answer equals ``record[answer_field]`` (both stripped)."""
    extract = answer_extractor(pattern)

    def verify(record: dict[str, Any], completion: str) -> Verdict:
        answer = extract(completion)
        if answer is None:
            return Verdict(False, 0.0, "no_answer")
        if answer_field not in record:
            return Verdict(False, 0.0, "no_reference")
        return PASS if answer.strip() == str(record[answer_field]).strip() else Verdict(False, 0.0, "wrong_answer")

    return verify


def regex_format(pattern: str, mode: Literal["fullmatch", "search"] = "fullmatch", dotall: bool = True) -> Verifier:
    """Pass when the completion matches ``pattern`` (whole text, or anywhere with ``search``)."""
    if mode not in ("fullmatch", "search"):
        raise ConfigError(f"verifier 'regex_format': mode must be 'fullmatch' or 'search', got {mode!r}")
    regex = compile_pattern(pattern, "regex_format", re.DOTALL if dotall else 0)
    match = regex.fullmatch if mode == "fullmatch" else regex.search

    def verify(record: dict[str, Any], completion: str) -> Verdict:
        return PASS if match(completion.strip()) else Verdict(False, 0.0, "bad_format")

    return verify


@hookimpl
def hkd_add_verifiers() -> list[VerifierSpec]:
    return [
        VerifierSpec("exact_answer", exact_answer, "final answer (after '=> ' or a regex) equals the record's answer"),
        VerifierSpec("regex_format", regex_format, "completion matches a regex (fullmatch or search)"),
    ]
