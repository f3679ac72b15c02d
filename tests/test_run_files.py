"""Commands that read a run directory (report, probe, --resume) treat every file in it as untrusted input:
a message naming the file, and whatever else can still be shown is shown. Issue "Nothing silently wrong,
on the whole surface", class 5."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hkd.cli import main
from tests.test_output_paths import snapshot


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory, model_dirs) -> dict[str, Path]:
    """A student cut with init-student, distilled with layer_map: init (2 steps, eval every step)."""
    from tests.conftest import BASE_CONFIG

    root = tmp_path_factory.mktemp("runs")
    assert main(["init-student", "--teacher", str(model_dirs["teacher"]), "--out", str(root / "cut"),
                 "--layers", "every:2"]) == 0
    raw = copy.deepcopy(BASE_CONFIG)
    raw["teacher"] = {"path": str(model_dirs["teacher"])}
    raw["student"] = {"path": "cut"}
    raw["schedule"] = {"phases": [{"name": "p", "steps": 2, "stages": {"hidden": 1.0, "attention": 1.0}}]}
    raw["stages"] = {"hidden": {"layer_map": {"strategy": "init"}}, "attention": {"layer_map": {"strategy": "init"}}}
    raw["eval"] = {"every": 1, "metric": "loss"}
    raw["train"] = {"progress": False, "checkpoint_every": 1, "keep_checkpoints": 0}
    (root / "cfg.yaml").write_text(yaml.safe_dump(raw))
    assert main(["distill", str(root / "cfg.yaml"), "--out", str(root / "run"), "--no-progress"]) == 0
    return {"root": root, "run": root / "run", "cfg": root / "cfg.yaml", "cut": root / "cut"}


def one_error(capsys: pytest.CaptureFixture[str], code: int) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("hkd: error: "), lines
    return lines[0]


# --------------------------------------------------------------------------- report

metric_lines = st.one_of(
    st.binary(max_size=20),
    st.builds(json.dumps, st.one_of(st.none(), st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=2))),
    st.builds(lambda step, phase, loss, key: json.dumps({"step": step, "phase": phase, "loss": loss, key: 1.0}),
              st.one_of(st.integers(-2, 9), st.text(max_size=2), st.none(), st.booleans()),
              st.one_of(st.integers(-1, 3), st.text(max_size=2), st.none()),
              st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3), st.booleans()),
              st.sampled_from(["metric/layer/hidden/1_2", "metric/layer/hidden/x_y", "metric/layer/odd",
                               "metric/layer//_", "weight/hidden", "loss/hidden"])),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(lines=st.lists(metric_lines, max_size=6), probe=st.binary(max_size=40), evaluation=st.binary(max_size=20))
def test_report_draws_whatever_a_damaged_run_directory_still_holds(lines, probe, evaluation, cut_run,
                                                                   tmp_path_factory, capsys):
    """Property: metrics.jsonl lines from another version (or garbage bytes), a truncated probe JSON and a
    broken eval JSON never end in a traceback: the report is written, each unusable file named."""
    run = tmp_path_factory.mktemp("r") / "run"
    shutil.copytree(cut_run["run"], run, ignore=shutil.ignore_patterns("checkpoints", "final", "best", "models"))
    with (run / "metrics.jsonl").open("ab") as handle:
        handle.write(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    (run / "probe").mkdir(exist_ok=True)
    (run / "probe" / "step-00000002.json").write_bytes(probe)
    (run / "eval-broken.json").write_bytes(evaluation)
    code = main(["report", str(run)])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err, err
    assert (run / "report" / "index.html").is_file()
    for line in err.splitlines():
        assert line.startswith("hkd: warning: report: "), line


def test_report_names_each_damaged_file(cut_run, tmp_path, capsys):
    # catches: a truncated probe JSON or a metrics.jsonl from another version ending the report in a traceback
    run = tmp_path / "run"
    shutil.copytree(cut_run["run"], run)
    (run / "probe").mkdir()
    (run / "probe" / "step-00000002.json").write_text('{"step": 2, "tokens": 5, "hidden_c')
    (run / "metrics.jsonl").open("a").write('{"step": "3", "phase": "decision", "loss": "1.0"}\n')
    (run / "config.yaml").write_text("[unclosed")
    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    for name in ("probe/step-00000002.json", "metrics.jsonl", "config.yaml"):
        assert re.search(rf"hkd: warning: report: .*{re.escape(name)}", err), (name, err)
    page = (run / "report" / "index.html").read_text()
    assert "step-00000002.json" in page and 'id="loss"' in page  # named on the page; the losses still drawn


# --------------------------------------------------------------------------- probe


def test_probe_final_rebuilds_the_runs_context_without_the_cut_directory(cut_run, tmp_path, capsys):
    # catches: probe --final refusing a run whose student was cut with init-student and mapped with
    # layer_map: init (it trained), e.g. once the cut directory is gone: final/ is a whole model
    assert main(["probe", str(cut_run["run"]), "--final", "--no-progress", "--batches", "1"]) == 0
    result = json.loads((cut_run["run"] / "probe" / "final.json").read_text())
    assert result["mapped"]["hidden"] == [[1, 2], [2, 4]] and result["student_layers"] == 2
    away = cut_run["cut"].with_name("cut-away")
    cut_run["cut"].rename(away)
    try:
        assert main(["probe", str(cut_run["run"]), "--final", "--no-progress", "--batches", "1"]) == 0
    finally:
        away.rename(cut_run["cut"])
    err = capsys.readouterr().err
    assert "the 'hidden' stage's mapped pairs are not outlined" in err and "Traceback" not in err
    assert json.loads((cut_run["run"] / "probe" / "final.json").read_text())["mapped"] == {}


def test_probe_names_the_config_file_of_another_version(cut_run, tmp_path, capsys):
    # catches: a config.yaml key this version does not know reported without the file it came from
    run = tmp_path / "run"
    shutil.copytree(cut_run["run"], run)
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["train"]["future_option"] = 1
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    line = one_error(capsys, main(["probe", str(run), "--final", "--no-progress"]))
    assert re.search(r"probe: '.*config\.yaml': train\.future_option: unknown key", line), line


# --------------------------------------------------------------------------- --resume


@pytest.mark.parametrize("content,pattern", [
    ("{not json", r"best\.json' is not valid JSON"),
    ('{"metric": "loss", "value": "low", "step": 1, "since_best": 0}', r"best\.json' is not a best-model record"),
    ('{"metric": "kl", "value": 0.5, "step": 1, "since_best": 0}', r"best\.json' tracked eval\.metric 'kl'"),
])
def test_resume_refuses_a_damaged_best_record_by_name(content, pattern, cut_run, tmp_path, capsys):
    # catches: a truncated best.json a JSONDecodeError traceback; a best of another metric or a string
    # value silently compared (best/ and early stopping decided by a wrong number)
    run = tmp_path / "run"
    shutil.copytree(cut_run["run"], run)
    raw = yaml.safe_load(cut_run["cfg"].read_text())
    raw["student"]["path"] = str(cut_run["cut"])
    raw["schedule"]["phases"][0]["steps"] = 3
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    (run / "best.json").write_text(content)
    before = snapshot(run)
    line = one_error(capsys, main(["distill", str(tmp_path / "cfg.yaml"), "--out", str(run), "--resume",
                                   "--allow-config-change", "--no-progress"]))
    assert re.search(pattern, line), line
    assert snapshot(run) == before  # not even a config.resume-N.yaml


def test_resume_keeps_metrics_lines_it_cannot_place(cut_run, tmp_path, capsys):
    # catches: the jsonl logger's resume pass failing on a metrics line that is not an object (a plugin
    # error), or silently dropping lines of another version
    run = tmp_path / "run"
    shutil.copytree(cut_run["run"], run)
    shutil.rmtree(run / "checkpoints" / "step-00000002")
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('[1, 2]\n{"step": "x"}\n')
    raw = yaml.safe_load(cut_run["cfg"].read_text())
    raw["student"]["path"] = str(cut_run["cut"])
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    assert main(["distill", str(tmp_path / "cfg.yaml"), "--out", str(run), "--resume", "--no-progress"]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert '[1, 2]' in lines and '{"step": "x"}' in lines
    assert [json.loads(x)["step"] for x in lines if x.startswith('{"step": ') and '"x"' not in x] == [1, 2]


def test_resume_with_allow_config_change_reads_past_an_unreadable_saved_config(cut_run, tmp_path, capsys):
    # catches: --allow-config-change, which the refusal recommends, not skipping the comparison it names
    run = tmp_path / "run"
    shutil.copytree(cut_run["run"], run)
    shutil.rmtree(run / "checkpoints" / "step-00000002")
    (run / "config.yaml").write_text("teacher: {unknown: 1}\n")
    raw = yaml.safe_load(cut_run["cfg"].read_text())
    raw["student"]["path"] = str(cut_run["cut"])
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    line = one_error(capsys, main(["distill", str(tmp_path / "cfg.yaml"), "--out", str(run), "--resume"]))
    assert "cannot be read as a config" in line
    assert main(["distill", str(tmp_path / "cfg.yaml"), "--out", str(run), "--resume", "--allow-config-change",
                 "--no-progress"]) == 0
    assert (run / "config.resume-1.yaml").is_file() and "cannot be read as a config" in capsys.readouterr().err


@pytest.mark.parametrize("content", ['{"layer_map": [[0, 0], [1, ', '{"layers": []}', '{"layer_map": [[1, "2"]]}'])
def test_a_damaged_init_record_is_named(content, tmp_path):
    # catches: a truncated or foreign hkd-init.json (layer_map: init) ending in a JSONDecodeError/KeyError traceback
    from hkd.config import ConfigError
    from hkd.models.layermap import build_layer_map

    (tmp_path / "hkd-init.json").write_text(content)
    with pytest.raises(ConfigError, match=r"^stages\.hidden\.layer_map\.strategy: init reads '.*hkd-init\.json'"):
        build_layer_map("init", 2, 4, where="stages.hidden.layer_map", student_dir=tmp_path)
