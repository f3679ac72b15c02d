"""``hkd report RUN_DIR``: one HTML page that shows how a run went.

Read from the run directory, never from the live process, so it works on a finished run
and on one that is still training (a half-written last line of ``metrics.jsonl`` is
skipped and counted). The page holds:

* a summary (steps done of planned, phases with their step ranges, last losses);
* loss per stage over steps, with the phase boundaries drawn and named;
* the schedule: stage weights and the distillation temperature; learning rate and
  gradient norm; throughput (tokens/s);
* any other ``metric/...`` a stage logs (e.g. the RL stage's reward);
* for layerwise research, the per-pair losses the structural and feature stages log with
  ``log_layers: true`` (``metric/layer/<stage>/<student>_<teacher>``): their curves over
  steps and teacher-layer x student-layer heatmaps at chosen steps (default: the last step
  of each phase that logged them; mapped pairs are filled, unmapped cells stay blank);
* every teacher layer x every student layer (hidden-state CKA, attention KL) for each
  ``hkd probe`` result in ``RUN_DIR/probe/``, with the mapped pairs outlined;
* evaluation results: every ``RUN_DIR/eval*.json`` (any JSON mapping, nested keys
  flattened to dotted names) as a table.

Figures are drawn with matplotlib's Agg backend, written as PNGs next to the page
(``RUN_DIR/report/*.png``) and also embedded as base64, so ``index.html`` stays complete
when copied alone.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.patches

matplotlib.use("Agg")  # headless: no display needed, safe in a training box or CI
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from hkd.config.outputs import check_output_dir, write_text_atomic  # noqa: E402
from hkd.errors import HkdError, warn  # noqa: E402

LAYER_PREFIX = "metric/layer/"


@dataclass
class RunData:
    """What the report shows, read from a run directory."""

    run_dir: Path
    metrics: list[dict[str, Any]]
    skipped_lines: int  # unparsable lines in metrics.jsonl (a torn last line while a run writes)
    phase_names: list[str] = field(default_factory=list)
    planned_steps: int | None = None
    finished: bool = False
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # file name -> flattened metrics
    problems: list[str] = field(default_factory=list)  # files (or parts) the report could not use, and why


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Parse ``metrics.jsonl``, an untrusted file (a run still writing it, another hkd version, an edit):
    a line is used when it is a JSON object whose ``step`` (and ``phase``, if any) is a count; values that
    are not finite numbers are dropped from it. Other lines are skipped and counted."""
    rows, skipped = [], 0
    for raw in path.read_bytes().splitlines():
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            skipped += 1
            continue
        if not (isinstance(row, dict) and _count(row.get("step")) and _count(row.get("phase", 0))):
            skipped += 1
            continue
        rows.append({key: value for key, value in row.items() if key in ("step", "phase") or (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))})
    return rows, skipped


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``{"a.b": value}``; lists stay as their JSON text."""
    if not isinstance(data, dict):
        return {prefix or "value": data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return out


def load_run(run_dir: Path) -> RunData:
    """Read metrics, the saved config (phase names, planned steps) and eval results."""
    if not run_dir.is_dir():
        raise HkdError(f"report: run directory {str(run_dir)!r} does not exist")
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise HkdError(
            f"report: {str(metrics_path)!r} does not exist; is this a run directory, and does "
            "logging.backends include jsonl?"
        )
    try:
        metrics, skipped = read_metrics(metrics_path)
    except OSError as exc:
        raise HkdError(f"report: {str(metrics_path)!r} cannot be read ({exc})") from None
    data = RunData(run_dir, metrics, skipped, finished=(run_dir / "final").is_dir())
    if skipped:
        data.problems.append(f"{metrics_path}: {skipped} line(s) that are not a step's metrics skipped (a run still "
                             "writing leaves its last line incomplete; other lines come from an edit or another "
                             "hkd version)")
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        try:
            config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
            phases = config.get("schedule", {}).get("phases", [])
            data.phase_names = [str(p.get("name", i)) for i, p in enumerate(phases)]
            data.planned_steps = sum(int(p.get("steps", 0)) for p in phases) or None
        except (yaml.YAMLError, AttributeError, TypeError, ValueError, OSError, RecursionError) as exc:
            data.phase_names, data.planned_steps = [], None  # the report still works from metrics alone
            data.problems.append(f"{config_path}: not a run config ({type(exc).__name__}); phase names and "
                                 "planned steps are not shown")
    for path in sorted(run_dir.glob("eval*.json")):
        try:
            data.evals[path.name] = flatten(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            data.problems.append(f"{path}: not valid JSON ({type(exc).__name__}: {exc}); its table is not shown")
    return data


# --------------------------------------------------------------------------- figures


def series(metrics: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values where ``key`` was logged (stages log only while active)."""
    points = [(row["step"], float(row[key])) for row in metrics
              if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)]
    return [p[0] for p in points], [p[1] for p in points]


