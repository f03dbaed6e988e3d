"""The Runs and Results pages' evaluation views: the live evaluation plot, the best / last figures, the report."""

from __future__ import annotations

import html
import json
import re

import pytest
from PIL import Image

from sdtune.train.report import write_report
from sdtune.train.rundir import RunDir
from sdtune.ui import views
from sdtune.ui.app import App
from sdtune.ui.paths import Roots

ROWS = [
    {"step": 0, "fidelity": 2.0, "adherence": 88.0, "prior": 81.0, "drift": 0.0, "score": 2.0, "seconds": 3.0},
    {"step": 100, "fidelity": 61.5, "adherence": 97.0, "prior": 77.0, "drift": 12.5, "score": 55.25, "seconds": 3.0},
    {"step": 200, "fidelity": 64.0, "prior": 60.0, "drift": 40.0, "score": 44.0, "seconds": 3.1},
]
REPORT = {
    "best_step": 100,
    "selected_by": "score",
    "best": {"fidelity": 61.5, "adherence": 97.0, "prior": 77.0, "drift": 12.5, "score": 55.25},
    "last_step": 200,
    "last": {"fidelity": 64.0, "prior": 60.0, "drift": 40.0, "score": 44.0},
    "stopped": "early stop: no improvement in 1 evaluation",
    "evaluations": 3,
    "eval_seconds": 9.1,
    "train_seconds": 50.0,
}


def _write_run(root, rows=ROWS, report=REPORT):
    root.mkdir(parents=True, exist_ok=True)
    metrics = [{"step": s, "loss": 1.0 / s} for s in range(1, 201)]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    (root / "eval").mkdir(exist_ok=True)
    for row in rows:
        Image.new("RGB", (32, 16), (row["step"] % 256, 0, 0)).save(root / "eval" / f"step-{row['step']}.png")
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if report is not None:
        (root / "report.json").write_text(json.dumps(report))


def test_the_evaluation_plot_appears_with_the_first_evaluation(tmp_path):
    root = tmp_path / "runs" / "r"
    root.mkdir(parents=True)
    (root / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    assert views.eval_plot(root) is None
    before = views.eval_signature(root)
    (root / "eval.jsonl").write_text(json.dumps(ROWS[0]) + "\n" + '{"step": 100, "fid')  # the second one is cut
    assert views.eval_signature(root) != before
    plot = views.eval_plot(root)
    assert isinstance(plot, Image.Image) and plot.size[0] > 300


def test_the_results_show_best_and_last_figures_and_the_report(tmp_path):
    root = tmp_path / "runs" / "r"
    _write_run(root)
    (root / "output").mkdir()
    (root / "output" / "r.safetensors").write_bytes(b"x")
    assert views.results(root).report is None and views.results(root).report_html == ""  # not written yet
    page = write_report(RunDir(root))

    found = views.results(root)
    assert found.evaluation[0] == ["step", "0", "100", "200"]
    table = {row[0]: row[1:] for row in found.evaluation}
    assert table["score"] == ["2.0", "55.2", "44.0"]  # base, best (report.json), last (report.json)
    assert table["fidelity"] == ["2.0", "61.5", "64.0"]
    assert table["adherence"] == ["88.0", "97.0", "-"]  # the last evaluation had none
    assert table["drift (lower = better)"] == ["0.0", "12.5", "40.0"]
    assert found.files == [str(root / "output" / "r.safetensors"), str(page)]
    assert found.message() == "1 output files · report: `report.html`"
    # the report in a sandboxed iframe: its srcdoc, unescaped, is report.html itself
    srcdoc = re.fullmatch(
        r'<iframe title="report" sandbox="" srcdoc="([^"]*)" style="[^"]*"></iframe>', found.report_html
    )
    assert srcdoc is not None
    assert html.unescape(srcdoc.group(1)) == page.read_text(encoding="utf-8")
    assert "<" not in srcdoc.group(1) and "early stop: no improvement in 1 evaluation" in srcdoc.group(1)


def test_a_run_still_going_shows_its_latest_evaluation_and_no_best(tmp_path):
    root = tmp_path / "runs" / "r"
    _write_run(root, report=None)
    table = {row[0]: row[1:] for row in views.evaluation_numbers(root)}
    assert table["step"] == ["0", "-", "200"] and table["score"] == ["2.0", "-", "44.0"]
    assert views.evaluation_numbers(tmp_path / "runs" / "none") == []


def test_the_runs_page_redraws_the_evaluation_plot_only_when_it_changes(tmp_path):
    gr = pytest.importorskip("gradio")
    from sdtune.ui import page_runs

    root = tmp_path / "runs" / "r"
    _write_run(root, rows=ROWS[:1], report=None)
    app = App(Roots([tmp_path]))
    with gr.Blocks():
        page = page_runs.build(gr, app)
    assert len(page["tick_outputs"]) == 6
    skip = gr.skip()

    first = page["tick"](str(root), {})
    assert isinstance(first[2], Image.Image)  # the evaluation plot (loss at 1, previews 3, log 4, seen 5)
    again = page["tick"](str(root), first[5])
    assert again[1] == skip and again[2] == skip
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    grown = page["tick"](str(root), again[5])
    assert isinstance(grown[2], Image.Image) and grown[1] == skip
    (root / "report.json").write_text(json.dumps(REPORT))  # the best step is marked: redraw
    marked = page["tick"](str(root), grown[5])
    assert isinstance(marked[2], Image.Image) and marked[2].tobytes() != grown[2].tobytes()
