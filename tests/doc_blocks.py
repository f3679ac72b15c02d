"""The code blocks of README.md and docs/**/*.md, and the checks that keep them working.

Every fenced block names its language. ``text`` blocks are output or illustration and are not
checked; ``bash``, ``python``, ``yaml`` and ``toml`` blocks are what a reader copies, and each
is run or validated: shell commands are parsed by the real argument parsers (hkd's, a bench
script's) and the config files they name are loaded; YAML is loaded into the config
dataclass it belongs to (a run, ``hkd generate`` or ``hkd eval`` config, whole or as a
fragment), with every stage block checked by that stage's own dataclass; Python is run
(tests/test_docs.py says how each block is run). Blocks inside generated sections
(``<!-- BEGIN ... -->`` to ``<!-- END ... -->``) belong to their generator's check.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: TOML checks are skipped
    tomllib = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
LANGUAGES = {"bash", "python", "yaml", "toml", "text"}
FENCE = re.compile(r"^```(?P<lang>[^\n`]*)\n(?P<code>.*?)^```$", re.S | re.M)
GENERATED = re.compile(r"<!-- BEGIN [^>]*-->.*?<!-- END [^>]*-->", re.S)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    language: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The page's fenced blocks outside generated sections, with their first line numbers."""
    text = page.read_text()
    hidden = [(m.start(), m.end()) for m in GENERATED.finditer(text)]
    found = []
    for m in FENCE.finditer(text):
        if any(a <= m.start() < b for a, b in hidden):
            continue
        found.append(Block(page, text.count("\n", 0, m.start()) + 1, m["lang"].strip(), m["code"]))
    return found


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks(page)]


def fenced(page: Path | str, language: str) -> list[str]:
    """The code of the page's blocks in ``language``."""
    path = page if isinstance(page, Path) else ROOT / page
    return [b.code for b in blocks(path) if b.language == language]


# --------------------------------------------------------------------------- shell commands


