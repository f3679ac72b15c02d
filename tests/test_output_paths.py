"""Every output path of every command is checked before any work (kind, existence, ownership), and no
command removes anything it did not write. Issue: "Nothing silently wrong, on the whole surface",
classes 1 (output paths checked late) and 8 (a command deletes more than it wrote)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from hkd.cli import main
from hkd.config.outputs import check_output_dir, check_output_file, move_into, remove_named, write_text_atomic
from hkd.errors import HkdError


def snapshot(root: Path) -> dict[str, Any]:
    """Every entry under ``root`` (links not followed): file bytes, or the link target, or 'dir'."""
    out: dict[str, Any] = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = ("link", os.readlink(p))
        elif p.is_dir():
            out[key] = "dir"
        else:
            out[key] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, model_dirs) -> dict[str, Path]:
    """Configs for every command, a finished run (for report and probe), all outside the test's own folder."""
    from tests.conftest import BASE_CONFIG

    root = tmp_path_factory.mktemp("world")
    distill = json.loads(json.dumps(BASE_CONFIG))
    distill["teacher"] = {"path": str(model_dirs["teacher"])}
    distill["student"] = {"path": str(model_dirs["student"])}
    distill["data"] = {"kind": "synthetic", "num_examples": 8, "batch_size": 4, "max_length": 32}
    distill["schedule"] = {"phases": [{"name": "p", "steps": 1, "stages": {"logits": 1.0}}]}
    distill["stages"] = {}
    (root / "distill.yaml").write_text(yaml.safe_dump(distill))
    (root / "prompts.jsonl").write_text('{"id": 1, "prompt": "1+1=", "answer": "2"}\n')
    (root / "generate.yaml").write_text(yaml.safe_dump({
        "teacher": {"path": str(model_dirs["teacher"])}, "prompts": "prompts.jsonl", "output": "kept.jsonl",
        "n": 1, "max_new_tokens": 4, "progress": False}))
    (root / "eval.yaml").write_text(yaml.safe_dump({
        "model": {"path": str(model_dirs["student"])}, "output": "eval.json", "progress": False,
        "text": {"kind": "synthetic", "num_examples": 4, "batch_size": 4, "max_length": 32}}))
    assert main(["distill", str(root / "distill.yaml"), "--out", str(root / "run"), "--no-progress"]) == 0
    return {"root": root, "run": root / "run", **model_dirs}


# every command that writes, and how to point its output at PATH (one argv per command)
FILE_OUTPUTS: dict[str, Callable[[dict[str, Path], str], list[str]]] = {
    "eval": lambda w, out: ["eval", str(w["root"] / "eval.yaml"), "--out", out, "--no-progress"],
    "generate": lambda w, out: ["generate", str(w["root"] / "generate.yaml"), "--out", out, "--no-progress"],
    "init-config": lambda w, out: ["init-config", "--teacher", str(w["teacher"]), "--student", str(w["student"]),
                                   "--out", out],
}
DIR_OUTPUTS: dict[str, Callable[[dict[str, Path], str], list[str]]] = {
    "distill": lambda w, out: ["distill", str(w["root"] / "distill.yaml"), "--out", out, "--no-progress"],
    "cache-teacher": lambda w, out: ["cache-teacher", str(w["root"] / "distill.yaml"), "--out", out, "--no-progress"],
    "init-student": lambda w, out: ["init-student", "--teacher", str(w["teacher"]), "--out", out],
    "init-model": lambda w, out: ["init-model", "tiny-llama", "--out", out],
    "report": lambda w, out: ["report", str(w["run"]), "--out", out],
    "demo": lambda w, out: ["demo", "--quick", "--out", out, "--no-progress"],
}


def make_bad(kind: str, base: Path, expects: str) -> tuple[str, str]:
    """Create a bad output path of ``kind`` under ``base``; return (path, pattern its refusal must match)."""
    (base / "a-file").write_text("the user's file\n")
    if kind == "below a file":
        return str(base / "a-file" / "out"), r"cannot be created: '.*a-file' is a file, not a directory"
    if kind == "broken link":
        (base / "link").symlink_to(base / "nowhere" / "x")
        return str(base / "link"), r"is a broken symbolic link"
    if kind == "wrong kind":
        if expects == "file":
            (base / "folder").mkdir()
            return str(base / "folder"), r"'.*folder' is a directory, but hkd \S+ writes a file there"
        return str(base / "a-file"), r"'.*a-file' exists and is not a directory"
    assert kind == "foreign"
    if expects == "file":
        return str(base / "a-file"), r"'.*a-file' (exists and was not written by|already exists)"
    (base / "mine").mkdir()
    (base / "mine" / "notes.txt").write_text("mine\n")
    return str(base / "mine"), r"'.*mine' is not empty and was not written by"


CASES = [(c, k, "file") for c in FILE_OUTPUTS for k in ("below a file", "broken link", "wrong kind", "foreign")]
CASES += [(c, k, "dir") for c in DIR_OUTPUTS for k in ("below a file", "broken link", "wrong kind", "foreign")
          if not (c == "distill" and k == "foreign")]  # distill writes into any directory holding no run


