from pathlib import Path

import pytest
import yaml

from hkd.config import Config, ConfigError, apply_overrides, from_dict, load_config


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_loads_into_typed_dataclasses(tmp_path, raw_config):
    config = load_config(write(tmp_path, raw_config))
    assert isinstance(config, Config)
    assert config.schedule.phases[1].stages == {"attention": 0.5, "hidden": 1.0}
    assert config.optim.grad_accum == 2 and isinstance(config.optim.lr, float)


def test_unknown_key_is_named_with_its_dotted_path(tmp_path, raw_config):
    raw_config["optim"]["learning_rate"] = 1.0
    with pytest.raises(ConfigError, match=r"optim\.learning_rate: unknown key"):
        load_config(write(tmp_path, raw_config))


def test_wrong_type_inside_a_list_names_the_index(tmp_path, raw_config):
    raw_config["schedule"]["phases"][1]["steps"] = "ten"
    with pytest.raises(ConfigError, match=r"schedule\.phases\[1\]\.steps: expected int, got str 'ten'"):
        load_config(write(tmp_path, raw_config))


def test_bool_is_not_an_int_and_literals_are_checked(tmp_path, raw_config):
    raw_config["optim"]["grad_accum"] = True
    with pytest.raises(ConfigError, match=r"optim\.grad_accum: expected int"):
        load_config(write(tmp_path, raw_config))
    raw_config["optim"]["grad_accum"] = 1
    raw_config["data"]["kind"] = "parquet"
    with pytest.raises(ConfigError, match=r"data\.kind: str 'parquet' is not one of \['jsonl', 'synthetic', 'hf'\]"):
        load_config(write(tmp_path, raw_config))


def test_missing_required_and_impossible_schedule(tmp_path, raw_config):
    del raw_config["schedule"]
    with pytest.raises(ConfigError, match=r"^schedule: missing required key"):
        load_config(write(tmp_path, raw_config))
    raw_config["schedule"] = {"phases": [{"name": "a", "steps": 0, "stages": {"logits": 1.0}}]}
    with pytest.raises(ConfigError, match=r"schedule\.phases\[0\]\.steps: 0 is outside \[1, "):
        load_config(write(tmp_path, raw_config))


def test_dotted_overrides_parse_yaml_values(tmp_path, raw_config):
    config = load_config(write(tmp_path, raw_config), ["--optim.lr=3e-4", "--train.seed=7", "--stages.logits.divergence=jsd"])
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.train.seed == 7
    assert config.stages["logits"]["divergence"] == "jsd"
    with pytest.raises(ConfigError, match=r"override 'optim\.lr': expected --key\.path=value"):
        apply_overrides({}, ["optim.lr"])


def test_relative_paths_resolve_against_the_config_file(tmp_path, raw_config):
    raw_config["teacher"] = {"path": "models/teacher"}
    config = load_config(write(tmp_path, raw_config))
    assert config.teacher.path == str(tmp_path / "models" / "teacher")


def test_exactly_one_of_path_or_preset(tmp_path, raw_config):
    raw_config["student"]["path"] = "somewhere"
    with pytest.raises(ConfigError, match=r"student: set exactly one of student\.path or student\.preset"):
        load_config(write(tmp_path, raw_config))


def test_from_dict_rejects_non_mapping():
    from hkd.config import OptimConfig

    with pytest.raises(ConfigError, match=r"optim: expected a mapping for OptimConfig, got list"):
        from_dict(OptimConfig, [1, 2], "optim")
