"""``sdtune ui``: the gradio app. Datasets, Train (forms generated from the schemas), Runs (live), Results.

The pages only wire widgets to the functions of :mod:`sdtune.ui.datasets`, :mod:`sdtune.ui.forms`,
:mod:`sdtune.ui.jobs` and :mod:`sdtune.ui.views`; every path typed or sent by a browser goes through
:class:`sdtune.ui.paths.Roots` in those functions (gradio's API can be called without the page, so the checks
live on the server side). Live views poll the run folder once a second with ``gr.Timer``.
"""

import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdtune.config import METHOD_SCHEMAS, MethodConfig, dump_yaml, load_yaml, parse_config
from sdtune.core.atomic import write_text
from sdtune.core.errors import SdtuneError
from sdtune.ui import datasets, views
from sdtune.ui.forms import FieldSpec, build_components, config_to_values, form_fields, parse_form
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


def _ok(text: str) -> str:
    return f"**ok:** {text}"


def _error(exc: BaseException) -> str:
    """The one-line message of an sdtune error (as the CLI prints it); other exceptions with their type."""
    if isinstance(exc, SdtuneError):
        return f"**error:** {exc}"
    traceback.print_exc()
    return f"**error:** {type(exc).__name__}: {exc}"


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
                _datasets_page(gr, app)
            with gr.Tab("Train", id="train"):
                tr = _train_page(gr, app, methods)
            with gr.Tab("Runs", id="runs") as runs_tab:
                rn = _runs_page(gr, app)
            with gr.Tab("Results", id="results") as results_tab:
                rs = _results_page(gr, app)

        # Starting a run opens the Runs page on it.
        def start(method: str, *values):
            try:
                cfg = app.form_config(method, values)
                root = app.jobs.start(cfg)
            except Exception as exc:  # noqa: BLE001 - every failure is shown on the page
                return _error(exc), gr.skip(), gr.skip(), gr.skip()
            config = root / "config.yaml"
            message = _ok(
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


# -- pages -------------------------------------------------------------------------------------------------------


def _message(gr, elem_id: str):
    return gr.Markdown("", elem_id=elem_id, elem_classes=["sdtune-message"])


def _datasets_page(gr, app: App) -> dict:
    roots = app.roots
    with gr.Row():
        folder = gr.Textbox(
            label="dataset",
            placeholder="datasets/my-concept",
            info="A folder of images + captions, kohya N_name folders, a kohya .toml or a .jsonl manifest "
            f"(relative to {roots.home}).",
            scale=4,
            elem_id="dataset-path",
        )
        extension = gr.Textbox(label="caption extension", value=".txt", scale=1, elem_id="dataset-extension")
        open_button = gr.Button("Open", variant="primary", scale=1, elem_id="dataset-open")
    message = _message(gr, "dataset-message")
    items = gr.State([])
    with gr.Row():
        with gr.Column(scale=3):
            gallery = gr.Gallery(
                label="images",
                columns=6,
                height=420,
                fit_columns=False,
                allow_preview=False,
                elem_id="dataset-gallery",
                interactive=False,
            )
        with gr.Column(scale=2):
            chosen = gr.Dropdown(label="image", choices=[], elem_id="dataset-image")
            picture = gr.Image(
                label="selected image (masked-out areas tinted)",
                height=220,
                interactive=False,
                elem_id="dataset-picture",
            )
            caption = gr.Textbox(label="caption", lines=3, elem_id="dataset-caption")
            save = gr.Button("Save caption", elem_id="dataset-save-caption")
            caption_message = _message(gr, "caption-message")
    with gr.Accordion("Bulk tag edit and tag counts", open=False, elem_id="dataset-tags"):
        with gr.Row():
            add = gr.Textbox(label="add tags", placeholder="teal heart, flat colours")
            remove = gr.Textbox(label="remove tags", placeholder="blurry")
            replace = gr.Textbox(label="replace (OLD=NEW, one per line)", lines=2, placeholder="cat=tabby cat")
        with gr.Row():
            position = gr.Radio(["front", "back"], value="front", label="add at")
            dry_run = gr.Checkbox(label="dry run (show the changes only)", value=True)
            apply = gr.Button("Apply to every caption", elem_id="dataset-apply-tags")
        tags_message = gr.Textbox(label="changes", lines=6, interactive=False)
        counts = gr.Dataframe(headers=["tag", "files"], label="tag counts", interactive=False)
    with gr.Accordion("Dataset check", open=False, elem_id="dataset-check"):
        check_button = gr.Button("Run the dataset check", elem_id="dataset-run-check")
        check_summary = _message(gr, "check-message")
        findings = gr.Dataframe(
            headers=["file", "severity", "kind", "found", "training will"], label="findings", interactive=False
        )
    with gr.Accordion("Caption with a captioner", open=False, elem_id="dataset-captioner"):
        with gr.Row():
            captioner = gr.Dropdown(list(datasets.CAPTIONERS), value=next(iter(datasets.CAPTIONERS)), label="captioner")
            prefix = gr.Textbox(label="prefix (e.g. a trigger word)")
            overwrite = gr.Checkbox(label="overwrite existing captions", value=False)
            caption_all = gr.Button("Caption the images")
        captioner_message = _message(gr, "captioner-message")

    def open_dataset(path: str, ext: str):
        try:
            found = datasets.open_dataset(roots, path, ext)
        except Exception as exc:  # noqa: BLE001
            return _error(exc), [], [], gr.Dropdown(choices=[], value=None), "", None, gr.skip()
        rows = [[str(i.image), i.caption, str(i.sidecar), i.editable, str(i.mask) if i.mask else ""] for i in found]
        base = roots.resolve(path, what="dataset")
        names = [(_short(i.image, base), str(i.image)) for i in found]
        thumbs = [(str(i.image), _short(i.image, base)) for i in found]
        masks = sum(1 for i in found if i.mask)
        text = _ok(f"{len(found)} images" + (f", {masks} with masks" if masks else "") + f" in `{base}`")
        try:
            table = datasets.frequencies(roots, path, ext)
        except SdtuneError:
            table = []
        first = names[0][1] if names else None
        return text, rows, thumbs, gr.Dropdown(choices=names, value=first), *_select(rows, first), table

    def _select(rows: list, image: str | None):
        row = next((r for r in rows if r[0] == image), None)
        if row is None:
            return "", None
        picture_value = datasets.mask_overlay(Path(row[0]), Path(row[4])) if row[4] else row[0]
        return row[1], picture_value

    open_outputs = [message, items, gallery, chosen, caption, picture, counts]
    open_button.click(open_dataset, [folder, extension], open_outputs)
    folder.submit(open_dataset, [folder, extension], open_outputs)

    def pick(rows: list, evt: gr.SelectData):
        return rows[evt.index][0] if 0 <= evt.index < len(rows) else gr.skip()

    gallery.select(pick, [items], [chosen])
    chosen.change(lambda rows, image: _select(rows, image), [items, chosen], [caption, picture])

    def save_caption(rows: list, image: str | None, text: str, ext: str):
        try:
            if not image:
                raise SdtuneError("image: choose an image first")
            row = next((r for r in rows if r[0] == image), None)
            if row is not None and not row[3]:
                raise SdtuneError("caption: this caption is a line of the .jsonl manifest; edit it there")
            sidecar = datasets.save_caption(roots, image, text, ext)
        except Exception as exc:  # noqa: BLE001
            return _error(exc), gr.skip()
        updated = [[r[0], text if r[0] == image else r[1], *r[2:]] for r in rows]
        return _ok(f"saved `{sidecar}`"), updated

    save.click(save_caption, [items, chosen, caption, extension], [caption_message, items])

    def apply_tags(path, ext, add_, remove_, replace_, position_, dry):
        try:
            report = datasets.bulk_tags(roots, path, add_, remove_, replace_, position_, ext, dry)
            table = datasets.frequencies(roots, path, ext)
        except Exception as exc:  # noqa: BLE001
            return _error(exc).replace("**", ""), gr.skip()
        verb = "would change" if dry else "changed"
        lines = [f"{verb} {len(report.changes)} of {report.files} caption files"]
        lines += [f"not UTF-8 (left alone): {p}" for p in report.not_utf8]
        for change in report.changes[:50]:
            lines += change.diff()
        return "\n".join(lines), table

    apply.click(apply_tags, [folder, extension, add, remove, replace, position, dry_run], [tags_message, counts])

    def run_check(path, ext):
        try:
            report = datasets.check(roots, path, ext)
        except Exception as exc:  # noqa: BLE001
            return _error(exc), []
        rows = [[_short(f.path, Path(report.root)), f.severity, f.kind, f.message, f.action] for f in report.findings]
        errors, warnings = len(report.errors), len(report.warnings)
        verdict = "pass" if report.passed() else "fail"
        summary = (
            f"**{verdict}**: {report.images_checked} images read, {report.images_used} usable; "
            f"{errors} errors, {warnings} warnings, {len(rows) - errors - warnings} notes"
        )
        return summary, rows

    check_button.click(run_check, [folder, extension], [check_summary, findings])

    def caption_images(path, ext, name, prefix_, overwrite_):
        try:
            written, unreadable = datasets.caption_dataset(roots, path, name, overwrite_, prefix_, ext)
        except Exception as exc:  # noqa: BLE001
            return _error(exc)
        extra = f"; {unreadable} images the captioner could not read" if unreadable else ""
        return _ok(f"wrote {written} captions with {name}{extra}; press Open to see them")

    caption_all.click(caption_images, [folder, extension, captioner, prefix, overwrite], [captioner_message])
    return {"folder": folder, "gallery": gallery}


def _short(path: Path, base: Path | None) -> str:
    path = Path(path)
    if base is not None and path.is_relative_to(base):
        return str(path.relative_to(base)) or path.name
    return path.name


def _train_page(gr, app: App, methods: list[str]) -> dict:
    first = methods[0]
    method = gr.Dropdown(
        choices=methods,
        value=first,
        label="method",
        info="The training method; the form below is its config schema (every field is documented).",
        elem_id="train-method",
    )
    columns, inputs, per_method = [], [], {}
    for name in methods:
        with gr.Column(visible=name == first, elem_id=f"form-{name}") as column:
            per_method[name] = build_components(app.fields[name], name)
        columns.append(column)
        inputs += per_method[name]
    with gr.Row():
        path = gr.Textbox(
            label="config file",
            placeholder="configs/my-run.yaml",
            info=f"A YAML config to load or save (relative to {app.roots.home}).",
            scale=3,
            elem_id="train-config-path",
        )
        load = gr.Button("Load YAML", scale=1, elem_id="train-load")
        save = gr.Button("Save YAML", scale=1, elem_id="train-save")
        upload = gr.File(label="or upload a YAML", file_types=[".yaml", ".yml"], type="filepath", scale=2)
    with gr.Row():
        validate = gr.Button("Validate", elem_id="train-validate")
        start = gr.Button("Start training", variant="primary", elem_id="train-start")
    message = _message(gr, "train-message")
    yaml_view = gr.Code(label="config (what `sdtune train` gets)", language="yaml", interactive=False)

    method.change(lambda m: [gr.Column(visible=m == n) for n in methods], [method], columns)

    def validate_form(name: str, *values):
        try:
            cfg = app.form_config(name, values)
        except Exception as exc:  # noqa: BLE001
            return _error(exc), gr.skip()
        return _ok(f"valid {cfg.method} config"), dump_yaml(cfg)

    validate.click(validate_form, [method, *inputs], [message, yaml_view])

    def save_yaml(file: str, name: str, *values):
        try:
            cfg = app.form_config(name, values)
            target = app.roots.resolve(file, what="config file")
            if target.suffix.lower() not in (".yaml", ".yml"):
                raise SdtuneError(f"config file: {file} must end in .yaml; e.g. configs/my-run.yaml")
            write_text(target, dump_yaml(cfg))
        except Exception as exc:  # noqa: BLE001
            return _error(exc), gr.skip()
        return _ok(f"saved `{target}` · train it from a shell: `sdtune train {target}`"), dump_yaml(cfg)

    save.click(save_yaml, [path, method, *inputs], [message, yaml_view])

    def fill(source: Callable[[], Path]):
        try:
            cfg = parse_config(load_yaml(source()), MethodConfig)  # YAML safe loader: data only, no code
        except Exception as exc:  # noqa: BLE001
            return [_error(exc), gr.skip(), *[gr.skip()] * (len(columns) + len(inputs))]
        values: list[Any] = []
        for name in methods:
            values += (
                config_to_values(app.fields[name], cfg) if name == cfg.method else [gr.skip()] * len(app.fields[name])
            )
        shown = [gr.Column(visible=cfg.method == n) for n in methods]
        return [_ok(f"loaded a {cfg.method} config"), cfg.method, *shown, *values]

    fill_outputs = [message, method, *columns, *inputs]
    load.click(
        lambda file: fill(lambda: app.roots.resolve(file, what="config file", must_exist=True)), [path], fill_outputs
    )
    upload.upload(lambda file: fill(lambda: Path(file)), [upload], fill_outputs)
    return {"method": method, "inputs": inputs, "start": start, "message": message, "yaml": yaml_view}


def _runs_page(gr, app: App) -> dict:
    with gr.Row():
        run = gr.Dropdown(label="run", choices=[], scale=4, elem_id="runs-run", allow_custom_value=False)
        refresh = gr.Button("Refresh", scale=1, elem_id="runs-refresh")
        stop = gr.Button("Stop (checkpoint)", variant="stop", scale=1, elem_id="runs-stop")
        resume = gr.Button("Resume", scale=1, elem_id="runs-resume")
    status = gr.Markdown("Choose a run.", elem_id="runs-status")
    message = _message(gr, "runs-message")
    with gr.Row():
        loss = gr.Image(label="loss", type="pil", interactive=False, elem_id="runs-loss", height=320)
        previews = gr.Gallery(
            label="previews (newest first)", columns=2, height=320, fit_columns=False, elem_id="runs-previews"
        )
    log = gr.Textbox(label="event log", lines=12, max_lines=12, interactive=False, elem_id="runs-log", autoscroll=True)
    seen = gr.State({})

    def tick(value: str | None, last: dict):
        """Update what changed in the run folder since the last tick; skip the rest (no flicker, no work)."""
        if not value:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), last
        try:
            root = app.run_root(value)
            status_value = app.jobs.status(root)
        except Exception as exc:  # noqa: BLE001
            return _error(exc), gr.skip(), gr.skip(), gr.skip(), last
        now = {"run": value, **_signature(root)}
        same_run = last.get("run") == value
        changed = {key: not same_run or last.get(key) != now[key] for key in now}
        plot = views.loss_plot(root) if changed["metrics"] else gr.skip()
        gallery = views.preview_gallery(root) if changed["samples"] else gr.skip()
        text = views.log_text(root) if changed["logs"] else gr.skip()
        return views.status_markdown(status_value), plot, gallery, text, now

    def act(action: Callable[[Path], str], value: str | None):
        try:
            text = action(app.run_root(value))
        except Exception as exc:  # noqa: BLE001
            return _error(exc)
        return _ok(text)

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
        "tick_outputs": [status, loss, previews, log, seen],
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
        "samples": [step for step, _ in samples],
        "logs": stat(root / "events.log") + stat(root / "ui.log"),
    }


