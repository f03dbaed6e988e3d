"""The Train page: a form per method generated from its config schema; validate, load / save YAML, start a run.

Widgets only: forms are :mod:`sdtune.ui.forms`, starting a run is :class:`sdtune.ui.jobs.JobManager`'s (wired in
:func:`sdtune.ui.app.build_app`, since it opens the Runs page).
"""

# No `from __future__ import annotations`: gradio reads handler annotations (gr.SelectData) at run time.
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtune.config import MethodConfig, dump_yaml, load_yaml, parse_config
from sdtune.core.atomic import write_text
from sdtune.core.errors import SdtuneError
from sdtune.ui import widgets
from sdtune.ui.forms import build_components, config_to_values

if TYPE_CHECKING:
    from sdtune.ui.app import App


def build(gr, app: "App", methods: list[str]) -> dict:
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
    message = widgets.message(gr, "train-message")
    cost = gr.Code(
        label="estimate (memory and time per step; `sdtune estimate`)",
        language=None,
        interactive=False,
        elem_id="train-estimate",
    )
    yaml_view = gr.Code(label="config (what `sdtune train` gets)", language="yaml", interactive=False)

    method.change(lambda m: [gr.Column(visible=m == n) for n in methods], [method], columns)

    def validate_form(name: str, *values):
        try:
            cfg = app.form_config(name, values)
        except Exception as exc:  # noqa: BLE001
            return widgets.error(exc), gr.skip()
        return widgets.ok(f"valid {cfg.method} config"), dump_yaml(cfg)

    validate.click(validate_form, [method, *inputs], [message, yaml_view])
    gr.on(
        [method.change, validate.click, *[i.change for i in inputs]],
        lambda name, *values: app.form_estimate(name, values),
        [method, *inputs],
        cost,
        trigger_mode="always_last",
        show_progress="hidden",
    )

    def save_yaml(file: str, name: str, *values):
        try:
            cfg = app.form_config(name, values)
            target = app.roots.resolve(file, what="config file")
            if target.suffix.lower() not in (".yaml", ".yml"):
                raise SdtuneError(f"config file: {file} must end in .yaml; e.g. configs/my-run.yaml")
            write_text(target, dump_yaml(cfg))
        except Exception as exc:  # noqa: BLE001
            return widgets.error(exc), gr.skip()
        return widgets.ok(f"saved `{target}` · train it from a shell: `sdtune train {target}`"), dump_yaml(cfg)

    save.click(save_yaml, [path, method, *inputs], [message, yaml_view])

    def fill(source: Callable[[], Path]):
        try:
            cfg = parse_config(load_yaml(source()), MethodConfig)  # YAML safe loader: data only, no code
        except Exception as exc:  # noqa: BLE001
            return [widgets.error(exc), gr.skip(), *[gr.skip()] * (len(columns) + len(inputs))]
        values: list[Any] = []
        for name in methods:
            values += (
                config_to_values(app.fields[name], cfg) if name == cfg.method else [gr.skip()] * len(app.fields[name])
            )
        shown = [gr.Column(visible=cfg.method == n) for n in methods]
        return [widgets.ok(f"loaded a {cfg.method} config"), cfg.method, *shown, *values]

    fill_outputs = [message, method, *columns, *inputs]
    load.click(
        lambda file: fill(lambda: app.roots.resolve(file, what="config file", must_exist=True)), [path], fill_outputs
    )
    upload.upload(lambda file: fill(lambda: Path(file)), [upload], fill_outputs)
    return {
        "method": method,
        "inputs": inputs,
        "start": start,
        "message": message,
        "yaml": yaml_view,
        "estimate": cost,
    }
