"""Options that act only with another are refused (or, where harmless, warned about) by one table per
config (hkd/config/needs.py) and one for command-line flags (hkd.cli.FLAG_NEEDS).
Issue "Nothing silently wrong, on the whole surface", class 4."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from hkd.cli import FLAG_NEEDS, main
from hkd.config import ConfigError, load_config
from hkd.config.needs import CONFIG_NEEDS, EVAL_NEEDS, GENERATE_NEEDS

TEACHER2 = {"preset": "tiny-llama", "preset_overrides": {"hidden_size": 32, "intermediate_size": 64,
                                                         "num_hidden_layers": 2, "num_attention_heads": 2,
                                                         "num_key_value_heads": 1}}
JSONL = {"kind": "jsonl", "path": "d.jsonl"}

# option -> (changes that set it where it cannot act, changes that set it where it acts).
# Bugs caught: each option silently ignored (eval: {every: 0, patience: 3} trained without ever
# evaluating; teacher_cache with a streamed data set hung fingerprinting an endless stream; ...)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "eval.patience": ({"eval": {"patience": 3}}, {"eval": {"every": 2, "patience": 3}}),
    "eval.min_delta": ({"eval": {"min_delta": 0.1}}, {"eval": {"every": 2, "min_delta": 0.1}}),
    "eval.metric": ({"eval": {"metric": "loss"}}, {"eval": {"every": 2, "metric": "loss"}}),
    "eval.path": ({"eval": {"path": "h.jsonl"}}, {"eval": {"every": 2, "path": "h.jsonl"}}),
    "eval.max_batches": ({"eval": {"max_batches": 2}}, {"eval": {"every": 2, "max_batches": 2}}),
    "eval.num_examples": ({"eval": {"every": 2, "path": "h.jsonl", "num_examples": 5}},
                          {"eval": {"every": 2, "num_examples": 5}}),
    "data.path": ({"data": {"path": "d.jsonl"}}, {"data": JSONL}),
    "data.prompt_field": ({"data": {"prompt_field": "p"}}, {"data": {**JSONL, "prompt_field": "p"}}),
    "data.completion_field": ({"data": {**JSONL, "completion_field": "c"}},
                              {"data": {**JSONL, "prompt_field": "p", "completion_field": "c"}}),
    "data.chat_template": ({"data": {"kind": "hf", "path": "d.jsonl", "chat_template": True}},
                           {"data": {"kind": "hf", "path": "d.jsonl", "prompt_field": "p", "chat_template": True}}),
    "data.num_proc": ({"data": {**JSONL, "num_proc": 2}}, {"data": {"kind": "hf", "path": "d.jsonl", "num_proc": 2}}),
    "train.compile_backend": ({"train": {"compile_backend": "eager"}},
                              {"train": {"compile": True, "compile_backend": "eager"}}),
    "teacher_weight": ({"teacher_weight": 2.0}, {"teacher_weight": 2.0, "teachers": [TEACHER2]}),
    "schedule.temperature.end": ({"schedule": {"temperature": {"end": 2.0}}},
                                 {"schedule": {"temperature": {"kind": "linear", "end": 2.0}}}),
    "teacher_cache": ({"teacher_cache": "c", "data": {"kind": "hf", "path": "d.jsonl", "streaming": True}},
                      {"teacher_cache": "c", "data": {"kind": "hf", "path": "d.jsonl"}}),
    # harmless leftovers: warned about
    "data.text_field": ({"data": {**JSONL, "prompt_field": "p", "text_field": "t"}}, {"data": {**JSONL, "text_field": "t"}}),
    "data.on_bad_line": ({"data": {"on_bad_line": "skip"}}, {"data": {**JSONL, "on_bad_line": "skip"}}),
    "data.num_examples": ({"data": {**JSONL, "num_examples": 7}}, {"data": {"num_examples": 7}}),
    "data.digits": ({"data": {**JSONL, "digits": 3}}, {"data": {"digits": 3}}),
    "teacher.preset_overrides": ({"teacher": {"path": "/t", "preset": None}}, {}),
    "teacher.seed": ({"teacher": {"path": "/t", "preset": None, "preset_overrides": {}}}, {}),
    "student.preset_overrides": ({"student": {"path": "/s", "preset": None}}, {}),
    "student.seed": ({"student": {"path": "/s", "preset": None, "preset_overrides": {}}}, {}),
    "teachers[0].preset_overrides": ({"teachers": [{"path": "/t", "preset_overrides": {"x": 1}}]},
                                     {"teachers": [TEACHER2]}),
    "teachers[0].seed": ({"teachers": [{"path": "/t", "seed": 3}]}, {"teachers": [{**TEACHER2, "seed": 3}]}),
    "schedule.ramp_steps": ({"schedule": {"phases": [{"name": "p", "steps": 1, "stages": {"logits": 1.0}}]}}, {}),
    "logging.wandb.project": ({"logging": {"wandb": {"project": "x"}}},
                              {"logging": {"backends": ["jsonl", "wandb"], "wandb": {"project": "x"}}}),
    "stages.attention": ({"schedule": {"phases": [{"name": "p", "steps": 1, "stages": {"logits": 1.0}}]},
                          "stages": {"attention": {}}}, {"stages": {"attention": {}}}),
}
for extra in ("mode", "entity", "name"):  # the other wandb options, like project
    CASES[f"logging.wandb.{extra}"] = ({"logging": {"wandb": {extra: "disabled" if extra == "mode" else "x"}}},
                                       {"logging": {"backends": ["wandb"], "wandb": {extra: "online" if extra == "mode"
                                                                                     else "x"}}})


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("teacher", "student"):
            out[key] = merged(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


def load(tmp_path: Path, raw: dict[str, Any]):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def harmless(option: str) -> bool:
    row = next(r for r in CONFIG_NEEDS
               if re.fullmatch(re.escape(r.option).replace(r"\[\]", r"\[\d+\]").replace(r"\*", r"\w+"), option))
    return row.warn


def test_every_row_of_the_table_has_a_case():
    # catches: a dependency added to the table without a test that it refuses (or a case for a row removed)
    names = set()
    for row in CONFIG_NEEDS:
        option = row.option.replace("[]", "[0]").replace("*", "attention")
        names.add(option)
    assert names <= set(CASES), sorted(names - set(CASES))


@pytest.mark.parametrize("option", sorted(CASES))
def test_an_option_that_cannot_act_is_refused_and_one_that_acts_loads(option, tmp_path, raw_config, capsys):
    """Property over the whole table: set where it cannot act, the option is refused by name (or, where
    harmless, warned about by name); set where it acts, the same value loads without a word about it."""
    cannot, can = CASES[option]
    pattern = rf"^{re.escape(option)}: .* has no effect unless "
    if harmless(option):
        load(tmp_path, merged(raw_config, cannot))
        warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hkd: warning: ")]
        assert any(re.search(pattern, line.removeprefix("hkd: warning: ")) for line in warned), warned
    else:
        with pytest.raises(ConfigError, match=pattern):
            load(tmp_path, merged(raw_config, cannot))
    load(tmp_path, merged(raw_config, can))
    assert option not in capsys.readouterr().err


def test_the_issue_example_through_the_cli_is_one_line_and_nothing_is_written(tmp_path, raw_config, capsys):
    # catches: eval: {every: 0, patience: 3} training without evaluating and never stopping early, silently
    raw = merged(raw_config, {"eval": {"every": 0, "patience": 3}, "logging": {"wandb": {"project": "leftover"}}})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    code = main(["distill", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and lines == ["hkd: error: eval.patience: 3 has no effect unless eval.every > 0 (validation "
                                   "runs) (eval.every is 0); remove it or change that"]  # the warning is not shown
    assert not (tmp_path / "run").exists()


def test_harmless_leftovers_still_train_and_are_named(tmp_path, raw_config, capsys):
    # valid-but-unusual input: leftovers are warned about, and the run trains
    raw = merged(raw_config, {"logging": {"wandb": {"project": "later"}}, "stages": {"sentence": {}}})
    for phase in raw["schedule"]["phases"]:
        phase["steps"] = 1
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    assert main(["distill", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hkd: warning:")]
    assert any(line.startswith("hkd: warning: logging.wandb.project: 'later'") for line in warned), warned
    assert any(line.startswith("hkd: warning: stages.sentence: {}") for line in warned), warned


@pytest.mark.parametrize("options,pattern", [
    ({"divergence": "forward_kl", "beta": 0.3}, r"stages\.logits\.beta: 0\.3 has no effect unless divergence is jsd"),
    ({"skew": 0.2}, r"stages\.logits\.skew: 0\.2 has no effect unless divergence is skew_forward_kl"),
    ({"teachers": "sum"}, r"stages\.logits\.teachers: 'sum' combines several teachers; this run has one"),
    ({"fused_grad_fp32": True}, r"stages\.logits\.fused_grad_fp32: True has no effect unless fused is true"),
])
def test_stage_options_that_cannot_act_are_refused_when_the_stage_is_built(options, pattern, tmp_path, raw_config,
                                                                            capsys):
    # catches: a stage option (a jsd weight under forward KL, a teachers mode with one teacher) silently ignored
    raw_config["stages"]["logits"] = options
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw_config))
    code = main(["distill", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and re.search(pattern, lines[0]), lines
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("row", range(len(FLAG_NEEDS)))
def test_every_flag_that_needs_another_is_refused_without_it(row, tmp_path, capsys):
    # catches: cache-teacher --samples without --targets sampled (or init-student --batches without
    # --data) accepted and silently ignored
    command, flag, needs, _ = FLAG_NEEDS[row]
    value = {"--temperature": "2.0"}.get(flag, "3")
    if command == "cache-teacher":
        targets = {"--top-k": "sampled", "--temperature": "none"}.get(flag, "topk")
        argv = ["cache-teacher", str(tmp_path / "cfg.yaml"), "--targets", targets, flag, value]
    else:
        argv = ["init-student", "--teacher", str(tmp_path), "--out", str(tmp_path / "o"), flag, value]
        if flag == "--completion-field":
            argv += ["--data", "d.jsonl"]
        if flag == "--text-field":
            argv += ["--data", "d.jsonl", "--prompt-field", "p"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hkd: error: {flag} {value}: has no effect without ") and "\n" not in err, err


EVAL_CASES = [
    ({"teacher": {"preset": "tiny-llama"}, "prompts": {"path": "p.jsonl", "verifiers": [{"name": "exact_answer"}]}},
     r"^teacher: .* has no effect unless text is set"),
    ({"text": {"kind": "hf", "path": "d.jsonl", "streaming": True}}, r"^text\.streaming: True has no effect"),
    ({"text": {"kind": "synthetic", "packing": True}}, r"^text\.packing: True has no effect"),
    ({"text": {"kind": "synthetic", "num_proc": 4}}, r"^text\.num_proc: 4 has no effect unless text\.kind is hf"),
]


@pytest.mark.parametrize("changes,pattern", EVAL_CASES)
def test_eval_config_options_that_cannot_act(changes, pattern, tmp_path):
    # catches: an eval teacher without a text set (no agreement is ever computed), a streamed or packed
    # eval text set (a length error after loading models, or packing silently ignored)
    from hkd.commands.evaluate import load_eval_config

    raw = {"model": {"preset": "tiny-llama"}, "output": "r.json", "text": {"kind": "synthetic"}, **changes}
    if "teacher" in changes:
        raw.pop("text")
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=pattern):
        load_eval_config(tmp_path / "e.yaml")
    assert {r.option.split(".")[0] for r in EVAL_NEEDS} >= {"teacher", "text"}


def test_generate_verifiers_in_augment_mode_are_refused(tmp_path):
    # catches: verifiers configured for mode: augment, which samples and verifies nothing
    from hkd.commands.generate import load_generate_config

    raw = {"teacher": {"preset": "tiny-llama"}, "prompts": "p.jsonl", "output": "o.jsonl", "mode": "augment",
           "augment": [{"name": "arith_operands"}],
           "verifiers": [{"name": "exact_answer"}]}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"^verifiers: .* has no effect unless mode is solve or pseudo_label"):
        load_generate_config(tmp_path / "g.yaml")
    assert any(r.option == "verifiers" for r in GENERATE_NEEDS)


def test_an_option_for_a_cache_of_another_kind_is_refused(model_dirs):
    # catches: stages.logits.sparse_tail silently ignored with a cache of sampled targets (they have no tail)
    from hkd.config import ModelConfig
    from hkd.models.loading import load_model
    from hkd.models.view import TapRequest
    from hkd.plugin.stage import StageContext
    from hkd.plugins.logits import LogitsStage, LogitsStageConfig

    teacher, _ = load_model(ModelConfig(path=str(model_dirs["teacher"])), "teacher")
    student, _ = load_model(ModelConfig(path=str(model_dirs["student"])), "student")

    def context(targets: str) -> StageContext:
        return StageContext("logits", teacher, student, {}, "stages.logits", teacher_live=False,
                            teacher_serves=TapRequest(sparse_logits=True), teacher_cache_targets=targets)

    with pytest.raises(ConfigError, match=r"stages\.logits\.sparse_tail: 'renormalize' applies to top-k targets; "
                                          r"this teacher_cache holds sampled targets"):
        LogitsStage(LogitsStageConfig(sparse_tail="renormalize"), context("sampled"))
    LogitsStage(LogitsStageConfig(sparse_tail="renormalize"), context("topk"))  # a top-k cache: it acts


def test_cache_teacher_refuses_a_streamed_data_set_before_loading_models(tmp_path, raw_config):
    # catches: cache-teacher loading the teacher, then failing on an endless stream's length
    from hkd.config import Config, from_dict
    from hkd.teachers.cache import build_cache

    raw_config["data"] = {"kind": "hf", "path": str(tmp_path / "d.jsonl"), "streaming": True}
    with pytest.raises(ConfigError, match=r"^data\.streaming: hkd cache-teacher caches every example"):
        build_cache(from_dict(Config, raw_config), tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()
