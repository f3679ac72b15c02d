"""The README's examples are code users copy: they must load as the README says."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from hkd.config import Config, from_dict
from hkd.manager import build_manager
from hkd.stage import StageSpec, available_stages

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def fenced(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def test_configuration_example_loads_with_every_stage_block_typed():
    (example,) = [block for block in fenced("yaml") if "schedule:" in block]
    raw = yaml.safe_load(example)
    config = from_dict(Config, raw)
    assert [p.name for p in config.schedule.phases] == ["structure", "feature", "decision", "rl"]
    assert config.schedule.phases[-1].lr_scale == 0.1
    specs = available_stages(build_manager())
    for name, block in raw["stages"].items():  # each stage block against its own config dataclass
        from_dict(specs[name].config_cls, block, f"stages.{name}")


def test_plugin_example_defines_a_working_stage_hook():
    (snippet,) = fenced("python")
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    (spec,) = namespace["hkd_add_stages"]()
    assert isinstance(spec, StageSpec) and spec.name == "final_cosine" and spec.level == "feature"
    template = Path(__file__).resolve().parents[1] / "examples/plugin-template/hkd_example_plugin/__init__.py"
    assert "class FinalCosineStage(Stage)" in template.read_text()  # the README shows this file's stage
