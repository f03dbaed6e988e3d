"""``report.html`` in the run folder: one self-contained page of what a run learned, and the end-of-run summary.

Read from the run folder only (what evaluation-driven training writes beside ``metrics.jsonl``)::

    runs/<name>/eval.jsonl        one JSON object per evaluation: step, seconds and the scorer's figures (points)
                eval/step-<N>.png the grid of evaluation N's images
                report.json       best_step, selected_by, best, last_step, last, stopped, evaluations, eval_seconds,
                                  train_seconds (at the end of a run, maybe after each evaluation)
                report.html       this module's page: summary, loss and evaluation plots, the table, every grid

The page has no external links or scripts: plots and grids are ``data:`` URIs, so it can be mailed or opened
anywhere. Every reader tolerates a cut last line (a kill mid-write), rows missing keys and a missing report.json
(then nothing is marked best). :func:`eval_plot` draws the same evaluation plot for the web UI.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtune.core.atomic import write_text
from sdtune.train.plots import smooth
from sdtune.train.rundir import RunDir

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from PIL import Image

EVAL_LOG = "eval.jsonl"
EVAL_DIR = "eval"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"

# Not figures: the row's step and how long the evaluation took.
_NOT_FIGURES = {"step", "seconds"}
# Known figures first, in this order (drift last: it is the one where lower is better); others follow by name.
_ORDER = ("score", "fidelity", "adherence", "prior", "clip_i", "clip_t", "dino", "drift")
_COLOURS = {
    "score": "#111111",
    "fidelity": "#1f77b4",
    "adherence": "#2ca02c",
    "prior": "#9467bd",
    "clip_i": "#17becf",
    "clip_t": "#bcbd22",
    "dino": "#8c564b",
    "drift": "#d62728",
}
_OTHER_COLOURS = ("#ff7f0e", "#e377c2", "#7f7f7f", "#aec7e8", "#98df8a")
_GRID_MAX_SIDE = 1024  # larger grids are scaled down (JPEG) so the page stays small


# -- readers ----------------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``.jsonl`` file, one per line; a line cut by a kill (or any non-object) is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def eval_rows(run: RunDir) -> list[dict[str, Any]]:
    """The rows of ``eval.jsonl`` with an integer step, by step; a step evaluated twice (a resumed run) keeps its
    latest row."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in read_jsonl(run.root / EVAL_LOG):
        step = row.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            by_step[step] = row
    return [by_step[s] for s in sorted(by_step)]


