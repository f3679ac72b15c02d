"""README.md is the front page: its two commands, its example and its links must hold.

Every code block of the README is also run or validated with the docs' (tests/test_docs.py,
tests/doc_blocks.py); these tests check what only the front page promises.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tests import doc_blocks

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_the_readme_is_a_front_page():
    # catches: the user guide growing back into the README
    assert len(README.read_text().splitlines()) <= 250


def test_the_two_commands_work_on_a_fresh_clone_and_ci_runs_the_test_command():
    # catches: a README install line or test command that CI (a fresh clone) does not run
    bash = doc_blocks.fenced(README, "bash")
    first = doc_blocks.commands(bash[0])
    assert [c[0] for c in first] == ["pip", "pip", "pip", "hkd"] and first[-1] == ["hkd", "demo"]
    ci = (ROOT / ".ci" / "run").read_text()
    for words in first[:3]:
        assert " ".join(words[2:]).replace('"', "") in ci.replace('"', ""), words
    assert ["python", "-m", "pytest", "-q"] in [c for block in bash for c in doc_blocks.commands(block)]
    assert "python -m pytest -q" in ci.splitlines()  # the README's test command, as a step of its own


def test_the_sample_demo_output_is_the_recorded_seed_0_run():
    # catches: a README table of demo output that no recorded run printed
    (sample,) = [block for block in doc_blocks.fenced(README, "text") if "pass@1" in block]
    recorded = json.loads((ROOT / "bench/results/demo-seeds/demo-seeds-2026-11-27.json").read_text())["runs"][0]
    assert recorded["seed"] == 0
    shown = {m["model"].strip(): float(m["value"]) for m in
             re.finditer(r"^(?P<model>teacher|student: [^\n]*?)\s+(?P<value>\d\.\d{3})\s", sample, re.M)}
    assert shown == recorded["rows"]


def test_the_example_is_examples_tiny_yaml():
    # catches: a README example that drifted from the file the next command runs
    (example,) = doc_blocks.fenced(README, "yaml")
    assert yaml.safe_load(example) == yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    assert "hkd distill examples/tiny.yaml --out runs/tiny" in README.read_text()


def test_every_link_points_into_the_checkout():
    # catches: a link to a docs page that was renamed or never written
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    assert links and all(not link.startswith("http") for link in links)
    missing = [link for link in links if not (ROOT / link).exists()]
    assert missing == []
    pages = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md")}
    assert {"docs/getting-started.md", "docs/reference/config.md", "docs/benchmarks.md"} <= pages