def commands(code: str) -> list[list[str]]:
    """The block's commands as argument lists: continuation lines joined, comments dropped, ``&&`` split."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            if "&&" in words:
                i = words.index("&&")
                out.append(words[:i])
                words = words[i + 1:]
            else:
                out.append(words)
                break
    return [c for c in out if c]


class Parsed(Exception):
    """Raised instead of running a script once its arguments parsed."""


def parse_bench_args(script: str, args: list[str], monkeypatch: Any) -> argparse.Namespace:
    """Parse ``python bench/SCRIPT args`` with the script's own parser, running nothing else."""
    path = ROOT / script
    assert path.is_file(), f"{script} does not exist"
    spec = importlib.util.spec_from_file_location(f"doc_bench_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self: argparse.ArgumentParser, args_: Any = None, namespace: Any = None) -> Any:
        raise Parsed(original(self, args_, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    try:
        if inspect.signature(module.main).parameters:
            module.main(args)
        else:
            module.main()
    except Parsed as parsed:
        return parsed.args[0]
    raise AssertionError(f"{script} never parsed its arguments")


def check_hkd(args: list[str]) -> None:
    """``hkd ARGS``: the subcommand and its options parse; a config under examples/ loads."""
    from hkd.cli import build_parser

    if args in (["--version"], ["--help"]):
        try:
            build_parser().parse_known_args(args)
        except SystemExit as exc:
            assert exc.code == 0
        return
    namespace, extra = build_parser().parse_known_args(args)
    assert all(e.startswith("--") and "=" in e for e in extra), f"hkd {' '.join(args)}: unknown {extra}"
    config = getattr(namespace, "config", None)
    if config and config.startswith("examples/"):
        path = ROOT / config
        assert path.is_file(), f"{config} does not exist"
        if namespace.command in ("distill", "cache-teacher"):
            from hkd.config import load_config

            load_config(path, extra)
        elif namespace.command == "generate":
            from hkd.commands.generate import load_generate_config

            load_generate_config(path, extra)
        elif namespace.command == "eval":
            from hkd.commands.evaluate import load_eval_config

            load_eval_config(path, extra)


def check_pip(args: list[str]) -> None:
    if tomllib is None:
        return
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    ci = (ROOT / ".ci" / "run").read_text()
    assert args[1] == "install", args
    for arg in args[2:]:
        if arg.startswith("-"):
            continue
        match = re.fullmatch(r"(?:hkd|\.)\[([\w,-]+)\]", arg)
        if match:
            assert set(match[1].split(",")) <= extras, f"pip install {arg}: no such extra in pyproject.toml"
        elif arg.startswith("./"):
            assert (ROOT / arg).exists(), f"pip install {arg}: no such path"
        elif "==" in arg:
            assert arg in ci, f"pip install {arg}: .ci/run installs another version"
        else:
            raise AssertionError(f"pip install {arg}: not a package this project names")


def check_command(words: list[str], monkeypatch: Any, tmp_path: Path) -> None:
    """Validate one shell command as a reader would type it in the clone's root."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # OMP_NUM_THREADS=1 python ...
        words = words[1:]
    ci = (ROOT / ".ci" / "run").read_text()
    head = words[0]
    if head == "pip":
        check_pip(words)
    elif head == "hkd":
        check_hkd(words[1:])
    elif head == "torchrun":
        assert "-m" in words and words[words.index("-m") + 1] == "hkd.cli", words
        check_hkd(words[words.index("-m") + 2:])
    elif head == "python" and words[1:3] == ["-m", "pytest"]:
        assert " ".join(words) in ci, f"{' '.join(words)}: CI does not run this command"
    elif head == "python" and words[1].startswith("bench/"):
        parse_bench_args(words[1], words[2:], monkeypatch)
    elif head == "bash" and words[1] == "bench/gpu_check.sh":
        import subprocess

        args = [str(tmp_path / "out") if a.startswith("/tmp/") else a for a in words[2:]]
        if args[:1] in (["--prep"], ["--small"]):  # a download, a few minutes (tests/test_gpu_check.py runs it)
            assert f"{args[0]}) MODE=" in (ROOT / words[1]).read_text()
            assert len(args) == (1 if args[0] == "--prep" else 2), args
            return
        assert "--dry-run" in args, "only the dry run of bench/gpu_check.sh is tried here"
        proc = subprocess.run(["bash", str(ROOT / words[1]), *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    elif head == "bash":
        assert (ROOT / words[1]).is_file() and words[1] in ci, f"{words[1]}: missing, or not run by CI"
    elif head == "pytest":
        assert all((ROOT / w).exists() for w in words[1:] if not w.startswith("-")), words
    elif head == "mkdocs":
        assert " ".join(words) in ci, f"{' '.join(words)}: CI does not run this command"
    else:
        raise AssertionError(f"no check for the command {' '.join(words)!r}; add one to tests/doc_blocks.py")


# --------------------------------------------------------------------------- YAML


BASE_RUN = {"teacher": {"preset": "tiny-llama"}, "student": {"preset": "tiny-llama"},
            "schedule": {"phases": [{"name": "p", "steps": 1, "stages": {"logits": 1.0}}]}}
BASE_GENERATE = {"teacher": {"preset": "tiny-llama"}, "prompts": "p.jsonl", "output": "o.jsonl"}
BASE_EVAL = {"model": {"preset": "tiny-llama"}, "output": "o.json", "text": {"kind": "synthetic"}}


def check_yaml(code: str) -> str:
    """Load a YAML block as the config it belongs to; returns which (run, generate, eval)."""
    from hkd.commands.evaluate import EvalConfig
    from hkd.commands.generate import GenerateConfig
    from hkd.config import Config, ConfigError, from_dict
    from hkd.plugin.manager import build_manager
    from hkd.plugin.stage import available_stages

    raw = yaml.safe_load(code)
    assert isinstance(raw, dict), "a YAML block is a mapping"
    errors = []
    for kind, cls, base in (("run", Config, BASE_RUN), ("generate", GenerateConfig, BASE_GENERATE),
                            ("eval", EvalConfig, BASE_EVAL)):
        try:
            config = from_dict(cls, {**base, **raw})
        except ConfigError as exc:
            errors.append(f"as a {kind} config: {exc}")
            continue
        if kind == "run":
            specs = available_stages(build_manager())
            for name, options in raw.get("stages", {}).items():
                from_dict(specs[name].config_cls, options, f"stages.{name}")
            for i, phase in enumerate(config.schedule.phases):
                for name, options in phase.options.items():
                    merged = {**raw.get("stages", {}).get(name, {}), **options}
                    from_dict(specs[name].config_cls, merged, f"schedule.phases[{i}].options.{name}")
        return kind
    raise AssertionError("; ".join(errors))


def check_toml(code: str) -> None:
    if tomllib is None:
        return
    parsed = tomllib.loads(code)
    assert parsed, "an empty TOML block"
