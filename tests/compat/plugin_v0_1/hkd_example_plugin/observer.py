"""Lifecycle hooks as hkd 0.1's docs described them; each takes only the arguments it uses."""

from __future__ import annotations

from hkd import hookimpl

EVENTS: list[tuple] = []  # (hook, ...) in call order (for the compatibility test)


@hookimpl
def hkd_on_train_start(total_steps):
    EVENTS.append(("train_start", total_steps))


@hookimpl
def hkd_after_step(step, metrics):
    EVENTS.append(("after_step", step, dict(metrics)))


@hookimpl
def hkd_on_train_end(step):
    EVENTS.append(("train_end", step))
