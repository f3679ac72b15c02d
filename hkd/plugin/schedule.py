"""The progressive schedule: phases, stage-weight ramps, temperature and learning rate.

All functions are pure functions of the optimizer step, so a resumed run recomputes
exactly the values the uninterrupted run had.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hkd.config import OptimConfig, ScheduleConfig


@dataclass(frozen=True)
class PhasePosition:
    index: int
    name: str
    step_in_phase: int


class Schedule:
    def __init__(self, config: ScheduleConfig, optim: OptimConfig) -> None:
        self.config = config
        self.optim = optim
        self.total_steps = sum(p.steps for p in config.phases)
        self.stage_names = sorted({name for p in config.phases for name in p.stages})

    def phase_at(self, step: int) -> PhasePosition:
        start = 0
        for i, phase in enumerate(self.config.phases):
            if step < start + phase.steps:
                return PhasePosition(i, phase.name, step - start)
            start += phase.steps
        last = len(self.config.phases) - 1
        return PhasePosition(last, self.config.phases[last].name, step - (start - self.config.phases[last].steps))

    def stage_key(self, step: int, name: str) -> str:
        """The stage instance that runs ``name`` at ``step``: ``name``, or ``name@phase`` where the
        phase gives the stage its own options (:func:`hkd.plugin.stage.build_stages` builds those)."""
        return self.phase_stage_key(self.phase_at(step).index, name)

    def phase_stage_key(self, phase_index: int, name: str) -> str:
        """:meth:`stage_key` for any step of phase ``phase_index``."""
        phase = self.config.phases[phase_index]
        return f"{name}@{phase.name}" if name in phase.options else name

    def weights(self, step: int) -> dict[str, float]:
        """Stage weights at ``step``; a stage absent from a phase has weight 0 there.

        During the first ``ramp_steps`` of a phase each weight moves linearly from its value
        in the previous phase, so a new stage fades in instead of jolting the student.
        """
        pos = self.phase_at(step)
        target = self.config.phases[pos.index].stages
        ramp = self.config.ramp_steps
        if pos.index == 0 or ramp == 0 or pos.step_in_phase >= ramp:
            return {name: float(target.get(name, 0.0)) for name in self.stage_names}
        previous = self.config.phases[pos.index - 1].stages
        frac = (pos.step_in_phase + 1) / (ramp + 1)
        return {
            name: (1 - frac) * previous.get(name, 0.0) + frac * target.get(name, 0.0) for name in self.stage_names
        }

    def temperature(self, step: int) -> float:
        t = self.config.temperature
        progress = step / max(1, self.total_steps - 1)
        if t.kind == "constant":
            return t.start
        if t.kind == "linear":
            return t.start + (t.end - t.start) * progress
        return t.end + 0.5 * (t.start - t.end) * (1 + math.cos(math.pi * progress))

    def lr_factor(self, step: int) -> float:
        """Linear warmup, then cosine decay to ``min_lr_ratio``, times the phase's ``lr_scale``.

        The result multiplies ``optim.lr``. The warmup + cosine curve spans the whole run; a
        phase's ``lr_scale`` only rescales it while that phase runs (no ramp: Adam's step size
        changes at the boundary, the stage weights still ramp).
        """
        scale = self.config.phases[self.phase_at(step).index].lr_scale
        warmup = self.optim.warmup_steps
        if step < warmup:
            return scale * (step + 1) / (warmup + 1)
        decay_steps = max(1, self.total_steps - warmup)
        progress = min(1.0, (step - warmup) / decay_steps)
        floor = self.optim.min_lr_ratio
        return scale * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
