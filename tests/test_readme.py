"""The README's examples are code users copy: they must load as the README says."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from hkd.config import Config, from_dict
from hkd.plugin.manager import build_manager
from hkd.plugin.stage import StageSpec, available_stages

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def fenced(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def test_configuration_example_loads_with_every_stage_block_typed():
    (example,) = [block for block in fenced("yaml") if "schedule:" in block and "stages:\n  attention" in block]
    raw = yaml.safe_load(example)
    config = from_dict(Config, raw)
    assert [p.name for p in config.schedule.phases] == ["structure", "feature", "decision", "rl"]
    assert config.schedule.phases[-1].lr_scale == 0.1
    specs = available_stages(build_manager())
    for name, block in raw["stages"].items():  # each stage block against its own config dataclass
        from_dict(specs[name].config_cls, block, f"stages.{name}")


def test_plugin_example_defines_a_working_stage_hook():
    (snippet,) = [block for block in fenced("python") if "hkd_add_stages" in block]
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    (spec,) = namespace["hkd_add_stages"]()
    assert isinstance(spec, StageSpec) and spec.name == "final_cosine" and spec.level == "feature"
    template = Path(__file__).resolve().parents[1] / "examples/plugin-template/hkd_example_plugin/__init__.py"
    assert "class FinalCosineStage(Stage)" in template.read_text()  # the README shows this file's stage


def test_several_teachers_and_per_phase_options_examples_load():
    # catches: README snippets for teachers:/options: that the config would refuse
    base = {"teacher": {"preset": "tiny-llama"}, "student": {"preset": "tiny-llama"},
            "schedule": {"phases": [{"name": "p", "steps": 1, "stages": {"logits": 1.0}}]}}
    (teachers,) = [block for block in fenced("yaml") if "teachers:" in block and "teacher_weight" in block]
    config = from_dict(Config, base | yaml.safe_load(teachers))
    assert [t.weight for t in config.teachers] == [0.5] and config.teacher.path == "/models/teacher-a"
    (phased,) = [block for block in fenced("yaml") if "options: {hidden:" in block]
    config = from_dict(Config, base | yaml.safe_load(phased))
    assert config.schedule.phases[1].options == {"hidden": {"layer_map": {"strategy": "last"}}}


def test_the_three_part_loop_example_names_real_functions():
    # catches: a README loop example calling functions that do not exist (or with other arguments)
    import inspect

    from hkd.train import loop

    (snippet,) = [block for block in fenced("python") if "build_run" in block]
    for name in ("build_run", "train_step", "finish"):
        assert f"{name}(" in snippet and callable(getattr(loop, name))
    assert list(inspect.signature(loop.finish).parameters) == ["run", "step", "metrics"]
