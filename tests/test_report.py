"""``hkd report``: the page from a run directory, the per-layer diagnostic, and a real browser.

The browser test needs Chromium (Debian: ``apt-get install -y chromium``); it is skipped
with that reason when no chromium binary is on PATH.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hkd.config import Config, from_dict
from hkd.train.loop import distill
from hkd.commands.report import axis_scale, build_report, heatmap_steps, load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PHASES = [{"name": "structure", "steps": 3, "stages": {"attention": 1.0}},
          {"name": "feature", "steps": 3, "stages": {"hidden": 1.0}}]


def fake_run(run_dir: Path, torn: bool = True) -> Path:
    """A run directory as the loop leaves it mid-training: config, metrics (torn last line), eval."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"schedule": {"phases": PHASES}}))
    lines = []
    for step in range(1, 6):
        stage = "attention" if step <= 3 else "hidden"
        row = {"step": step, "phase": 0 if step <= 3 else 1, "loss": 1.0 / step, f"loss/{stage}": 1.0 / step,
               "weight/attention": float(step <= 3), "weight/hidden": float(step > 3), "temperature": 2.0,
               "lr": 1e-3 * step, "grad_norm": 0.5, "tokens": 100, "tokens_per_s": 1000.0 + step,
               f"metric/layer/{stage}/1_2": 0.1 * step, f"metric/layer/{stage}/2_4": 0.2 * step}
        lines.append(json.dumps(row))
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"step": 6, "phase": 1, "loss": 0.'  # the writer was interrupted mid-line
    (run_dir / "metrics.jsonl").write_text(text)
    (run_dir / "eval.json").write_text(json.dumps({"pass_at_k": {"pass@1": 0.375, "n": 4}, "text": {"perplexity": 7.25}}))
    return run_dir


