"""The run-directory guard: decide, before anything is written, whether a run may use a directory.

``hkd distill`` calls :func:`prepare_run_dir` first. A directory that already holds a run
(its ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` or ``final/``) is never silently
reused:

* a fresh run into it is refused unless ``--resume`` (continue it) or ``--overwrite``
  (replace it: the outputs hkd wrote there, nothing else, are moved aside into
  ``.hkd-overwritten/`` and deleted only once the new run has made progress of its own: a
  finished optimizer step, its metrics or a checkpoint. A new run that fails before that,
  refused while it is built or at its first step, has what it wrote removed by name and the
  old run put back, so a typo next to ``--overwrite`` loses nothing; a process killed in
  between gets the old run back at the next ``hkd distill`` into the directory);
* a fresh run that fails before its first step leaves nothing behind: no ``config.yaml``
  that would make the directory look like a run, and no directory it created;
* ``--resume`` compares the new config with the saved ``config.yaml`` and refuses
  differences that change what the run computes (student width, lr, steps, max_length, ...),
  listing the keys; ``--allow-config-change`` accepts them. Keys that only change how the
  run is watched or saved (:data:`HARMLESS`) may differ. The saved ``config.yaml`` is never
  rewritten: a resumed config that differs is written beside it as
  ``config.resume-N.yaml``.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hkd.config import Config, from_dict, load_yaml
from hkd.config.outputs import check_output_dir
from hkd.errors import ConfigError, HkdError, warn
from hkd.plugin.hookspecs import hookimpl

CONFIG = "config.yaml"
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "final")  # any of these: the directory holds a run
# what hkd distill and the loggers write into a run directory; --overwrite replaces these and nothing else
ASIDE = ".hkd-overwritten"  # the replaced run's outputs, until the new run has started
OUTPUTS = ("config.yaml", "metrics.jsonl", "checkpoints", "final", "best", "best.json", "models", "probe", "report",
           "tensorboard", "wandb", "wandb-run-id", "ranks")
# dotted keys (and everything below them) that may differ on --resume: how the run is watched, logged,
# saved or spread over devices, not what it computes (docs/scaling.md: a run may resume with other ranks or mode)
HARMLESS = ("train.progress", "train.checkpoint_every", "train.keep_checkpoints", "train.max_nonfinite_steps",
            "train.device", "train.parallel", "logging", "plugins.disable")


@dataclass
class RunDirPlan:
    """What :func:`prepare_run_dir` decided: the directory, and a changed resumed config to record.

    Also a plugin (register it with the run's plugin manager): ``hkd_after_step`` marks that the
    new run made progress, which is what :meth:`settle` asks before deleting a replaced run.
    """

    run_dir: Path
    resume: bool
    changed: dict[str, tuple[Any, Any]]  # dotted key -> (saved, new), harmless or allowed
    config: Config
    created: bool = False  # the directory did not exist before this run
    before: frozenset[str] = frozenset()  # names of OUTPUTS already there (not the new run's) after moving aside
    steps_done: int = 0  # optimizer steps this run finished (hkd_after_step)

    @hookimpl
    def hkd_after_step(self, step: int) -> None:
        self.steps_done += 1

    @hookimpl
    def hkd_on_train_start(self) -> None:
        self.record_config()  # once everything was checked: a refused resume leaves the directory as it was

    def started(self) -> bool:
        """The new run made progress of its own: a finished step, metrics or a checkpoint."""
        return self.resume or self.steps_done > 0 or progress_on_disk(self.run_dir)

    def record_config(self) -> Path | None:
        """On a resume whose config differs from the saved one, write it as ``config.resume-N.yaml``.

        The saved ``config.yaml`` stays as the run's original; the records say what changed when.
        """
        if not (self.resume and set(self.changed) - {"train.progress"}):  # a progress bar changes nothing worth keeping
            return None
        text = yaml.safe_dump(self.config.to_dict(), sort_keys=False)
        n = 1
        while (self.run_dir / f"config.resume-{n}.yaml").exists():
            n += 1
        previous = self.run_dir / f"config.resume-{n - 1}.yaml"
        if n > 1 and previous.read_text(encoding="utf-8", errors="replace") == text:  # the same resumed config again: one record is enough
            return previous
        out = self.run_dir / f"config.resume-{n}.yaml"
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out)
        return out

    def settle(self) -> None:
        """After the run (finished, failed or stopped). A new run that made progress keeps its outputs and
        a replaced run is deleted; one that did not has what it wrote removed by name (never a file that
        was there before) and the replaced run, if any, put back; a directory it created goes too."""
        if self.resume or not self.run_dir.is_dir():
            return
        aside = self.run_dir / ASIDE
        if self.started():
            if aside.is_dir():
                shutil.rmtree(aside)
            return
        for name in [*OUTPUTS, *(p.name for p in self.run_dir.glob("config.resume-*.yaml"))]:
            if name not in self.before:
                _remove(self.run_dir / name)
        restore(self.run_dir)
        if self.created and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()


def progress_on_disk(run_dir: Path) -> bool:
    """A run in ``run_dir`` got past its first step: metrics, a checkpoint or a final model."""
    from hkd.train.checkpoint import list_checkpoints

    return ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size > 0) \
        or (run_dir / "final").is_dir() or bool(list_checkpoints(run_dir / "checkpoints"))


def restore(run_dir: Path) -> bool:
    """Put a run moved aside by ``--overwrite`` back in place (the new outputs are already gone); True if there was one."""
    aside = run_dir / ASIDE
    if not aside.is_dir():
        return False
    for item in aside.iterdir():
        target = run_dir / item.name
        if target.exists() or target.is_symlink():  # an earlier new run's leftover of the same name
            _remove(target)
        os.replace(item, target)
    aside.rmdir()
    return True


def recover_interrupted(run_dir: Path) -> None:
    """A run moved aside by an ``--overwrite`` whose process was killed: deleted if the new run made progress,
    else put back (with the new run's outputs removed), so the next command sees the directory as it should."""
    aside = run_dir / ASIDE
    if not aside.is_dir():
        return
    if progress_on_disk(run_dir):
        shutil.rmtree(aside)
        return
    for name in OUTPUTS:
        if not (aside / name).exists():  # the killed run's own outputs; the old run's come back below
            _remove(run_dir / name)
    restore(run_dir)
    print(f"hkd: {str(run_dir)!r}: an interrupted --overwrite never trained a step; the replaced run is back "
          "in place", file=sys.stderr)


def holds_run(run_dir: Path) -> list[str]:
    """The run outputs ``run_dir`` holds (empty: no run there)."""
    return [name for name in RUN_MARKERS if (run_dir / name).exists()]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings and lists -> ``{"schedule.phases[0].steps": 2, ...}``."""
    if isinstance(value, dict):
        if not value and prefix:
            return {prefix: {}}
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def _harmless(key: str) -> bool:
    return any(key == h or key.startswith(h + ".") or key.startswith(h + "[") for h in HARMLESS)


def config_differences(saved: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two configs -> (saved value, new value)."""
    old, now = flatten(saved.to_dict()), flatten(new.to_dict())
    missing = object()
    return {key: (old.get(key, missing), now.get(key, missing)) for key in sorted(set(old) | set(now))
            if old.get(key, missing) != now.get(key, missing)}


def _show(value: Any) -> str:
    return "(absent)" if not isinstance(value, (str, int, float, bool, list, dict, type(None))) else repr(value)


def load_saved_config(run_dir: Path) -> Config:
    path = run_dir / CONFIG
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
        return from_dict(Config, raw)
    except (ConfigError, OSError, UnicodeDecodeError) as exc:
        raise HkdError(f"--resume: the saved {str(path)!r} cannot be read as a config ({exc}); it was edited or "
                       "written by another hkd version (resume with --allow-config-change to skip the comparison)"
                       ) from None


def prepare_run_dir(run_dir: Path, config: Config, *, resume: bool = False, overwrite: bool = False,
                    allow_config_change: bool = False, write: bool = True) -> RunDirPlan:
    """Refuse a use of ``run_dir`` that would lose or mix up a run; call before anything is written.

    With ``overwrite`` the previous run's outputs are moved aside here (by the process with
    ``write``: under torchrun, rank 0). Returns the plan; call :meth:`RunDirPlan.record_config`
    when the run starts to keep a changed resumed config, and :meth:`RunDirPlan.settle` after it.
    """
    if resume and overwrite:
        raise HkdError("--resume and --overwrite contradict each other: continue the run in --out, or replace it")
    check_output_dir(run_dir, "--out", "distill", owner=lambda p: True)  # kind, parents, writable
    if write:
        recover_interrupted(run_dir)
    created = not run_dir.exists()
    found = holds_run(run_dir)
    if resume:
        from hkd.train.checkpoint import list_checkpoints

        if not list_checkpoints(run_dir / "checkpoints"):
            raise HkdError(f"--resume: no checkpoint in {str(run_dir / 'checkpoints')!r}")
        changed: dict[str, tuple[Any, Any]] = {}
        if (run_dir / CONFIG).is_file():
            try:
                changed = config_differences(load_saved_config(run_dir), config)
            except HkdError:
                if not allow_config_change:
                    raise
                warn(f"--resume: the saved {str(run_dir / CONFIG)!r} cannot be read as a config; continuing with the "
                     "new one (--allow-config-change), recorded beside it")
                changed = {CONFIG: ("(unreadable)", "(this config)")}
            altering = {k: v for k, v in changed.items() if not _harmless(k)}
            if altering and not allow_config_change:
                shown = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in list(altering.items())[:6])
                more = f" and {len(altering) - 6} more" if len(altering) > 6 else ""
                raise HkdError(f"--resume: the config differs from the run's saved {str(run_dir / CONFIG)!r} in "
                               f"{len(altering)} key(s) that change the run: {shown}{more}; resume with the saved "
                               "config, or pass --allow-config-change to continue with the new one")
        return RunDirPlan(run_dir, True, changed, config)
    if found and not overwrite:
        raise HkdError(f"--out: {str(run_dir)!r} already holds a run ({', '.join(found)}); continue it with --resume, "
                       "replace it with --overwrite, or choose another --out")
    if found and write:
        aside = run_dir / ASIDE
        aside.mkdir()
        for item in [run_dir / name for name in OUTPUTS] + sorted(run_dir.glob("config.resume-*.yaml")):
            if item.exists() or item.is_symlink():
                os.replace(item, aside / item.name)
    before = frozenset(name for name in OUTPUTS if (run_dir / name).exists())
    return RunDirPlan(run_dir, False, {}, config, created=created, before=before)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
