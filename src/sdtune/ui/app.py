"""``sdtune ui``: the gradio app. Datasets, Train (forms generated from the schemas), Runs (live), Results.

Each page is built in its own module (``page_datasets``, ``page_train``, ``page_runs``, ``page_results``); this one
holds the app's state and what connects the pages. The pages only wire widgets to the functions of
:mod:`sdtune.ui.datasets`, :mod:`sdtune.ui.forms`, :mod:`sdtune.ui.jobs` and :mod:`sdtune.ui.views`; every path
typed or sent by a browser goes through :class:`sdtune.ui.paths.Roots` in those functions (gradio's API can be
called without the page, so the checks live on the server side). Live views poll the run folder once a second
with ``gr.Timer``.
"""

import os
from pathlib import Path
from typing import Any

from sdtune.config import METHOD_SCHEMAS, dump_yaml
from sdtune.core.errors import SdtuneError
from sdtune.ui import page_datasets, page_results, page_runs, page_train, widgets
from sdtune.ui.forms import FieldSpec, form_fields, parse_form
from sdtune.ui.jobs import JobManager
from sdtune.ui.paths import Roots, confine_config

TICK_SECONDS = 1.0
CSS = """
#dataset-gallery .thumbnail-item { min-width: 72px; }
.sdtune-message p { margin: 0; }
#results-before img, #results-after img, #dataset-picture img {
  width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;
}
#runs-previews img, #results-generated img { image-rendering: pixelated; }
"""


class App:
    """The UI's state: the roots, the runs folder, the job manager and each method's form fields."""

    def __init__(self, roots: Roots, runs_dir: str | Path | None = None, jobs: JobManager | None = None) -> None:
        self.roots = roots
        self.runs_dir = roots.resolve(runs_dir or "runs", what="--runs")
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.jobs = jobs or JobManager([self.runs_dir], cwd=roots.home)
        self.fields: dict[str, list[FieldSpec]] = {m: form_fields(s) for m, s in METHOD_SCHEMAS.items()}

    # -- Train ------------------------------------------------------------------------------------------------
    def _split(self, values: tuple) -> dict[str, list[Any]]:
        out, start = {}, 0
        for method, fields in self.fields.items():
            out[method] = list(values[start : start + len(fields)])
            start += len(fields)
        return out

    def form_config(self, method: str, values: tuple):
        """Validate the chosen method's form and confine its paths to the roots."""
        if method not in METHOD_SCHEMAS:
            raise SdtuneError(f"method: choose one of {', '.join(METHOD_SCHEMAS)}")
        cfg = parse_form(METHOD_SCHEMAS[method], self.fields[method], self._split(values)[method])
        return confine_config(cfg, self.roots)

    def form_estimate(self, method: str, values: tuple) -> str:
        """What the form's run would cost (``sdtune estimate``'s lines), or why it cannot be estimated yet."""
        from sdtune.methods.estimate import device_memory, estimate, summary_lines

        try:
            cfg = self.form_config(method, values)
            cost = estimate(cfg)
        except Exception as exc:  # noqa: BLE001 - the form is being edited: say what is missing
            return f"estimate: not yet ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        return "\n".join(summary_lines(cost, device_memory(cost.device)))

    def run_choices(self) -> list[tuple[str, str]]:
        choices = []
        for root in self.jobs.find_runs():
            shown = root.relative_to(self.roots.home) if root.is_relative_to(self.roots.home) else root
            choices.append((str(shown), str(root)))
        return choices

    def run_root(self, value: str | None) -> Path:
        if not value:
            raise SdtuneError("run: choose a run in the list (press Refresh if it is new)")
        return self.roots.resolve(value, what="run", must_exist=True)


def build_app(app: App):
    """The gradio Blocks of the four pages."""
    import gradio as gr

    methods = list(METHOD_SCHEMAS)
    with gr.Blocks(title="sdtune") as demo:
        gr.Markdown(f"## sdtune\nFolders this UI may use: `{app.roots.shown()}` · runs: `{app.runs_dir}`")
        with gr.Tabs(selected="datasets") as tabs:
            with gr.Tab("Datasets", id="datasets"):
                page_datasets.build(gr, app)
            with gr.Tab("Train", id="train"):
                tr = page_train.build(gr, app, methods)
            with gr.Tab("Runs", id="runs") as runs_tab:
                rn = page_runs.build(gr, app)
            with gr.Tab("Results", id="results") as results_tab:
                rs = page_results.build(gr, app)

        # Starting a run opens the Runs page on it.
        def start(method: str, *values):
            try:
                cfg = app.form_config(method, values)
                root = app.jobs.start(cfg)
            except Exception as exc:  # noqa: BLE001 - every failure is shown on the page
                return widgets.error(exc), gr.skip(), gr.skip(), gr.skip()
            config = root / "config.yaml"
            message = widgets.ok(
                f"started {cfg.name} with `{config}` · the same training from a shell: "
                f"`sdtune train {config} --set name=<new-name>`"
            )
            choices = app.run_choices()
            return message, dump_yaml(cfg), gr.Tabs(selected="runs"), gr.Dropdown(choices=choices, value=str(root))

        tr["start"].click(start, [tr["method"], *tr["inputs"]], [tr["message"], tr["yaml"], tabs, rn["run"]])

        def refresh_runs(current: str | None):
            choices = app.run_choices()
            values = [v for _, v in choices]
            value = current if current in values else (values[0] if values else None)
            return gr.Dropdown(choices=choices, value=value)

        for tab, page in ((runs_tab, rn), (results_tab, rs)):
            tab.select(refresh_runs, [page["run"]], [page["run"]])
            page["refresh"].click(refresh_runs, [page["run"]], [page["run"]])
        demo.load(refresh_runs, [rn["run"]], [rn["run"]])
        demo.load(refresh_runs, [rs["run"]], [rs["run"]])

        timer = gr.Timer(TICK_SECONDS)
        timer.tick(rn["tick"], [rn["run"], rn["seen"]], rn["tick_outputs"], show_progress="hidden")
    return demo


def launch(
    roots: Roots,
    runs_dir: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    *,
    block: bool = True,
    quiet: bool = False,
):
    """Build and serve the UI; gradio's file route serves only files inside the roots."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    demo = build_app(App(roots, runs_dir))
    demo.launch(
        server_name=host,
        server_port=port,
        allowed_paths=[str(f) for f in roots.folders],
        prevent_thread_lock=not block,
        quiet=quiet,
        show_error=True,
        css=CSS,
        theme=gr.themes.Default(),
    )
    return demo
