"""Verifier ``length_limit``: reject completions longer than a budget.

Data distillation keeps a teacher sample only if every configured verifier passes it, so a
length budget next to ``exact_answer`` keeps short, direct solutions and drops rambling
ones. Options (``verifiers: [{name: length_limit, max_chars: 200}]`` in a generate or eval
config) arrive as keyword arguments of the factory; a bad option is a ConfigError that
names the verifier, which the hkd CLI prints as one line.
"""

from __future__ import annotations

from typing import Any

from hkd.errors import ConfigError
from hkd import hookimpl
from hkd.verify import Verdict, Verifier, VerifierSpec


def length_limit(max_chars: int = 200) -> Verifier:
    """Pass completions of at most ``max_chars`` characters (surrounding whitespace ignored)."""
    if not isinstance(max_chars, int) or max_chars <= 0:
        raise ConfigError(f"verifier 'length_limit': max_chars must be a positive integer, got {max_chars!r}")

    def verify(record: dict[str, Any], completion: str) -> Verdict:
        if len(completion.strip()) > max_chars:
            return Verdict(False, 0.0, "too_long")
        return Verdict(True, 1.0)

    return verify


@hookimpl
def hkd_add_verifiers() -> list[VerifierSpec]:
    return [VerifierSpec("length_limit", length_limit, "reject completions longer than max_chars")]
