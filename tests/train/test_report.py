"""report.html and the end-of-run summary, from a synthetic run folder (metrics, evaluations, grids, report.json)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from PIL import Image

from sdtune.train.report import eval_figure, eval_plot, eval_rows, summary_lines, write_report
from sdtune.train.rundir import RunDir

ROWS = [
    {"step": 0, "fidelity": 3.1, "adherence": 90.0, "prior": 80.0, "drift": 0.0, "score": 3.1, "seconds": 4.0},
    {"step": 300, "fidelity": 42.9, "adherence": 100.0, "prior": 75.0, "drift": 18.8, "score": 33.5, "seconds": 4.1},
    {"step": 600, "fidelity": 55.0, "prior": 70.0, "drift": 20.0, "score": 45.0, "seconds": 4.2},  # no adherence
    {"step": 900, "fidelity": 46.4, "adherence": 95.0, "prior": 60.0, "drift": 52.0, "score": 20.1, "seconds": 4.3},
]
REPORT = {
    "best_step": 600,
    "selected_by": "score",
    "best": {k: v for k, v in ROWS[2].items() if k not in ("step", "seconds")},
    "last_step": 900,
    "last": {k: v for k, v in ROWS[3].items() if k not in ("step", "seconds")},
    "stopped": "max steps reached",
    "evaluations": 4,
    "eval_seconds": 16.6,
    "train_seconds": 120.0,
}


def _jsonl(rows: list[dict], tail: str = "") -> str:
    return "".join(json.dumps(r) + "\n" for r in rows) + tail


def make_run(tmp_path: Path, *, evals: bool = True, report: bool = True, grid_size: tuple[int, int] = (64, 32)):
    root = tmp_path / "runs" / "star-lora"
    root.mkdir(parents=True)
    metrics = [{"step": s, "loss": 0.5 / s**0.3, "lr": 1e-4} for s in range(1, 901)]
    (root / "metrics.jsonl").write_text(_jsonl(metrics, '{"step": 901, "lo'))  # cut by a kill
    if evals:
        # a cut last row (killed mid-write) whose grid was already written: neither may show
        (root / "eval.jsonl").write_text(_jsonl(ROWS, '{"step": 1200, "fidelity": 4'))
        (root / "eval").mkdir()
        for i, step in enumerate([r["step"] for r in ROWS] + [1200]):
            Image.new("RGB", grid_size, (40 * i, 100, 200)).save(root / "eval" / f"step-{step}.png")
    if report:
        (root / "report.json").write_text(json.dumps(REPORT))
    return RunDir(root)


def _images(page: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)


def test_the_report_is_one_self_contained_page_with_every_evaluation(tmp_path):
    run = make_run(tmp_path)
    path = write_report(run)
    assert path == run.root / "report.html" and path.is_file()
    page = path.read_text(encoding="utf-8")
    assert "<h1>star-lora</h1>" in page
    # self-contained: nothing fetched from elsewhere, every image inline
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "<script" not in page and "<link" not in page
    images = _images(page)
    assert images and all(src.startswith("data:image/") for src in images)
    # loss plot + evaluation plot + one grid per evaluated step, each labelled with its step and figures
    figures = re.findall(r'<figure id="step-(\d+)"', page)
    assert figures == ["0", "300", "600", "900"]
    assert len(images) == 2 + len(ROWS)
    assert "<b>step 300</b><br>score 33.5, fidelity 42.9, adherence 100.0, prior 75.0, drift 18.8" in page
    # the best step is marked, once, in the table and among the grids
    assert re.findall(r'<figure id="step-(\d+)" class="best">', page) == ["600"]
    assert re.findall(r'<tr class="best"><td>(\d+)</td>', page) == ["600"]
    assert page.count('<span class="badge">best</span>') == 1
    # the summary, as the console prints it
    for line in summary_lines(REPORT, path):
        assert html.escape(line) in page
    # the table: a row per evaluation, a missing figure shown as a dash
    table = page[page.index("<table>") : page.index("</table>")]
    assert table.count("<tr") == 1 + len(ROWS)
    row_600 = re.search(r"<tr[^>]*><td>600</td>(.*?)</tr>", table).group(1)
    assert re.findall(r"<td>([^<]*)</td>", row_600) == ["45.0", "55.0", "–", "70.0", "20.0", "4.2"]


def test_a_cut_last_line_is_ignored(tmp_path):
    run = make_run(tmp_path)
    assert [r["step"] for r in eval_rows(run)] == [0, 300, 600, 900]
    page = write_report(run).read_text(encoding="utf-8")
    assert "step 1200" not in page and "step-1200" not in page and "<td>1200</td>" not in page
    assert "Loss (to step 900)" in page  # the cut metrics row neither


def test_a_step_evaluated_again_after_resume_keeps_its_latest_row(tmp_path):
    run = make_run(tmp_path, report=False)
    with open(run.root / "eval.jsonl", "a", encoding="utf-8") as fh:  # after the cut line, as a resume appends
        fh.write("\n" + json.dumps({"step": 300, "fidelity": 41.0, "score": 30.0, "seconds": 3.0}) + "\n")
    rows = eval_rows(run)
    assert [r["step"] for r in rows] == [0, 300, 600, 900]
    assert rows[1]["fidelity"] == 41.0


def test_without_report_json_nothing_is_marked_best(tmp_path):
    run = make_run(tmp_path, report=False)
    page = write_report(run).read_text(encoding="utf-8")
    assert 'class="best"' not in page and '<span class="badge">' not in page
    assert "no report.json yet: 4 evaluations, the latest at step 900" in page
    assert len(re.findall(r'<figure id="step-\d+"', page)) == 4


def test_without_evaluations_the_report_has_the_loss(tmp_path):
    run = make_run(tmp_path, evals=False, report=False)
    page = write_report(run).read_text(encoding="utf-8")
    images = _images(page)
    assert len(images) == 1 and images[0].startswith("data:image/png;base64,")
    assert "Loss (to step 900)" in page and "<table>" not in page and "<figure" not in page


def test_nothing_to_report_writes_nothing(tmp_path):
    run = RunDir(tmp_path / "runs" / "empty")
    run.root.mkdir(parents=True)
    (run.root / "metrics.jsonl").write_text('{"step": 1, "lo')
    assert write_report(run) is None
    assert not (run.root / "report.html").exists()
    assert eval_plot(run) is None


def test_large_grids_are_scaled_down_to_keep_the_page_small(tmp_path):
    run = make_run(tmp_path, grid_size=(3000, 1500))
    page = write_report(run).read_text(encoding="utf-8")
    grids = [src for src in _images(page) if src.startswith("data:image/jpeg")]
    assert len(grids) == len(ROWS)
    assert len(page) < 2_000_000


def test_the_evaluation_plot_draws_every_figure_and_the_best_step(tmp_path):
    run = make_run(tmp_path)
    fig = eval_figure(eval_rows(run), 600, "t")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"score", "fidelity", "adherence", "prior", "drift (lower = better)", "best step 600"}
    assert lines["drift (lower = better)"].get_linestyle() == "--" and lines["score"].get_linestyle() == "-"
    assert list(lines["best step 600"].get_xdata()) == [600, 600]
    assert list(lines["adherence"].get_xdata()) == [0, 300, 900]  # the row without it is skipped, not zero
    image = eval_plot(run)
    assert image is not None and image.size == (800, 360)


def test_the_summary_has_three_lines_with_the_report_numbers():
    report = {
        "best_step": 900,
        "selected_by": "score",
        "best": {"fidelity": 42.9, "adherence": 100.0, "prior": 75.0, "drift": 18.8, "score": 33.5},
        "last_step": 1500,
        "last": {"fidelity": 46.4, "adherence": 100.0, "prior": 50.0, "drift": 52.0, "score": 20.1},
        "stopped": "max steps reached",
        "evaluations": 6,
        "eval_seconds": 25.1,
        "train_seconds": 230.4,
    }
    assert summary_lines(report, Path("runs/x/report.html")) == [
        "best step 900 of 1500 by score 33.5 (fidelity 42.9, drift 18.8); output/ holds step 900, "
        "output/last/ step 1500",
        "last step 1500: score 20.1 (fidelity 46.4, drift 52.0)",
        "evaluation 25.1 s of 255.5 s (9.8 %); stopped: max steps reached; report: runs/x/report.html",
    ]
    by_clip = {
        **report,
        "selected_by": "clip_i",
        "best": {"clip_i": 81.25, "fidelity": 70.0, "score": 60.0},
        "last": {"fidelity": 71.0},  # a row missing the selected figure
        "stopped": "early stop: no improvement in 3 evaluations",
        "keep_best": False,
    }
    lines = summary_lines(by_clip)
    assert len(lines) == 3
    assert lines[0] == "best step 900 of 1500 by clip_i 81.2 (score 60.0, fidelity 70.0); output/ holds step 1500"
    assert lines[1] == "last step 1500: clip_i ? (fidelity 71.0)"
    assert lines[2].endswith("stopped: early stop: no improvement in 3 evaluations") and "report:" not in lines[2]
    assert len(summary_lines({})) == 3
