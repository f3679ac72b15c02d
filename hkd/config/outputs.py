"""Where a command writes: checked before any work, written atomically, removed only by name.

Every command that writes (``distill``, ``eval``, ``generate``, ``cache-teacher``,
``init-student``, ``init-model``, ``init-config``, ``report``, ``probe``, ``demo``) checks its
output path first, with :func:`check_output_file` or :func:`check_output_dir`:

* **kind**: a file output that is an existing directory (or a directory output that is an
  existing file), a path below a file, a broken symbolic link or a special file is refused;
* **existence and ownership**: an existing file, or a non-empty directory, is replaced or
  written into only when the command recognises it as its own earlier output (``owner``);
  anything else the user put there is refused by name, never overwritten;
* **writability**: the directory that would hold it must be writable.

Each refusal is one :class:`hkd.errors.HkdError` naming the flag or key and the path, raised
before a model loads. Files are then written through :func:`write_text_atomic` (a temporary
file of the command's own, never a fixed ``NAME.tmp`` that could be the user's), and a command
removes only what it wrote, by name (:func:`remove_named`).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from hkd.errors import HkdError

Owner = Callable[[Path], bool]  # "this existing file or directory is the command's own earlier output"
TEMP_MARK = ".hkd-tmp"  # in every temporary name hkd makes, so one is never mistaken for the user's


def _shown(path: Path) -> str:
    return repr(str(path))


def check_parents(path: Path, flag: str) -> None:
    """The folders above ``path`` are folders (or can be created) and the nearest existing one is writable."""
    target = Path(os.path.abspath(path))
    for parent in target.parents:
        if parent.is_symlink() and not parent.exists():
            raise HkdError(f"{flag}: {_shown(path)} cannot be created: {_shown(parent)} is a broken symbolic link")
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise HkdError(f"{flag}: {_shown(path)} cannot be created: {_shown(parent)} is a file, not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise HkdError(f"{flag}: {_shown(path)} cannot be written: the directory {_shown(parent)} is not "
                           "writable")
        return


def check_output_file(path: str | Path, flag: str, command: str, *, owner: Owner | None = None,
                      example: str = "results.json", why: str = "") -> Path:
    """Refuse, before any work, a file output ``command`` could not write or must not replace.

    ``owner``: whether an existing file is the command's own earlier output (then it may be
    replaced); ``None`` refuses any existing file. ``example``: a file name to suggest when
    ``path`` is a directory; ``why``: how the command tells its own files, for the refusal.
    """
    p = Path(path)
    check_parents(p, flag)
    if p.is_symlink() and not p.exists():
        raise HkdError(f"{flag}: {_shown(p)} is a broken symbolic link; give a file path")
    if p.is_dir():
        raise HkdError(f"{flag}: {_shown(p)} is a directory, but hkd {command} writes a file there "
                       f"(e.g. {str(p / example)!r})")
    if p.exists():
        if not stat.S_ISREG(p.stat().st_mode):
            raise HkdError(f"{flag}: {_shown(p)} exists and is not a regular file")
        if owner is None or not owner(p):
            raise HkdError(f"{flag}: {_shown(p)} exists and was not written by {command}{f' ({why})' if why else ''}; "
                           "choose another path or move the file away (hkd replaces only its own outputs)")
        if not os.access(p, os.W_OK):
            raise HkdError(f"{flag}: {_shown(p)} cannot be written (no write permission)")
    return p


def check_output_dir(path: str | Path, flag: str, command: str, *, owner: Owner | None = None, why: str = "") -> Path:
    """Refuse, before any work, a directory output ``command`` could not write or must not write into.

    A new or empty directory is fine; a non-empty one only when ``owner`` recognises it as the
    command's own earlier output (``None``: any non-empty directory is refused).
    """
    p = Path(path)
    check_parents(p, flag)
    if p.is_symlink() and not p.exists():
        raise HkdError(f"{flag}: {_shown(p)} is a broken symbolic link; give a directory")
    if p.exists() and not p.is_dir():
        raise HkdError(f"{flag}: {_shown(p)} exists and is not a directory")
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise HkdError(f"{flag}: {_shown(p)} cannot be written: the directory is not writable")
        if any(p.iterdir()) and (owner is None or not owner(p)):
            raise HkdError(f"{flag}: {_shown(p)} is not empty and was not written by {command}"
                           f"{f' ({why})' if why else ''}; choose a new or empty directory (hkd writes only into its "
                           "own outputs)")
    return p


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file of our own in the same folder, renamed over it:
    a reader sees the old file or the new one, and no file of the user's is touched on the way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_MARK, dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temp_dir_beside(path: Path) -> Path:
    """A new empty directory next to ``path``, for writing a directory output before it is moved in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_MARK, dir=path.parent))


def remove_named(folder: Path, names: Iterable[str]) -> None:
    """Remove the entries ``names`` of ``folder`` (files or directories hkd wrote), nothing else."""
    for name in names:
        item = folder / name
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        elif item.exists() or item.is_symlink():
            item.unlink()


def move_into(source: Path, target: Path, previous: Iterable[str] = ()) -> None:
    """Put the directory ``source`` (a finished output written beside ``target``) in place of ``target``.

    A missing ``target`` is replaced in one rename. An existing one keeps every entry hkd did not
    write: the entries ``previous`` (what the command wrote there before) are removed by name, and
    ``source``'s entries are moved in one by one.
    """
    if not target.exists():
        os.replace(source, target)
        return
    remove_named(target, [name for name in previous if not (source / name).exists()])
    for item in sorted(source.iterdir()):
        destination = target / item.name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(item, destination)
    source.rmdir()