def embedded_images(page: str) -> dict[str, bytes]:
    return {m.group(1): base64.b64decode(m.group(2))
            for m in re.finditer(r'<img id="(\w+)"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)}


def test_report_of_a_running_run_has_every_section_and_skips_the_torn_line(tmp_path):
    run_dir = fake_run(tmp_path / "run")
    page_path = build_report(run_dir)
    page = page_path.read_text()
    images = embedded_images(page)
    assert set(images) == {"loss", "schedule", "optimizer", "throughput", "layers_attention", "heatmap_attention",
                           "layers_hidden", "heatmap_hidden"}
    for name, data in images.items():  # embedded bytes are the PNG written beside the page
        assert data.startswith(PNG_MAGIC) and (page_path.parent / f"{name}.png").read_bytes() == data
    assert "1 unreadable line(s)" in page and "running or stopped" in page
    assert "5 of 6" in page and "steps 1-3" in page and "steps 4-5" in page
    # bug: the eval results were one raw "pass_at_k.pass@1 | 0.375" list; now a table that says what each is
    assert "<td>pass at k</td><td>pass@1</td><td>0.375</td><td>probability that a sample is correct" in page
    assert "<td>text</td><td>perplexity</td><td>7.25</td><td>the model&#x27;s perplexity" in page
    # bug: a flat temperature got a panel of its own; a constant is one line of text
    assert "temperature: constant 2" in page


def demo_folder(root: Path) -> Path:
    """What ``hkd demo`` leaves: sub-runs in subfolders, results.json, no metrics.jsonl of its own."""
    fake_run(root / "teacher", torn=False)
    fake_run(root / "students" / "progressive_rl", torn=False)
    rows = [{"model": "teacher", "pass@1": 0.95, "params": 1000, "params_vs_teacher": 1.0},
            {"model": "student: after rl", "pass@1": 0.99, "params": 160, "params_vs_teacher": 0.16}]
    (root / "results.json").write_text(json.dumps({"rows": rows, "heldout_problems": 200}))
    return root


def test_report_of_the_demo_folder_is_an_index_of_its_runs(tmp_path):
    # bug: `hkd report runs/demo` failed with "metrics.jsonl does not exist"
    page_path = build_report(demo_folder(tmp_path / "demo"))
    assert page_path == tmp_path / "demo" / "report" / "index.html"
    page = page_path.read_text()
    assert set(embedded_images(page)) == {"pass_at_1", "loss_by_run"}
    assert "<td>student: after rl</td><td>0.990</td><td>160</td><td>0.16</td>" in page
    for run in ("teacher", "students/progressive_rl"):  # each run has its own report, linked from the index
        assert f'<a href="{run}/index.html">{run}</a>' in page
        assert "hkd run report" in (page_path.parent / run / "index.html").read_text()
    assert page.index(">teacher</a>") < page.index(">students/progressive_rl</a>")  # in the order they ran


def test_loss_axis_is_logarithmic_where_the_values_span_decades():
    # bug: the demo's progressive_rl losses were drawn on a linear axis (everything after step 300 looked
    # like 0) because the RL stage's surrogate loss goes negative
    assert axis_scale([3.0, 0.2, 0.01]) == ("log", {})
    assert axis_scale([0.5, 0.6, 0.7]) == ("linear", {})
    kind, options = axis_scale([3.0] * 10 + [0.01] * 10 + [-0.02])
    assert kind == "symlog" and 0 < options["linthresh"] < 0.1


def test_heatmap_steps_default_to_the_last_logged_step_of_each_phase(tmp_path):
    data = load_run(fake_run(tmp_path / "run"))
    assert heatmap_steps(data, "attention", None) == [3]
    assert heatmap_steps(data, "hidden", None) == [5]
    assert heatmap_steps(data, "hidden", [1, 4, 5, 99]) == [4, 5]  # steps without the stage are dropped


def test_report_before_the_first_step_says_so(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "lo')
    page = build_report(run_dir).read_text()
    assert "No steps logged yet" in page and "<img" not in page


def test_cli_report_errors_are_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "hkd.cli", "report", *args], capture_output=True, text=True)

    missing = run(str(tmp_path / "nope"))
    assert missing.returncode == 2 and missing.stderr.strip() == (
        f"hkd: error: report: run directory {str(tmp_path / 'nope')!r} does not exist")
    (tmp_path / "empty").mkdir()
    assert "metrics.jsonl' does not exist" in run(str(tmp_path / "empty")).stderr
    fake_run(tmp_path / "run")
    bad = run(str(tmp_path / "run"), "--steps", "3,x")
    assert bad.returncode == 2 and "--steps: expected comma-separated step numbers" in bad.stderr
    good = run(str(tmp_path / "run"), "--out", str(tmp_path / "page"), "--steps", "2,3")
    assert good.returncode == 0 and (tmp_path / "page" / "index.html").is_file()


@pytest.mark.parametrize("grad_accum", [1, 3])  # 3: per-pair values are token-weighted over micro-batches
def test_log_layers_records_each_mapped_pair_and_they_average_to_the_stage_loss(raw_config, tmp_path, grad_accum):
    raw_config["optim"]["grad_accum"] = grad_accum
    raw_config["data"]["max_length"] = 48  # ragged batches: micro-batches differ in token counts
    raw_config["stages"]["hidden"]["log_layers"] = True
    raw_config["stages"]["attention"] = {"log_layers": True}
    distill(from_dict(Config, raw_config), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    hidden_keys = ["metric/layer/hidden/0_0", "metric/layer/hidden/1_2", "metric/layer/hidden/2_4"]
    attention_keys = ["metric/layer/attention/1_2", "metric/layer/attention/2_4"]  # uniform map, 2 -> 4 layers
    for row in rows:
        if "loss/hidden" in row:
            assert sum(row[k] for k in hidden_keys) / 3 == pytest.approx(row["loss/hidden"], rel=1e-5)
        if "loss/attention" in row:
            assert sum(row[k] for k in attention_keys) / 2 == pytest.approx(row["loss/attention"], rel=1e-5)
        else:
            assert not any(k.startswith("metric/layer/attention/") for k in row)
    images = embedded_images(build_report(tmp_path / "run").read_text())
    assert {"heatmap_hidden", "heatmap_attention"} <= set(images)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# appended to a copy of the page: the browser itself reports how many images it decoded
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-decoded', imgs.filter(i => i.complete && i.naturalWidth > 0).length + '/' + imgs.length);
});</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    page = build_report(fake_run(tmp_path / "run"))
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", PROBE))

    def chromium(*args: str) -> subprocess.CompletedProcess:
        command = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    dom = chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri()).stdout
    assert 'data-decoded="8/8"' in dom  # every figure decoded by the browser
    assert "Traceback" not in dom and "Error" not in dom
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri())
    assert shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 20_000  # not a blank page

    index = build_report(demo_folder(tmp_path / "demo"))  # the index page, and a link followed from it
    probe = index.with_name("probe.html")
    probe.write_text(index.read_text().replace("</body>", PROBE))
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri()).stdout
    assert 'data-decoded="2/2"' in dom and 'href="students/progressive_rl/index.html"' in dom
    linked = index.parent / "students" / "progressive_rl" / "index.html"
    assert "hkd run report: progressive_rl" in chromium("--dump-dom", linked.as_uri()).stdout
