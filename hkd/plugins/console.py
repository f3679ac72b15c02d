"""What a training run tells the person watching it: progress, resume, phases, the end.

* **progress** (``train.progress``, ``--no-progress`` turns it off): a tqdm bar on a
  terminal, described with the run directory's name (the demo's bars say ``teacher``,
  ``answer_only``, ...). Without a terminal (a log file, CI, ``nohup``) a bar would write
  carriage returns on every step, so instead one plain line every ``HKD_PROGRESS_SECONDS``
  seconds (default 30) and one at the last step.
* **resume**: ``resuming from step 33 of 70, checkpoint RUN/checkpoints/step-00000033``.
* **phase changes**: the finished phase's mean loss per stage over the steps this process ran.
* **the end**: steps, wall time, trained tokens/s, where the final model and the metrics are.

Lines other than the bar go to stderr through ``tqdm.write``, so they never tear a bar. The
loop calls lifecycle hooks on rank 0 only, so a multi-process run prints once.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from hkd import Config
from hkd import hookimpl

DEFAULT_SECONDS = 30.0  # between plain progress lines when stderr is not a terminal


def shown(path: Path) -> str:
    """A path as a user can paste it: relative to the working directory when inside it, no ``..``."""
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


@dataclass
class Console:
    """One run's console state; :func:`hkd_on_train_start` starts a fresh one."""

    name: str = ""
    total_steps: int = 0
    start_step: int = 0
    progress: bool = True
    stream: TextIO | None = None  # None: whatever sys.stderr is when a line is written (not at import)
    every_s: float = DEFAULT_SECONDS
    bar: Any = None  # tqdm on a terminal
    started: float = field(default_factory=time.perf_counter)
    last_line: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    steps_run: int = 0
    phase: str | None = None
    phase_first_step: int = 0
    phase_sums: dict[str, list[float]] = field(default_factory=dict)  # stage -> [sum, count]

    def write(self, line: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(line, file=self.out)

    @property
    def out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def close_phase(self, last_step: int) -> None:
        if self.phase is None or not self.phase_sums:
            return
        means = ", ".join(f"{stage} {total / count:.4g}" for stage, (total, count) in self.phase_sums.items())
        self.write(f"{self.name}: phase {self.phase} done (steps {self.phase_first_step}-{last_step}): "
                   f"mean loss {means}")

    def plain_line(self, step: int, metrics: dict[str, Any]) -> None:
        elapsed = time.perf_counter() - self.started
        rate = self.steps_run / max(elapsed, 1e-9)
        left = (self.total_steps - step) / rate if rate > 0 else 0.0
        percent = 100 * step / max(self.total_steps, 1)
        self.write(f"{self.name}: step {step}/{self.total_steps} ({percent:.0f}%), phase {self.phase}, "
                   f"loss {metrics.get('loss', float('nan')):.4g}, {rate:.2f} steps/s, "
                   f"elapsed {duration(elapsed)}, left ~{duration(left)}")


_console = Console()


@hookimpl
def hkd_on_train_start(config: Config, run_dir: Path, start_step: int, total_steps: int,
                       resumed_from: Path | None) -> None:
    global _console
    every = float(os.environ.get("HKD_PROGRESS_SECONDS", DEFAULT_SECONDS))
    console = Console(name=run_dir.name, total_steps=total_steps, start_step=start_step,
                      progress=config.train.progress, every_s=every)
    if resumed_from is not None:
        console.write(f"{console.name}: resuming from step {start_step} of {total_steps}, "
                      f"checkpoint {shown(resumed_from)}")
    if console.progress and console.out.isatty():
        from tqdm.auto import tqdm

        console.bar = tqdm(total=total_steps, initial=start_step, desc=console.name, unit="step",
                           file=console.out, dynamic_ncols=True)
    _console = console


@hookimpl
def hkd_on_phase_start(phase_name: str, step: int) -> None:
    console = _console
    console.close_phase(step)
    console.phase, console.phase_first_step, console.phase_sums = phase_name, step + 1, {}


@hookimpl
def hkd_after_step(step: int, metrics: dict[str, Any]) -> None:
    console = _console
    console.steps_run += 1
    console.tokens += int(metrics.get("tokens", 0))
    for key, value in metrics.items():
        if key.startswith("loss/") and isinstance(value, (int, float)):
            acc = console.phase_sums.setdefault(key[5:], [0.0, 0])
            acc[0] += float(value)
            acc[1] += 1
    if console.bar is not None:
        console.bar.update(1)
        console.bar.set_postfix(phase=console.phase, loss=f"{metrics.get('loss', float('nan')):.4f}", refresh=False)
    elif console.progress:
        now = time.perf_counter()
        if now - console.last_line >= console.every_s or step == console.total_steps:
            console.last_line = now
            console.plain_line(step, metrics)


@hookimpl
def hkd_on_train_end(step: int, run_dir: Path, final_dir: Path) -> None:
    global _console
    console, _console = _console, Console()  # the next run in this process starts from a fresh console
    if console.bar is not None:
        console.bar.close()
        console.bar = None
    console.close_phase(step)
    elapsed = time.perf_counter() - console.started
    ran = f"{console.steps_run} steps" + (f" (resumed at {console.start_step})" if console.start_step else "")
    metrics = run_dir / "metrics.jsonl"  # absent when logging.backends leaves out jsonl
    where = f", metrics {shown(metrics)}" if metrics.is_file() else ""
    console.write(f"{console.name}: done, {ran} in {duration(elapsed)}, "
                  f"{console.tokens / max(elapsed, 1e-9):,.0f} trained tokens/s; final model {shown(final_dir)}{where}")
