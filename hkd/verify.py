"""Verifiers: decide whether a completion is acceptable for a prompt record.

Registered by plugins through ``hkd_add_verifiers`` and looked up by name. A verifier is
built from its options (a dict from config) and then called per completion; it returns a
:class:`Verdict` whose ``reason`` explains a rejection (for the kept/rejected summary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol


@dataclass(frozen=True)
class Verdict:
    passed: bool
    score: float  # 1.0 / 0.0 for pass-fail verifiers; graded verifiers may return values between
    reason: str = ""  # why it failed ("wrong_answer", "no_answer", "bad_format", ...)


class Verifier(Protocol):
    def __call__(self, record: dict[str, Any], completion: str) -> Verdict: ...


@dataclass(frozen=True)
class VerifierSpec:
    """A verifier type a plugin offers: ``factory(**options) -> Verifier``."""

    name: str
    factory: Callable[..., Verifier]
    description: str = ""


def available_verifiers(pm: Any) -> dict[str, VerifierSpec]:
    from hkd.errors import HkdError

    specs: dict[str, VerifierSpec] = {}
    for plugin_name, spec in pm.collect("hkd_add_verifiers"):
        if spec.name in specs:
            raise HkdError(f"verifier {spec.name!r} is provided twice (second time by plugin {plugin_name!r})")
        specs[spec.name] = spec
    return specs


def build_verifier(pm: Any, name: str, options: dict[str, Any] | None = None, where: str = "verifiers") -> Verifier:
    from hkd.errors import ConfigError

    specs = available_verifiers(pm)
    if name not in specs:
        raise ConfigError(f"{where}: unknown verifier {name!r}; available: {sorted(specs)}")
    try:
        return specs[name].factory(**(options or {}))
    except TypeError as exc:
        raise ConfigError(f"{where}: bad options for verifier {name!r}: {exc}") from exc