def _results_page(gr, app: App) -> dict:
    with gr.Row():
        run = gr.Dropdown(label="run", choices=[], scale=4, elem_id="results-run")
        refresh = gr.Button("Refresh", scale=1, elem_id="results-refresh")
    message = _message(gr, "results-message")
    with gr.Row():
        before = gr.Image(label="before", interactive=False, elem_id="results-before", height=320)
        after = gr.Image(label="after", interactive=False, elem_id="results-after", height=320)
    numbers = gr.Dataframe(headers=["measure", "before", "after"], label="numbers", interactive=False)
    files = gr.File(label="output files", file_count="multiple", interactive=False, elem_id="results-files")
    with gr.Accordion("Generate with this", open=True):
        with gr.Row():
            prompt = gr.Textbox(label="prompt", scale=4, elem_id="results-prompt")
            seed = gr.Number(label="seed", value=0, precision=0, scale=1)
            strength = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="strength (hypernetworks)", scale=1)
            steps = gr.Number(label="sampling steps", value=20, precision=0, scale=1)
        generate = gr.Button("Generate", variant="primary", elem_id="results-generate")
        generated = gr.Gallery(
            label="generated",
            columns=4,
            height=260,
            object_fit="contain",
            fit_columns=False,
            allow_preview=False,
            elem_id="results-generated",
        )
        generate_message = _message(gr, "generate-message")

    def show(value: str | None):
        try:
            root = app.run_root(value)
            found = views.results(root)
        except Exception as exc:  # noqa: BLE001
            return _error(exc), None, None, [], None, gr.skip()
        folders = f" · folders: {', '.join(f'`{Path(f).name}/`' for f in found.folders)}" if found.folders else ""
        text = _ok(f"{len(found.files)} output files{folders}")
        return (
            text,
            gr.Image(value=found.before, label=found.before_label or "before"),
            gr.Image(value=found.after, label=found.after_label or "after"),
            found.numbers,
            found.files or None,
            views.default_prompt(root),
        )

    run.change(show, [run], [message, before, after, numbers, files, prompt])

    def generate_images(value, text, seed_, strength_, steps_):
        try:
            images = views.generate_with(
                app.run_root(value), text, int(seed_ or 0), float(strength_), int(steps_ or 20)
            )
        except Exception as exc:  # noqa: BLE001
            return _error(exc), gr.skip()
        return _ok(f"{len(images)} image(s) with seed {int(seed_ or 0)}"), images

    generate.click(generate_images, [run, prompt, seed, strength, steps], [generate_message, generated])
    return {"run": run, "refresh": refresh}


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
