import math

import pytest

from hkd.config import OptimConfig, PhaseConfig, ScheduleConfig, TemperatureConfig
from hkd.models.layermap import build_layer_map
from hkd.errors import ConfigError
from hkd.plugin.schedule import Schedule


def make(ramp=2, temperature=None, warmup=0):
    phases = [PhaseConfig("a", 4, {"attention": 1.0}), PhaseConfig("b", 6, {"attention": 0.5, "logits": 1.0})]
    return Schedule(ScheduleConfig(phases, ramp, temperature or TemperatureConfig()), OptimConfig(warmup_steps=warmup))


def test_phases_and_linear_ramps_between_them():
    s = make(ramp=2)
    assert s.total_steps == 10 and s.phase_at(3).name == "a" and s.phase_at(4).name == "b"
    assert s.weights(0) == {"attention": 1.0, "logits": 0.0}
    # ramp over 2 steps: fractions 1/3, 2/3, then the target
    assert s.weights(4) == pytest.approx({"attention": 1.0 - 0.5 / 3, "logits": 1 / 3})
    assert s.weights(5) == pytest.approx({"attention": 1.0 - 1.0 / 3, "logits": 2 / 3})
    assert s.weights(6) == {"attention": 0.5, "logits": 1.0}


@pytest.mark.parametrize("kind,mid", [("constant", 4.0), ("linear", 2.5), ("cosine", 2.5)])
def test_temperature_schedules(kind, mid):
    s = make(temperature=TemperatureConfig(kind, 4.0, 1.0))
    assert s.temperature(0) == 4.0
    assert s.temperature(9) == pytest.approx(4.0 if kind == "constant" else 1.0)
    halfway = s.temperature(4.5)  # progress 0.5
    assert halfway == pytest.approx(mid)
    if kind == "cosine":  # cosine anneals slowly at first
        assert s.temperature(1) > 4.0 - 3.0 * (1 / 9)


def test_warmup_then_cosine_lr():
    s = make(warmup=2)
    assert s.lr_factor(0) == pytest.approx(1 / 3) and s.lr_factor(1) == pytest.approx(2 / 3)
    assert s.lr_factor(2) == pytest.approx(1.0)
    floor = OptimConfig().min_lr_ratio
    assert s.lr_factor(10) == pytest.approx(floor)
    assert s.lr_factor(6) == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_layer_maps():
    assert build_layer_map("uniform", 2, 4) == [(1, 2), (2, 4)]
    assert build_layer_map("uniform", 3, 12, include_embeddings=True) == [(0, 0), (1, 4), (2, 8), (3, 12)]
    assert build_layer_map("last", 2, 6) == [(2, 6)]
    assert build_layer_map("explicit", 2, 4, pairs=[[1, 1], [2, 3]]) == [(1, 1), (2, 3)]


def test_out_of_range_layer_map_is_named():
    with pytest.raises(ConfigError, match=r"stages\.hidden\.layer_map: teacher layer 7 is out of range 0\.\.4"):
        build_layer_map("explicit", 2, 4, pairs=[[1, 7]], where="stages.hidden.layer_map")
    with pytest.raises(ConfigError, match=r"pairs\[0\]: expected \[student_layer, teacher_layer\]"):
        build_layer_map("explicit", 2, 4, pairs=[[1]])


def test_phase_lr_scale_rescales_only_its_phase():
    phases = [PhaseConfig("a", 4, {"attention": 1.0}), PhaseConfig("rl", 6, {"rl": 1.0}, lr_scale=0.25)]
    scaled = Schedule(ScheduleConfig(phases, 0, TemperatureConfig()), OptimConfig(warmup_steps=2))
    plain = make(warmup=2)
    for step in range(4):
        assert scaled.lr_factor(step) == pytest.approx(plain.lr_factor(step))
    for step in range(4, 12):
        assert scaled.lr_factor(step) == pytest.approx(0.25 * plain.lr_factor(step))


def test_non_positive_lr_scale_is_named():
    # catches: an lr_scale of 0 accepted (the phase would silently not train)
    from hkd.config import Config, from_dict

    raw = {"teacher": {"preset": "tiny-llama"}, "student": {"preset": "tiny-llama"},
           "schedule": {"phases": [{"name": "a", "steps": 2, "stages": {"logits": 1.0}, "lr_scale": 0}]}}
    with pytest.raises(ConfigError, match=r"schedule\.phases\[0\]\.lr_scale: 0(\.0)? is outside \(0, 1000\]"):
        from_dict(Config, raw)


def test_per_phase_stage_options_run_their_own_instance(raw_config, tmp_path):
    # catches: options fixed for the whole run (TinyBERT's "all layers, then the last" impossible),
    # or a phase's options leaking into the other phase's instance
    import json

    from hkd.config import Config, from_dict
    from hkd.train.loop import distill

    raw_config["stages"] = {"hidden": {"log_layers": True, "layer_map": {"strategy": "uniform"}}}
    raw_config["schedule"] = {"phases": [
        {"name": "all", "steps": 2, "stages": {"hidden": 1.0}},
        {"name": "last", "steps": 2, "stages": {"hidden": 1.0}, "options": {"hidden": {"layer_map": {"strategy": "last"}}}},
    ]}
    result = distill(from_dict(Config, raw_config), tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    pairs = [sorted(k.rsplit("/", 1)[1] for k in line if k.startswith("metric/layer/hidden/")) for line in lines]
    assert pairs[:2] == [["1_2", "2_4"]] * 2 and pairs[2:] == [["2_4"]] * 2
    assert result.steps == 4


def test_per_phase_options_for_a_stage_outside_the_phase_are_refused(raw_config, tmp_path):
    from hkd.config import Config, ConfigError, from_dict
    from hkd.train.loop import distill

    raw_config["schedule"] = {"phases": [{"name": "p", "steps": 1, "stages": {"hidden": 1.0},
                                          "options": {"logits": {"alpha": 0.5}}}]}
    with pytest.raises(ConfigError, match=r"schedule.phases\[0\].options.logits: stage 'logits' is not in this phase"):
        distill(from_dict(Config, raw_config), tmp_path / "run")