def keys_with(metrics: list[dict[str, Any]], prefix: str) -> list[str]:
    seen: dict[str, None] = {}
    for row in metrics:
        for key in row:
            if key.startswith(prefix):
                seen[key] = None
    return list(seen)


def phase_spans(data: RunData) -> list[tuple[str, int, int]]:
    """``(name, first_step, last_step)`` for each phase the logged steps went through."""
    spans: list[tuple[str, int, int]] = []
    for row in data.metrics:
        index = int(row.get("phase", 0))
        name = data.phase_names[index] if index < len(data.phase_names) else f"phase {index}"
        if spans and spans[-1][0] == name:
            spans[-1] = (name, spans[-1][1], row["step"])
        else:
            spans.append((name, row["step"], row["step"]))
    return spans


def mark_phases(ax: Any, spans: list[tuple[str, int, int]], low: float, high: float) -> None:
    """Dashed lines between phases, phase names along the top, within the plotted steps ``low..high``."""
    for i, (name, first, last) in enumerate(spans):
        if last < low or first > high:  # a curve that starts later (a stage's own steps) skips earlier phases
            continue
        if i and first > low:
            ax.axvline(first - 0.5, color="0.5", linestyle="--", linewidth=0.8)
        middle = (max(first, low) + min(last, high)) / 2
        ax.text(middle, 1.01, name, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8,
                color="0.3")


