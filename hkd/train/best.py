"""The best held-out evaluation so far, kept in ``best.json`` so early stopping survives a resume."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hkd.errors import HkdError

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
        """The saved best (``--resume``); a ``best.json`` that is damaged or kept another metric is named, not
        trusted: a wrong best would decide best/ and early stopping."""
        path = run_dir / "best.json"
        if not path.is_file():
            return cls(metric)
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise HkdError(f"--resume: {str(path)!r} is not valid JSON ({exc}); delete it to restart tracking the "
                           "best model (best/ is then replaced at the next evaluation)") from None
        fields: dict[str, Any] = saved if isinstance(saved, dict) else {}
        value, step, since = fields.get("value"), fields.get("step"), fields.get("since_best")
        number = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                   and math.isfinite(value))
        counts = all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (step, since))
        if not (isinstance(saved, dict) and number and counts):
            raise HkdError(f"--resume: {str(path)!r} is not a best-model record (expected value, step and "
                           f"since_best); delete it to restart tracking the best model")
        if saved.get("metric", metric) != metric:
            raise HkdError(f"--resume: {str(path)!r} tracked eval.metric {saved.get('metric')!r}, the config now "
                           f"says {metric!r}; its best cannot be compared (delete it to start tracking {metric!r})")
        return cls(metric, value, int(step), int(since))  # type: ignore[arg-type]  # checked above

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
