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

from hkd.errors import HkdError  # noqa: E402

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


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Parse ``metrics.jsonl``; lines that are not a JSON object are skipped and counted."""
    rows, skipped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
        else:
            skipped += 1
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
    metrics, skipped = read_metrics(metrics_path)
    data = RunData(run_dir, metrics, skipped, finished=(run_dir / "final").is_dir())
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        try:
            config = yaml.safe_load(config_path.read_text()) or {}
            phases = config.get("schedule", {}).get("phases", [])
            data.phase_names = [str(p.get("name", i)) for i, p in enumerate(phases)]
            data.planned_steps = sum(int(p.get("steps", 0)) for p in phases) or None
        except (yaml.YAMLError, AttributeError, TypeError, ValueError):
            pass  # the report still works from metrics alone
    for path in sorted(run_dir.glob("eval*.json")):
        try:
            data.evals[path.name] = flatten(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise HkdError(f"report: {path}: not valid JSON ({exc})") from exc
    return data


# --------------------------------------------------------------------------- figures


def series(metrics: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values where ``key`` was logged (stages log only while active)."""
    points = [(row["step"], float(row[key])) for row in metrics if isinstance(row.get(key), (int, float))]
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


def line_figure(data: RunData, panels: list[tuple[str, list[str], bool]]) -> Figure | None:
    """One row per panel ``(title, metric keys, log scale)``; panels without data are dropped."""
    spans = phase_spans(data)
    panels = [p for p in panels if any(series(data.metrics, k)[0] for k in p[1])]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.8 * len(panels)), squeeze=False, sharex=True)
    for ax, (title, keys, log) in zip(axes[:, 0], panels):
        plotted: list[int] = []
        for key in keys:
            steps, values = series(data.metrics, key)
            if steps:
                label = key[len(LAYER_PREFIX):] if key.startswith(LAYER_PREFIX) else key
                ax.plot(steps, values, label=label, linewidth=1.2, marker="." if len(steps) < 30 else None)
                plotted += steps
        positive = all(v > 0 for k in keys for v in series(data.metrics, k)[1])
        if log and positive:
            ax.set_yscale("log")
        mark_phases(ax, spans, min(plotted), max(plotted))
        ax.set_title(title, loc="left", fontsize=10, pad=14)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    return fig


def layer_pairs(metrics: list[dict[str, Any]]) -> dict[str, list[tuple[int, int]]]:
    """Stage -> the (student, teacher) pairs it logged with ``log_layers``."""
    pairs: dict[str, list[tuple[int, int]]] = {}
    for key in keys_with(metrics, LAYER_PREFIX):
        stage, pair = key[len(LAYER_PREFIX):].rsplit("/", 1)
        s, t = pair.split("_")
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


def table_html(header: list[str] | None, rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        text = f"{value:.6g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, list) else str(value)
        return f"<td>{html.escape(text)}</td>"

    head = "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join(f"<tr>{''.join(cell(v) for v in row)}</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


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


def build_report(run_dir: Path, out_dir: Path | None = None, steps: list[int] | None = None) -> Path:
    """Write ``index.html`` and its PNGs into ``out_dir`` (default ``RUN_DIR/report``); return the page."""
    data = load_run(run_dir)
    out_dir = out_dir or run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    sections: list[str] = [f"<h1>hkd run report: {html.escape(run_dir.name)}</h1>"]
    if data.skipped_lines:
        sections.append(f'<p class="note">{data.skipped_lines} unreadable line(s) in metrics.jsonl skipped '
                        "(a run still writing leaves its last line incomplete).</p>")
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
        figure("Schedule", "schedule", line_figure(data, [("stage weights", weights, False),
                                                          ("temperature", ["temperature"], False)]))
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
    for path in sorted((run_dir / "probe").glob("step-*.json")):
        result = json.loads(path.read_text())
        figure(f"Layer similarity at step {result['step']} (hkd probe)", f"probe_{path.stem.replace('-', '_')}",
               probe_figure(result), f"every teacher layer x every student layer on {result['tokens']} tokens; "
               "red boxes: the pairs this run's layer maps connect")
    for name, values in data.evals.items():
        sections.append(f"<h2>Evaluation: {html.escape(name)}</h2>"
                        + table_html(["metric", "value"], [[k, v] for k, v in values.items()]))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>hkd report: {html.escape(run_dir.name)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n")
    target = out_dir / "index.html"
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(page)
    tmp.replace(target)  # a browser refreshing the page never sees half of it
    return target
