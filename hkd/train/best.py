"""The best held-out evaluation so far, kept in ``best.json`` so early stopping survives a resume."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

HIGHER_IS_BETTER = {"kl": False, "top1_agreement": True, "student_nll": False, "loss": False}


@dataclass
class BestTracker:
    """The best evaluation so far and how many evaluations since; saved as ``best.json``."""

    metric: str
    best: float | None = None
    best_step: int = 0
    since_best: int = 0

    @classmethod
    def load(cls, run_dir: Path, metric: str) -> BestTracker:
        path = run_dir / "best.json"
        if not path.is_file():
            return cls(metric)
        saved = json.loads(path.read_text())
        return cls(metric, saved.get("value"), saved.get("step", 0), saved.get("since_best", 0))

    def update(self, value: float, step: int, min_delta: float) -> bool:
        """Record one evaluation; True when it is a new best."""
        better = self.best is None or (value > self.best + min_delta if HIGHER_IS_BETTER[self.metric]
                                       else value < self.best - min_delta)
        if better:
            self.best, self.best_step, self.since_best = value, step, 0
        else:
            self.since_best += 1
        return better

    def save(self, run_dir: Path) -> None:
        tmp = run_dir / "best.json.tmp"
        tmp.write_text(json.dumps({"metric": self.metric, "value": self.best, "step": self.best_step,
                                   "since_best": self.since_best}))
        os.replace(tmp, run_dir / "best.json")
