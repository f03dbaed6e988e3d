"""The Runs page: a run's live status, loss curve, evaluation figures, previews and log (polled once a second), stop
and resume.

Widgets only: what is shown is :mod:`sdtune.ui.views`', stop / resume :class:`sdtune.ui.jobs.JobManager`'s.
"""

# No `from __future__ import annotations`: gradio reads handler annotations (gr.SelectData) at run time.
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sdtune.ui import views, widgets

if TYPE_CHECKING:
    from sdtune.ui.app import App


def build(gr, app: "App") -> dict:
    with gr.Row():
        run = gr.Dropdown(label="run", choices=[], scale=4, elem_id="runs-run", allow_custom_value=False)
        refresh = gr.Button("Refresh", scale=1, elem_id="runs-refresh")
        stop = gr.Button("Stop (checkpoint)", variant="stop", scale=1, elem_id="runs-stop")
        resume = gr.Button("Resume", scale=1, elem_id="runs-resume")
    status = gr.Markdown("Choose a run.", elem_id="runs-status")
    message = widgets.message(gr, "runs-message")
    with gr.Row():
        loss = gr.Image(label="loss", type="pil", interactive=False, elem_id="runs-loss", height=320)
        previews = gr.Gallery(
            label="previews (newest first)", columns=2, height=320, fit_columns=False, elem_id="runs-previews"
        )
    evaluation = gr.Image(
        label="evaluation (points by step; drift dashed, lower = better)",
        type="pil",
        interactive=False,
        elem_id="runs-eval",
        height=320,
    )
    log = gr.Textbox(label="event log", lines=12, max_lines=12, interactive=False, elem_id="runs-log", autoscroll=True)
    seen = gr.State({})

    def tick(value: str | None, last: dict):
        """Update what changed in the run folder since the last tick; skip the rest (no flicker, no work)."""
        if not value:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), last
        try:
            root = app.run_root(value)
            status_value = app.jobs.status(root)
        except Exception as exc:  # noqa: BLE001
            return widgets.error(exc), gr.skip(), gr.skip(), gr.skip(), gr.skip(), last
        now = {"run": value, **_signature(root)}
        same_run = last.get("run") == value
        changed = {key: not same_run or last.get(key) != now[key] for key in now}
        plot = views.loss_plot(root) if changed["metrics"] else gr.skip()
        eval_image = views.eval_plot(root) if changed["eval"] else gr.skip()
        gallery = views.preview_gallery(root) if changed["samples"] else gr.skip()
        text = views.log_text(root) if changed["logs"] else gr.skip()
        return views.status_markdown(status_value), plot, eval_image, gallery, text, now

    def act(action: Callable[[Path], str], value: str | None):
        try:
            text = action(app.run_root(value))
        except Exception as exc:  # noqa: BLE001
            return widgets.error(exc)
        return widgets.ok(text)

    def do_stop(root: Path) -> str:
        if app.jobs.stop(root):
            return f"stop requested: {root.name} finishes its step, writes a checkpoint and its outputs"
        return f"{root.name} is not running; nothing to stop"

    def do_resume(root: Path) -> str:
        app.jobs.resume(root)
        return f"resumed {root.name} from its latest checkpoint"

    stop.click(lambda v: act(do_stop, v), [run], [message])
    resume.click(lambda v: act(do_resume, v), [run], [message])
    run.change(lambda: {}, None, [seen])
    return {
        "run": run,
        "refresh": refresh,
        "seen": seen,
        "tick": tick,
        "tick_outputs": [status, loss, evaluation, previews, log, seen],
    }


def _signature(root: Path) -> dict:
    def stat(path: Path) -> list:
        try:
            s = path.stat()
            return [s.st_size, s.st_mtime_ns]
        except OSError:
            return []

    samples = views.sample_steps(root)
    return {
        "metrics": stat(root / "metrics.jsonl"),
        "eval": views.eval_signature(root),
        "samples": [step for step, _ in samples],
        "logs": stat(root / "events.log") + stat(root / "ui.log"),
    }