def annotate(ax: Any, image: Any, grid: list[list[float]], fmt: str) -> None:
    """Write each finite cell's value in black or white, whichever reads on the cell's colour."""
    for row_index, row in enumerate(grid):
        for col_index, value in enumerate(row):
            if math.isfinite(value):
                red, green, blue, _ = image.cmap(image.norm(value))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                ax.text(col_index, row_index, format(value, fmt), ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")


def axis_scale(values: list[float]) -> tuple[str, dict[str, float]]:
    """Log where the values span a decade or more, so late steps do not look like 0.

    All positive: ``log``. Some zero or negative (the RL stage's policy-gradient surrogate)
    but magnitudes over two decades: ``symlog``, linear within the smallest 5% of magnitudes.
    Otherwise linear.
    """
    finite = [v for v in values if math.isfinite(v)]
    magnitudes = sorted(abs(v) for v in finite if v != 0)
    if not magnitudes or magnitudes[-1] / magnitudes[0] < 10:
        return "linear", {}
    if all(v > 0 for v in finite):
        return "log", {}
    if magnitudes[-1] / magnitudes[0] < 100:
        return "linear", {}
    return "symlog", {"linthresh": magnitudes[len(magnitudes) // 20]}


def varies(data: RunData, key: str) -> bool:
    """Whether a metric takes more than one value (a constant temperature needs no panel)."""
    return len(set(series(data.metrics, key)[1])) > 1


def line_figure(data: RunData, panels: list[tuple[str, list[str], bool]]) -> Figure | None:
    """One row per panel ``(title, metric keys, log scale)``; panels without data are dropped."""
    spans = phase_spans(data)
    panels = [p for p in panels if any(series(data.metrics, k)[0] for k in p[1])]
    # a log panel's series that go <= 0 (the RL stage's surrogate loss): mostly positive ones keep
    # their positive points (noted in the title), the others move to a linear panel of their own
    split: list[tuple[str, list[str], bool]] = []
    hidden_points: dict[str, int] = {}
    for title, keys, log in panels:
        signed = [k for k in keys if log and any(v <= 0 for v in series(data.metrics, k)[1])]
        mostly_signed = [k for k in signed if sum(v <= 0 for v in series(data.metrics, k)[1]) * 2
                         > len(series(data.metrics, k)[1])]
        for key in signed:
            if key not in mostly_signed:
                hidden_points[key] = sum(v <= 0 for v in series(data.metrics, key)[1])
        kept = [k for k in keys if k not in mostly_signed]
        if kept:
            split.append((title, kept, log))
        split += [(f"{key} (can be negative: linear axis)", [key], False) for key in mostly_signed]
    panels = split
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.8 * len(panels)), squeeze=False, sharex=True)
    for ax, (title, keys, log) in zip(axes[:, 0], panels):
        plotted: list[int] = []
        notes = []
        for key in keys:
            steps, values = series(data.metrics, key)
            if log and key in hidden_points:
                steps, values = [s for s, v in zip(steps, values) if v > 0], [v for v in values if v > 0]
                notes.append(f"{hidden_points[key]} steps with {key} <= 0 not drawn")
            if steps:
                label = key[len(LAYER_PREFIX):] if key.startswith(LAYER_PREFIX) else key
                ax.plot(steps, values, label=label, linewidth=1.2, marker="." if len(steps) < 30 else None)
                plotted += steps
        if log:
            scale = axis_scale([v for line in ax.get_lines() for v in line.get_ydata()])
            ax.set_yscale(scale[0], **scale[1])
        mark_phases(ax, spans, min(plotted), max(plotted))
        ax.set_title(title + (f" ({'; '.join(notes)})" if notes else ""), loc="left", fontsize=10, pad=14)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    return fig


def layer_pairs(metrics: list[dict[str, Any]]) -> dict[str, list[tuple[int, int]]]:
    """Stage -> the (student, teacher) pairs it logged with ``log_layers``."""
    pairs: dict[str, list[tuple[int, int]]] = {}
    for key in keys_with(metrics, LAYER_PREFIX):
        stage, _, pair = key[len(LAYER_PREFIX):].rpartition("/")
        s, _, t = pair.partition("_")
        if stage and s.isdigit() and t.isdigit():  # a key of another shape (an edit, another version) is not a pair
            pairs.setdefault(stage, []).append((int(s), int(t)))
    return {stage: sorted(found) for stage, found in pairs.items()}


def heatmap_steps(data: RunData, stage: str, chosen: list[int] | None) -> list[int]:
    """The chosen steps that logged this stage's layers, else the last such step of each phase."""
    logged = [row["step"] for row in data.metrics if any(k.startswith(f"{LAYER_PREFIX}{stage}/") for k in row)]
    if chosen:
        return [s for s in chosen if s in logged]
    by_phase: dict[int, int] = {}
    for row in data.metrics:
        if row["step"] in logged:
            by_phase[int(row.get("phase", 0))] = row["step"]
    return list(by_phase.values())


def heatmap_figure(data: RunData, stage: str, pairs: list[tuple[int, int]], steps: list[int]) -> Figure:
    """Teacher layer (rows) x student layer (columns) per chosen step, one shared colour scale."""
    rows = {row["step"]: row for row in data.metrics}
    students = list(range(min(s for s, _ in pairs), max(s for s, _ in pairs) + 1))
    teachers = list(range(min(t for _, t in pairs), max(t for _, t in pairs) + 1))
    grids = []
    for step in steps:
        grid = [[math.nan] * len(students) for _ in teachers]
        for s, t in pairs:
            value = rows[step].get(f"{LAYER_PREFIX}{stage}/{s}_{t}")
            if isinstance(value, (int, float)):
                grid[teachers.index(t)][students.index(s)] = float(value)
        grids.append(grid)
    finite = [v for g in grids for r in g for v in r if math.isfinite(v)]
    vmin, vmax = (min(finite), max(finite)) if finite else (0.0, 1.0)
    width = min(3.2 * len(steps) + 1.5, 16)
    fig, axes = plt.subplots(1, len(steps), figsize=(width, 0.45 * len(teachers) + 2.2), squeeze=False)
    image = None
    for ax, step, grid in zip(axes[0], steps, grids):
        image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, origin="lower", aspect="auto")
        ax.set_xticks(range(len(students)), [str(s) for s in students])
        ax.set_yticks(range(len(teachers)), [str(t) for t in teachers])
        ax.set_xlabel("student layer")
        ax.set_ylabel("teacher layer")
        ax.set_title(f"step {step}", fontsize=10)
        annotate(ax, image, grid, ".3g")
    assert image is not None  # steps is never empty here
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9, label=f"{stage} loss per token")
    return fig


