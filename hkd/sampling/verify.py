"""Verifiers: decide whether a completion is acceptable for a prompt record.

Registered by plugins through ``hkd_add_verifiers`` and looked up by name. A verifier is
built from its options (a dict from config) and then called per completion; it returns a
:class:`Verdict` whose ``reason`` explains a rejection (for the kept/rejected summary).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from hkd.tasks.arith import extract_answer
from hkd.errors import ConfigError


@dataclass(frozen=True)
class Verdict:
    passed: bool
    score: float  # 1.0 / 0.0 for pass-fail verifiers; graded verifiers may return values between
    reason: str = ""  # why it failed ("wrong_answer", "no_answer", "bad_format", ...)


@dataclass
class VerifierConfig:
    """A verifier as config names it (``verifiers:`` in generate/eval, ``stages.rl.verifier``)."""

    name: str  # a verifier some plugin registers (``exact_answer``, ``regex_format``, ...)
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of its factory


class Verifier(Protocol):
    def __call__(self, record: dict[str, Any], completion: str) -> Verdict: ...


@dataclass(frozen=True)
class VerifierSpec:
    """A verifier type a plugin offers: ``factory(**options) -> Verifier``."""

    name: str
    factory: Callable[..., Verifier]
    description: str = ""


def available_verifiers(pm: Any) -> dict[str, VerifierSpec]:
    return dict(pm.named("hkd_add_verifiers", "verifier"))


def build_verifier(pm: Any, name: str, options: dict[str, Any] | None = None, where: str = "verifiers") -> Verifier:
    specs = available_verifiers(pm)
    if name not in specs:
        raise ConfigError(f"{where}: unknown verifier {name!r}; available: {sorted(specs)}")
    try:
        return specs[name].factory(**(options or {}))
    except TypeError as exc:
        raise ConfigError(f"{where}: bad options for verifier {name!r}: {exc}") from exc


def compile_pattern(pattern: str, verifier: str, flags: int = 0) -> re.Pattern[str]:
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise ConfigError(f"verifier {verifier!r}: invalid regex {pattern!r}: {exc}") from exc


def answer_extractor(pattern: str | None = None) -> Callable[[str], str | None]:
    """The default ``=> `` extractor, or the last match of ``pattern`` (group 1 when it has one)."""
    if pattern is None:
        return extract_answer
    regex = compile_pattern(pattern, "exact_answer", re.MULTILINE)

    def extract(completion: str) -> str | None:
        matches = list(regex.finditer(completion))
        if not matches:
            return None
        last = matches[-1]
        return (last.group(1) if regex.groups else last.group(0)).strip()

    return extract