def read_report(run: RunDir) -> dict[str, Any] | None:
    """``report.json`` as a dict, or None when it is missing or unreadable (half-written files never exist: it is
    written atomically)."""
    try:
        data = json.loads((run.root / REPORT_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def grid_path(run: RunDir, step: int) -> Path:
    return run.root / EVAL_DIR / f"step-{step}.png"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def figures_of(row: dict[str, Any] | None) -> dict[str, float]:
    """A row's figures (numeric keys other than step and seconds), in display order."""
    if not row:
        return {}
    found = {k: v for k, v in ((k, _number(v)) for k, v in row.items() if k not in _NOT_FIGURES) if v is not None}
    return {k: found[k] for k in figure_keys([found])}


def figure_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Every figure key present in any row: the known ones in their order, then the others by name."""
    keys = {k for row in rows for k, v in row.items() if k not in _NOT_FIGURES and _number(v) is not None}
    return [k for k in _ORDER if k in keys] + sorted(keys - set(_ORDER))


def best_step(report: dict[str, Any] | None) -> int | None:
    step = (report or {}).get("best_step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


# -- plots ------------------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in the UI's threads

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.subplots()


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _draw_eval(ax: Axes, rows: list[dict[str, Any]], best: int | None, title: str) -> None:
    """Every figure against the step (drift dashed), the best step as a vertical line."""
    others = iter(_OTHER_COLOURS * 4)
    for key in figure_keys(rows):
        points = [(r["step"], v) for r in rows if (v := _number(r.get(key))) is not None]
        xs, ys = zip(*points, strict=True)
        ax.plot(
            xs,
            ys,
            "o--" if key == "drift" else "o-",
            color=_COLOURS.get(key) or next(others, "#555555"),
            linewidth=2.0 if key == "score" else 1.3,
            markersize=3.5,
            label=f"{key} (lower = better)" if key == "drift" else key,
        )
    if best is not None:
        ax.axvline(best, color="#e8a100", linewidth=2.0, alpha=0.8, label=f"best step {best}")
    ax.set_xlabel("step")
    ax.set_ylabel("points")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)


def eval_figure(rows: list[dict[str, Any]], best: int | None, title: str) -> Figure | None:
    if not rows or not figure_keys(rows):
        return None
    fig, ax = _new_figure(8, 3.6)
    _draw_eval(ax, rows, best, title)
    fig.tight_layout()
    return fig


def loss_figure(rows: list[dict[str, Any]], title: str) -> Figure | None:
    """Raw loss (faint) and its smoothed curve against the step, and the validation loss when logged."""
    rows = [r for r in rows if _number(r.get("loss")) is not None and isinstance(r.get("step"), int)]
    if not rows:
        return None
    steps, losses = [r["step"] for r in rows], [float(r["loss"]) for r in rows]
    every = max(1, len(rows) // 4000)  # a long run: every k-th point
    fig, ax = _new_figure(8, 3.2)
    ax.plot(steps[::every], losses[::every], color="#9ab", linewidth=0.8, label="loss")
    ax.plot(steps[::every], smooth(losses)[::every], color="#136", linewidth=1.6, label="smoothed")
    validation = [(r["step"], v) for r in rows if (v := _number(r.get("validation_loss"))) is not None]
    if validation:
        ax.plot(*zip(*validation, strict=True), "o-", color="#c52", markersize=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)
    fig.tight_layout()
    return fig


def eval_plot(run: RunDir) -> Image.Image | None:
    """The evaluation figures against the step as an image (the web UI's); None before the first evaluation."""
    rows = eval_rows(run)
    if not rows:
        return None
    fig = eval_figure(rows, best_step(read_report(run)), f"{run.root.name}: evaluation at step {rows[-1]['step']}")
    if fig is None:
        return None
    from PIL import Image

    image = Image.open(io.BytesIO(_png(fig)))
    image.load()
    return image


# -- the console summary ----------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    number = _number(value)
    return "?" if number is None else f"{number:.1f}"


def _figures_text(figures: dict[str, Any] | None, selected: str) -> str:
    """``score 33.5 (fidelity 42.9, drift 18.8)``: the selected figure, then the others of score's make-up."""
    figures = figures or {}
    head = f"{selected} {_fmt(figures.get(selected))}"
    rest = [f"{k} {_fmt(figures[k])}" for k in ("score", "fidelity", "drift") if k != selected and k in figures]
    return f"{head} ({', '.join(rest)})" if rest else head


def summary_lines(report: dict[str, Any], html_path: str | Path | None = None) -> list[str]:
    """Three lines for the console at the end of a run: the best step and what ``output/`` holds, the last step,
    and the time evaluation took, why the run stopped and where the report is (``html_path``, as given)."""
    selected = str(report.get("selected_by") or "score")
    best, last = best_step(report), report.get("last_step")
    last_text = str(last) if isinstance(last, int) else "?"
    if best is None:
        first = f"best step: none (no evaluation selected one by {selected}); output/ holds step {last_text}"
    else:
        first = f"best step {best} of {last_text} by {_figures_text(report.get('best'), selected)}"
        if not report.get("keep_best", True) or best == last:
            first += f"; output/ holds step {last_text}"
        else:
            first += f"; output/ holds step {best}, output/last/ step {last_text}"
    second = f"last step {last_text}: {_figures_text(report.get('last'), selected)}"
    evaluation, training = _number(report.get("eval_seconds")), _number(report.get("train_seconds"))
    if evaluation is not None and training is not None:
        total = evaluation + training
        share = f" ({100 * evaluation / total:.1f} %)" if total > 0 else ""
        third = f"evaluation {evaluation:.1f} s of {total:.1f} s{share}"
    elif evaluation is not None:
        third = f"evaluation {evaluation:.1f} s"
    else:
        third = "evaluation time unknown"
    third += f"; stopped: {report.get('stopped') or 'unknown'}"
    if html_path is not None:
        third += f"; report: {html_path}"
    return [first, second, third]


# -- the page ---------------------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: .3em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.summary { background: #f4f6f8; border-left: 4px solid #136; padding: .6em .9em; white-space: pre-wrap;
  font: 13px/1.5 ui-monospace, monospace; }
img.plot { max-width: 100%; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #ddd; padding: .25em .7em; text-align: right; }
th { background: #f4f6f8; } tr.best td { background: #fff3c4; font-weight: 600; }
.grids { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; border: 2px solid #ddd; padding: .4em; max-width: 100%; }
figure.best { border-color: #e8a100; background: #fffbea; }
figure img { display: block; max-width: 100%; min-width: 256px; image-rendering: pixelated; }
figcaption { font-size: 12px; margin-top: .3em; } .badge { background: #e8a100; color: #fff; padding: 0 .4em;
  border-radius: 3px; font-weight: 600; } .note { color: #666; }
"""


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _grid_uri(path: Path) -> str | None:
    """A grid as a data URI: the PNG itself, or scaled down to a JPEG when larger than the page needs."""
    try:
        data = path.read_bytes()
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            if max(image.size) <= _GRID_MAX_SIDE:
                return _data_uri(data, "image/png")
            small = image.convert("RGB")
            small.thumbnail((_GRID_MAX_SIDE, _GRID_MAX_SIDE))
            buffer = io.BytesIO()
            small.save(buffer, format="JPEG", quality=85)
            return _data_uri(buffer.getvalue(), "image/jpeg")
    except (OSError, ValueError):  # missing, or being written: no grid for that step
        return None


def _figures_caption(figures: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in figures.items())


def _table(rows: list[dict[str, Any]], best: int | None) -> str:
    keys = figure_keys(rows)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["step", *keys, "seconds"])
    body = []
    for row in rows:
        cells = [str(row["step"]), *(_fmt(row[k]) if _number(row.get(k)) is not None else "–" for k in keys)]
        cells.append(_fmt(row["seconds"]) if _number(row.get("seconds")) is not None else "–")
        marked = ' class="best"' if row["step"] == best else ""
        body.append(f"<tr{marked}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _grids(run: RunDir, rows: list[dict[str, Any]], best: int | None) -> str:
    shown = []
    for row in rows:
        uri = _grid_uri(grid_path(run, row["step"]))
        if uri is None:
            continue
        step, figures = row["step"], figures_of(row)
        is_best = step == best
        marked = ' class="best"' if is_best else ""
        badge = ' <span class="badge">best</span>' if is_best else ""
        caption = f"<b>step {step}</b>{badge}<br>{html.escape(_figures_caption(figures))}"
        shown.append(
            f'<figure id="step-{step}"{marked}><img src="{uri}" alt="evaluation images at step {step}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    if not shown:
        return '<p class="note">no evaluation grids</p>'
    return f'<div class="grids">{"".join(shown)}</div>'


def render_report(run: RunDir, html_path: str | Path | None = None) -> str | None:
    """The page's HTML (what :func:`write_report` writes); None when the run has neither evaluations nor losses."""
    rows = eval_rows(run)
    metrics = run.metrics()
    loss = loss_figure(metrics, "loss")
    if not rows and loss is None:
        return None
    report = read_report(run)
    best = best_step(report)
    name = run.root.name
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(name)}: sdtune report</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(name)}</h1>",
    ]
    if report is not None:
        lines = summary_lines(report, html_path)
        parts.append(f'<div class="summary">{html.escape(chr(10).join(lines))}</div>')
    elif rows:
        parts.append(
            f'<p class="note">no report.json yet: {len(rows)} evaluation{"s" if len(rows) != 1 else ""}, '
            f"the latest at step {rows[-1]['step']}</p>"
        )
    else:
        parts.append('<p class="note">no evaluations (eval.jsonl) in this run</p>')
    if loss is not None:
        last = max(r["step"] for r in metrics if isinstance(r.get("step"), int) and _number(r.get("loss")) is not None)
        parts.append(f"<h2>Loss (to step {last})</h2>")
        parts.append(f'<img class="plot" alt="loss against step" src="{_data_uri(_png(loss), "image/png")}">')
    figure = eval_figure(rows, best, "evaluation")
    if figure is not None:
        parts.append("<h2>Evaluation</h2>")
        parts.append(f'<img class="plot" alt="evaluation figures" src="{_data_uri(_png(figure), "image/png")}">')
        parts.append(
            '<p class="note">points, 0-100: higher is better, except drift (dashed), how far the model moved '
            "from the base on what it should keep drawing.</p>"
        )
    if rows:
        parts.append(_table(rows, best))
        parts.append("<h2>Evaluation images</h2>")
        parts.append(_grids(run, rows, best))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run: RunDir, html_path: str | Path | None = None) -> Path | None:
    """Write ``report.html`` (atomically) and return its path; None when there is nothing to report yet.

    ``html_path`` is how the summary names the page (e.g. relative to the working folder); default: its path."""
    dest = run.root / REPORT_HTML
    text = render_report(run, dest if html_path is None else html_path)
    if text is None:
        return None
    write_text(dest, text)
    return dest