@pytest.mark.parametrize("command,kind,expects", CASES)
def test_every_output_path_of_every_command_is_checked_first(command, kind, expects, world, tmp_path, capsys):
    # catches: an output path checked only when written, after all the work (eval --out DIR died with
    # IsADirectoryError and left DIR.tmp), a foreign file or directory overwritten or written into
    path, pattern = make_bad(kind, tmp_path, expects)
    before = snapshot(tmp_path)
    argv = (FILE_OUTPUTS if expects == "file" else DIR_OUTPUTS)[command](world, path)
    start = time.monotonic()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("hkd: error: --out: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert time.monotonic() - start < 20  # refused before any model loads or trains
    assert snapshot(tmp_path) == before  # nothing written, nothing removed, no PATH.tmp left


def test_probe_checks_its_output_inside_the_run_first(world, tmp_path, capsys):
    # catches: probe computing every matrix, then dying on RUN/probe being a file (or the JSON a directory)
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    (run / "probe").write_text("not a folder")
    assert main(["probe", str(run), "--no-progress"]) == 2
    assert re.search(r"hkd: error: probe output: '.*probe' exists and is not a directory", capsys.readouterr().err)
    (run / "probe").unlink()
    (run / "probe" / "step-00000001.json").mkdir(parents=True)
    assert main(["probe", str(run), "--no-progress"]) == 2
    assert "step-00000001.json' is a directory" in capsys.readouterr().err


def test_a_commands_own_earlier_output_is_replaced(world, tmp_path, capsys):
    # catches: the ownership check refusing what the command itself wrote last time (re-running eval,
    # report, init-model, cache-teacher into the same place must work)
    out = tmp_path / "r.json"
    for _ in range(2):
        assert main(FILE_OUTPUTS["eval"](world, str(out))) == 0
    assert set(json.loads(out.read_text())) == {"text"}
    for command in ("report", "init-model"):
        for _ in range(2):
            assert main(DIR_OUTPUTS[command](world, str(tmp_path / command))) == 0, capsys.readouterr().err
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".hkd-tmp"))]


def test_output_helpers_unit():
    # catches: a helper accepting what a command would then fail on (a FIFO, an unwritable folder)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        os.mkfifo(base / "fifo")
        with pytest.raises(HkdError, match=r"x: '.*fifo' exists and is not a regular file"):
            check_output_file(base / "fifo", "x", "hkd eval", owner=lambda p: True)
        assert check_output_file(base / "new" / "deeper.json", "x", "hkd eval") == base / "new" / "deeper.json"
        assert check_output_dir(base / "empty", "x", "hkd report") == base / "empty"
        write_text_atomic(base / "t.txt", "one")
        write_text_atomic(base / "t.txt", "two")
        assert (base / "t.txt").read_text() == "two" and sorted(p.name for p in base.iterdir()) == ["fifo", "t.txt"]
        if os.geteuid() != 0:  # root writes anywhere
            (base / "locked").mkdir(mode=0o500)
            with pytest.raises(HkdError, match="not writable"):
                check_output_file(base / "locked" / "r.json", "x", "hkd eval")


# --------------------------------------------------------------------------- 8. removal by name


def test_init_student_rerun_keeps_what_the_user_added(world, tmp_path, capsys):
    # catches: re-running init-student --out DIR on its own earlier output deleted DIR as a whole (a
    # file the user had added there was lost), and DIR.tmp (a folder of the user's) being deleted
    out = tmp_path / "cut"
    assert main(["init-student", "--teacher", str(world["teacher"]), "--out", str(out), "--layers", "every:2"]) == 0
    (out / "README.md").write_text("my notes\n")
    (tmp_path / "cut.tmp").mkdir()
    (tmp_path / "cut.tmp" / "keep.txt").write_text("also mine\n")
    record = json.loads((out / "hkd-init.json").read_text())
    assert "model.safetensors" in record["files"] and "README.md" not in record["files"]
    (out / "generation_config.json").unlink(missing_ok=True)  # a file it wrote and the new one may not
    assert main(["init-student", "--teacher", str(world["teacher"]), "--out", str(out), "--layers", "every:4"]) == 0
    capsys.readouterr()
    assert (out / "README.md").read_text() == "my notes\n"
    assert (tmp_path / "cut.tmp" / "keep.txt").read_text() == "also mine\n"
    assert json.loads((out / "hkd-init.json").read_text())["teacher_blocks"] == [3]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".hkd-tmp")]


def test_move_into_and_remove_named_touch_only_named_entries(tmp_path):
    # catches: a replaced output losing the entries that were not the command's (a whole-directory rmtree)
    target, source = tmp_path / "out", tmp_path / "new"
    target.mkdir()
    source.mkdir()
    for name in ("model.bin", "stale.json", "user.txt"):
        (target / name).write_text("old")
    (source / "model.bin").write_text("new")
    move_into(source, target, previous=["model.bin", "stale.json"])
    assert {p.name: p.read_text() for p in target.iterdir()} == {"model.bin": "new", "user.txt": "old"}
    assert not source.exists()
    remove_named(target, ["model.bin", "absent"])
    assert [p.name for p in target.iterdir()] == ["user.txt"]


def test_demo_clears_only_its_own_runs(tmp_path):
    # catches: the demo's rmtree of OUT/teacher and OUT/students/ARM deleting whatever the user kept there
    from hkd.commands.demo import remove_run

    run = tmp_path / "teacher"
    for name in ("checkpoints", "final", "phases"):
        (run / name).mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "demo-teacher.json", "config.resume-1.yaml", "mine.txt"):
        (run / name).write_text("x")
    remove_run(run, "demo-teacher.json", "phases")
    assert [p.name for p in run.iterdir()] == ["mine.txt"]


def test_demo_refuses_a_foreign_directory_and_reuses_its_own(tmp_path):
    # catches: hkd demo --out PROJECT writing into (and clearing teacher/ in) a folder that is not the demo's
    from hkd.commands.demo import DemoSettings, is_demo_dir, run_demo

    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "weights.bin").write_text("someone's model")
    with pytest.raises(HkdError, match=r"--out: '.*' is not empty and was not written by demo"):
        run_demo(DemoSettings.quick(0), tmp_path, progress=False)
    assert (tmp_path / "teacher" / "weights.bin").read_text() == "someone's model"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "heldout.jsonl").write_text("")
    assert is_demo_dir(tmp_path)
