"""Built-in verifiers: is a completion's final answer right, and is it well formed?

* ``exact_answer``: extract the final answer from the completion and compare it with the
  record's reference (``answer_field``). The default extractor is
  :func:`hkd.arith.extract_answer` (the text after the last ``=> ``); ``pattern`` swaps in a
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
from typing import Any, Callable, Literal

from hkd.arith import extract_answer
from hkd.errors import ConfigError
from hkd.hookspecs import hookimpl
from hkd.verify import Verdict, Verifier, VerifierSpec

PASS = Verdict(True, 1.0)


def _compile(pattern: str, verifier: str, flags: int = 0) -> re.Pattern[str]:
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise ConfigError(f"verifier {verifier!r}: invalid regex {pattern!r}: {exc}") from exc


def answer_extractor(pattern: str | None = None) -> Callable[[str], str | None]:
    """The default ``=> `` extractor, or the last match of ``pattern`` (group 1 when it has one)."""
    if pattern is None:
        return extract_answer
    regex = _compile(pattern, "exact_answer", re.MULTILINE)

    def extract(completion: str) -> str | None:
        matches = list(regex.finditer(completion))
        if not matches:
            return None
        last = matches[-1]
        return (last.group(1) if regex.groups else last.group(0)).strip()

    return extract


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
    regex = _compile(pattern, "regex_format", re.DOTALL if dotall else 0)
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