def probe_figure(result: dict[str, Any]) -> Figure:
    """``hkd probe`` matrices side by side; the pairs the run's layer maps connect are outlined."""
    panels = [("hidden-state CKA (1 = same)", "hidden_cka", "hidden", 0, "viridis"),
              ("attention KL, head-averaged (0 = same)", "attention_kl", "attention", 1, "magma_r")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * result["teacher_layers"] + 2.8), squeeze=False)
    for ax, (title, key, stage, first, cmap) in zip(axes[0], panels):
        grid = result[key]
        image = ax.imshow(grid, cmap=cmap, origin="lower", aspect="auto")
        ax.set_xticks(range(len(grid[0])), [str(s + first) for s in range(len(grid[0]))])
        ax.set_yticks(range(len(grid)), [str(t + first) for t in range(len(grid))])
        ax.set_xlabel("student layer")
        ax.set_ylabel("teacher layer")
        ax.set_title(title, fontsize=10)
        for s, t in result["mapped"].get(stage, []):
            ax.add_patch(matplotlib.patches.Rectangle((s - first - 0.5, t - first - 0.5), 1, 1, fill=False,
                                                      edgecolor="red", linewidth=2))
        annotate(ax, image, grid, ".2g")
        fig.colorbar(image, ax=ax, shrink=0.9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- page


def save_figure(fig: Figure, path: Path) -> str:
    """Write the PNG and return it base64-encoded for embedding."""
    fig.savefig(path, dpi=100, format="png", bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(path.read_bytes()).decode("ascii")


def table_html(header: list[str] | None, rows: list[list[Any]], raw_html: bool = False) -> str:
    """A table; ``raw_html``: cells are already HTML (links), not escaped."""
    def cell(value: Any) -> str:
        text = f"{value:.6g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, list) else str(value)
        return f"<td>{text if raw_html else html.escape(text)}</td>"

    head = "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join(f"<tr>{''.join(cell(v) for v in row)}</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


# what hkd eval's numbers mean, for the evaluation table
EVAL_MEANINGS = {
    "n": "samples per prompt",
    "prompts": "held-out prompts",
    "correct": "samples every verifier accepted, per prompt",
    "perplexity": "the model's perplexity on the text (lower is better)",
    "teacher_perplexity": "the teacher's perplexity on the same text",
    "tokens": "tokens the text metrics were measured on",
    "top1_agreement": "share of positions where model and teacher predict the same next token",
    "kl_teacher_student": "mean KL(teacher || model) per token (0 = same distribution)",
}


def eval_rows(values: dict[str, Any]) -> list[list[Any]]:
    """``group | metric | value | meaning`` rows; per-prompt lists are summarised, not dumped."""
    rows: list[list[Any]] = []
    for key, value in values.items():
        group, _, metric = key.rpartition(".")
        if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            value = f"{len(value)} values, mean {sum(value) / len(value):.3g}, min {min(value):.3g}, max {max(value):.3g}"
        elif isinstance(value, float):
            value = f"{value:.4g}"
        meaning = EVAL_MEANINGS.get(metric, "")
        if metric == "pass@1":
            meaning = "probability that a sample is correct"
        elif metric.startswith("pass@"):
            meaning = f"probability that at least one of {metric[5:]} samples is correct (unbiased estimator)"
        rows.append([group.replace("_", " "), metric, value, meaning])
    return rows


def summary_rows(data: RunData) -> list[list[Any]]:
    last = data.metrics[-1] if data.metrics else {}
    done = last.get("step", 0)
    planned = f" of {data.planned_steps}" if data.planned_steps else ""
    status = "finished" if data.finished else "running or stopped (no final/ yet)"
    rows: list[list[Any]] = [["run directory", str(data.run_dir)], ["status", status], ["steps logged", f"{done}{planned}"]]
    rows += [[f"phase {name}", f"steps {first}-{last_step}"] for name, first, last_step in phase_spans(data)]
    rows += [[f"last {key}", last[key]] for key in last if key == "loss" or key.startswith("loss/")]
    speeds = series(data.metrics, "tokens_per_s")[1]
    if speeds:
        rows.append(["median tokens/s", sorted(speeds)[len(speeds) // 2]])
    return rows


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f3f3f3; } img { max-width: 100%; } .note { color: #a60; }
"""


def find_runs(folder: Path, depth: int = 3) -> list[Path]:
    """Run directories (with a ``metrics.jsonl``) below ``folder``, e.g. ``hkd demo``'s sub-runs."""
    found = []
    for path in sorted(folder.iterdir()) if depth > 0 else []:
        if path.is_dir() and path.name != "report":
            found += [path] if (path / "metrics.jsonl").is_file() else find_runs(path, depth - 1)
    return sorted(found, key=lambda run: (run / "metrics.jsonl").stat().st_mtime)  # the order they ran in


def pass_at_1_figure(rows: list[dict[str, Any]]) -> Figure:
    """Horizontal bars, one per model of ``results.json``, the value written at each bar's end."""
    names = [str(row["model"]) for row in rows][::-1]
    values = [float(row["pass@1"]) for row in rows][::-1]
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.2))
    bars = ax.barh(names, values, color=["0.45" if name == "teacher" else "tab:blue" for name in names])
    for bar, value in zip(bars, values):
        ax.text(min(value, 1.0) + 0.01, bar.get_y() + bar.get_height() / 2, f"{value:.3f}", va="center", fontsize=9)
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("held-out greedy pass@1")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def comparison_figure(runs: dict[str, RunData]) -> Figure | None:
    """Each run's total loss over its steps on one axis."""
    curves, hidden = {}, 0
    for name, data in runs.items():
        points = list(zip(*series(data.metrics, "loss")))
        hidden += sum(v <= 0 for _, v in points)  # the RL surrogate: no place on a log axis
        if points:
            curves[name] = ([s for s, v in points if v > 0], [v for s, v in points if v > 0])
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for name, (steps, values) in curves.items():
        ax.plot(steps, values, label=name, linewidth=1.1)
    scale = axis_scale([v for _, values in curves.values() for v in values])
    ax.set_yscale(scale[0], **scale[1])
    ax.set_xlabel("step")
    note = f"; {hidden} steps with a loss <= 0 not drawn" if hidden else ""
    ax.set_title(f"total loss (each run's weighted sum of its own stages{note})", loc="left", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def build_index(folder: Path, runs: list[Path], out_dir: Path, steps: list[int] | None) -> Path:
    """A report per run, and an index page that compares them (and ``results.json``'s table, if any)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded: dict[str, RunData] = {}
    rows: list[list[Any]] = []
    for run in runs:
        name = run.relative_to(folder).as_posix()
        page = build_report(run, out_dir / name, steps)
        data = loaded[name] = load_run(run)
        last = data.metrics[-1] if data.metrics else {}
        planned = f" of {data.planned_steps}" if data.planned_steps else ""
        speeds = sorted(series(data.metrics, "tokens_per_s")[1])
        link = f'<a href="{html.escape(page.relative_to(out_dir).as_posix())}">{html.escape(name)}</a>'
        rows.append([link, "finished" if data.finished else "running or stopped",
                     f"{last.get('step', 0)}{planned}", html.escape(" → ".join(p for p, _, _ in phase_spans(data))),
                     f"{last['loss']:.4g}" if isinstance(last.get("loss"), (int, float)) else "-",
                     f"{speeds[len(speeds) // 2]:,.0f}" if speeds else "-"])
    sections = [f"<h1>hkd report: {html.escape(folder.name)} ({len(runs)} runs)</h1>"]

    def figure(title: str, name: str, fig: Figure | None) -> None:
        if fig is not None:
            encoded = save_figure(fig, out_dir / f"{name}.png")
            sections.append(f'<h2>{html.escape(title)}</h2><img id="{name}" alt="{html.escape(title)}" '
                            f'src="data:image/png;base64,{encoded}">')

    results_path = folder / "results.json"
    if results_path.is_file():  # hkd demo's table
        try:
            results = json.loads(results_path.read_text())
            models = [row for row in results.get("rows", []) if "model" in row and "pass@1" in row]
        except (json.JSONDecodeError, AttributeError):
            models = []
        if models:
            teacher = next((row for row in models if row["model"] == "teacher"), None)
            sections.append("<h2>Held-out pass@1 (results.json)</h2>" + table_html(
                ["model", "pass@1", "params", "params vs teacher"],
                [[row["model"], f"{row['pass@1']:.3f}", f"{row.get('params', 0):,}",
                  f"{row.get('params_vs_teacher', 0):.2f}"] for row in models]))
            if teacher is not None:
                sections.append(f"<p>{results.get('heldout_problems', '?')} held-out problems, greedy decoding; "
                                "a student row is the student saved after that phase or run.</p>")
            figure("pass@1 by model", "pass_at_1", pass_at_1_figure(models))
    sections.append("<h2>Runs</h2>" + table_html(
        ["run (its report)", "status", "steps", "phases", "last loss", "median tokens/s"], rows, raw_html=True))
    figure("Loss by run", "loss_by_run", comparison_figure(loaded))
    return write_page(out_dir / "index.html", f"hkd report: {folder.name}", sections)


PAGE_START = "<!DOCTYPE html><html><head><meta charset='utf-8'><title>hkd report"  # how a report page begins


def write_page(target: Path, title: str, sections: list[str]) -> Path:
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n")
    write_text_atomic(target, page)  # a browser refreshing the page never sees half of it
    return target


def is_report_dir(path: Path) -> bool:
    """A directory an earlier ``hkd report`` wrote: its ``index.html`` is a report page."""
    try:
        with (path / "index.html").open("r", encoding="utf-8") as handle:
            return handle.read(len(PAGE_START)) == PAGE_START
    except (OSError, UnicodeDecodeError):
        return False


def check_report_output(out_dir: Path, flag: str) -> Path:
    """Where the report goes, checked before anything is drawn (:mod:`hkd.config.outputs`)."""
    return check_output_dir(out_dir, flag, "report", owner=is_report_dir, why="it has no report index.html")


def build_report(run_dir: Path, out_dir: Path | None = None, steps: list[int] | None = None) -> Path:
    """Write ``index.html`` and its PNGs into ``out_dir`` (default ``RUN_DIR/report``); return the page.

    A folder of runs without its own ``metrics.jsonl`` (``hkd demo``'s ``runs/demo``) gets a
    report per run and an index page comparing them.
    """
    check_report_output(out_dir or run_dir / "report", "--out" if out_dir else "report directory")
    if run_dir.is_dir() and not (run_dir / "metrics.jsonl").is_file():
        runs = find_runs(run_dir)
        if runs:
            return build_index(run_dir, runs, out_dir or run_dir / "report", steps)
    data = load_run(run_dir)
    out_dir = out_dir or run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    sections: list[str] = [f"<h1>hkd run report: {html.escape(run_dir.name)}</h1>"]
    if data.skipped_lines:
        sections.append(f'<p class="note">{data.skipped_lines} unreadable line(s) in metrics.jsonl skipped '
                        "(a run still writing leaves its last line incomplete).</p>")
    notes_at = len(sections)  # the files found wrong while drawing are listed here too
    sections.append("<h2>Summary</h2>" + table_html(None, summary_rows(data)))

    def figure(title: str, name: str, fig: Figure | None, caption: str = "") -> None:
        if fig is None:
            return
        encoded = save_figure(fig, out_dir / f"{name}.png")
        note = f"<p>{html.escape(caption)}</p>" if caption else ""
        sections.append(f'<h2>{html.escape(title)}</h2>{note}<img id="{name}" alt="{html.escape(title)}" '
                        f'src="data:image/png;base64,{encoded}">')

    if not data.metrics:
        sections.append('<p class="note">No steps logged yet.</p>')
    else:
        stage_losses = [k for k in keys_with(data.metrics, "loss/")]
        weights = keys_with(data.metrics, "weight/")
        other = [k for k in keys_with(data.metrics, "metric/") if not k.startswith(LAYER_PREFIX)]
        figure("Loss", "loss", line_figure(data, [("total loss (weighted sum)", ["loss"], True),
                                                  ("loss per stage (unweighted)", stage_losses, True)]))
        temperature = [("distillation temperature", ["temperature"], False)] if varies(data, "temperature") else []
        figure("Schedule", "schedule", line_figure(data, [("stage weights", weights, False), *temperature]),
               "" if temperature or not series(data.metrics, "temperature")[1] else
               f"temperature: constant {series(data.metrics, 'temperature')[1][0]:g}")
        figure("Optimizer", "optimizer", line_figure(data, [("learning rate", ["lr"], False),
                                                            ("gradient norm (before clipping)", ["grad_norm"], True)]))
        figure("Throughput", "throughput", line_figure(data, [("tokens/s (all tokens seen)", ["tokens_per_s"], False)]))
        figure("Stage metrics", "stage_metrics", line_figure(data, [(k, [k], False) for k in other]))
        for stage, pairs in layer_pairs(data.metrics).items():
            keys = [f"{LAYER_PREFIX}{stage}/{s}_{t}" for s, t in pairs]
            figure(f"Per-layer {stage} loss", f"layers_{stage}",
                   line_figure(data, [(f"{stage} loss per token, per pair <student layer>_<teacher layer>", keys, True)]))
            chosen = heatmap_steps(data, stage, steps)
            if chosen:
                figure(f"{stage} loss by layer pair", f"heatmap_{stage}", heatmap_figure(data, stage, pairs, chosen),
                       "teacher layer x student layer; only mapped pairs are computed, other cells stay blank")
    for path in sorted((run_dir / "probe").glob("step-*.json")) + sorted((run_dir / "probe").glob("final.json")):
        result, problem = read_probe(path)
        if result is None:
            data.problems.append(f"{path}: {problem}; not drawn (run hkd probe again to rewrite it)")
            continue
        at = "of final/" if path.name == "final.json" else f"at step {result['step']}"
        figure(f"Layer similarity {at} (hkd probe)", f"probe_{path.stem.replace('-', '_')}",
               probe_figure(result), f"every teacher layer x every student layer on {result['tokens']} tokens; "
               "red boxes: the pairs this run's layer maps connect")
    for name, values in data.evals.items():
        sections.append(f"<h2>Evaluation: {html.escape(name)}</h2>"
                        + table_html(["group", "metric", "value", "what it is"], eval_rows(values)))
    for problem in data.problems:  # every file in a run directory is input: what could not be used is named
        warn(f"report: {problem}")
    sections[notes_at:notes_at] = [f'<p class="note">{html.escape(p)}</p>' for p in data.problems
                                   if "metrics.jsonl" not in p]
    return write_page(out_dir / "index.html", f"hkd report: {run_dir.name}", sections)


def read_probe(path: Path) -> tuple[dict[str, Any] | None, str]:
    """An ``hkd probe`` result checked for what the figure reads, or ``(None, what is wrong)``."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, f"not valid JSON ({type(exc).__name__}: {exc})"
    if not isinstance(result, dict):
        return None, f"expected a JSON object, got {type(result).__name__}"

    def matrix(value: Any, rows: int, columns: int) -> bool:
        return isinstance(value, list) and len(value) == rows and all(
            isinstance(row, list) and len(row) == columns and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in row) for row in value)

    t, s = result.get("teacher_layers"), result.get("student_layers")
    if not (isinstance(result.get("step"), int) and _count(result.get("tokens")) and _count(t) and _count(s)):
        return None, "missing or malformed step, tokens, teacher_layers or student_layers"
    assert isinstance(t, int) and isinstance(s, int)
    if not (matrix(result.get("hidden_cka"), t + 1, s + 1) and matrix(result.get("attention_kl"), t, s)):
        return None, f"hidden_cka is not {t + 1}x{s + 1} numbers or attention_kl not {t}x{s}"
    mapped = result.get("mapped", {})
    if not (isinstance(mapped, dict) and all(isinstance(p, list) and all(
            isinstance(pair, list) and len(pair) == 2 and all(_count(x) for x in pair) for pair in p)
            for p in mapped.values())):
        return None, "mapped is not a mapping of stage -> [student, teacher] pairs"
    return {**result, "mapped": mapped}, ""
