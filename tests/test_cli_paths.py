"""Where paths are resolved, and switching a model's source from the command line."""

from __future__ import annotations

from pathlib import Path

import yaml

from hkd.config import load_config
from hkd.commands.evaluate import load_eval_config


def test_teacher_path_override_clears_the_preset_and_says_so(tmp_path, raw_config, capsys, monkeypatch):
    # bug: --teacher.path on a preset config failed "set exactly one of teacher.path or teacher.preset"
    # unless the user also knew the undocumented --teacher.preset=null
    config_file = tmp_path / "configs" / "cfg.yaml"
    config_file.parent.mkdir()
    config_file.write_text(yaml.safe_dump(raw_config))
    monkeypatch.chdir(tmp_path)
    config = load_config(config_file, ["--teacher.path=models/teacher"])
    assert config.teacher.preset is None and config.teacher.preset_overrides == {}
    # bug: an override's path was resolved against the YAML file's folder (configs/models/teacher)
    assert config.teacher.path == str(tmp_path / "models" / "teacher")
    assert "--teacher.path clears teacher.preset and teacher.preset_overrides" in capsys.readouterr().err


def test_preset_override_clears_the_path(tmp_path, raw_config, capsys):
    raw_config["student"] = {"path": "somewhere"}
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(yaml.safe_dump(raw_config))
    config = load_config(config_file, ["--student.preset=tiny-llama"])
    assert config.student.path is None and config.student.preset == "tiny-llama"
    assert "--student.preset clears student.path" in capsys.readouterr().err


def test_paths_inside_the_yaml_are_relative_to_the_file_and_overrides_to_the_cwd(tmp_path, monkeypatch):
    examples = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.chdir(tmp_path)  # not the clone's root: the file's own paths must still line up
    config = load_eval_config(examples / "eval.yaml", ["--output=out/eval.json"])
    assert config.prompts is not None and Path(config.prompts.path) == examples / "arith_prompts.jsonl"
    assert ".." not in Path(config.prompts.path).parts
    assert config.output == str(tmp_path / "out" / "eval.json")
