"""What the CLI says about itself: version, help texts, a missing optional dependency."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hkd import __version__
from hkd.cli import build_parser, main


@pytest.mark.parametrize("option", ["--version", "--help"])
def test_version_and_help_do_not_import_torch(option):
    # bugs: `hkd --version` did not exist; every command paid seconds for importing torch first
    proc = subprocess.run([sys.executable, "-c", f"import runpy, sys\nsys.argv = ['hkd', '{option}']\n"
                           "try:\n    runpy.run_module('hkd.cli', run_name='__main__')\n"
                           "except SystemExit:\n    pass\nprint('torch imported:', 'torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.rstrip().endswith("torch imported: False"), (proc.stdout, proc.stderr)
    if option == "--version":
        assert proc.stdout.split()[:2] == ["hkd", __version__]


def test_distill_help_points_to_the_reference_the_starter_config_and_the_path_rules(capsys):
    # bug: `distill --help` pointed nowhere and did not say what paths are relative to
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Config reference: docs/reference/config.md" in text and "hkd init-config --teacher DIR --student DIR" in text
    assert "--out and paths in overrides are relative to the working directory" in text
    assert "paths inside the YAML file (model and data paths, teacher_cache) are relative to the YAML file" in text


def test_seed_and_the_demo_and_distill_options_have_help():
    # bug: demo --seed and init-model --seed showed a bare "--seed SEED"
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    missing = [f"{name} {action.option_strings or action.dest}" for name, p in sub.choices.items()
               if name in ("demo", "distill", "init-model") for action in p._actions if not action.help]
    assert missing == []


def test_report_without_matplotlib_is_one_error_line(tmp_path, capsys, monkeypatch):
    # bug: a traceback ending in "No module named 'matplotlib'" instead of how to install it
    monkeypatch.delitem(sys.modules, "hkd.commands.report", raising=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("hkd: error: report draws with matplotlib, which is not installed: pip install 'hkd[plot]' "
                   "(or pip install matplotlib)")


def test_demo_task_hard_runs_the_hard_settings_in_their_own_directory(monkeypatch, capsys):
    # catches: --task hard silently running the addition demo (or sharing runs/demo, whose cached
    # teacher belongs to the other task), and --quick combined with it instead of refused
    import hkd.commands.demo as demo

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda settings, out, **kwargs: calls.append((settings, out)))
    assert main(["demo", "--task", "hard", "--seed", "3"]) == 0
    settings, out = calls[-1]
    assert settings == demo.DemoSettings.hard(3) and str(out) == "runs/demo-hard"
    assert main(["demo"]) == 0 and calls[-1] == (demo.DemoSettings(seed=0), calls[-1][1])
    assert str(calls[-1][1]) == "runs/demo"
    assert main(["demo", "--task", "hard", "--quick"]) == 2
    assert "--quick is the addition task's smoke version" in capsys.readouterr().err
