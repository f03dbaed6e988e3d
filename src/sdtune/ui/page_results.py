"""The Results page: before / after grids, numbers, evaluation figures, output files and the run's report.html, and
"generate with this" at a strength.

Widgets only: the work is :mod:`sdtune.ui.views`' (generation: :func:`sdtune.ui.views.generate_with`).
"""

# No `from __future__ import annotations`: gradio reads handler annotations (gr.SelectData) at run time.
from typing import TYPE_CHECKING

from sdtune.ui import views, widgets

if TYPE_CHECKING:
    from sdtune.ui.app import App


def build(gr, app: "App") -> dict:
    with gr.Row():
        run = gr.Dropdown(label="run", choices=[], scale=4, elem_id="results-run")
        refresh = gr.Button("Refresh", scale=1, elem_id="results-refresh")
    message = widgets.message(gr, "results-message")
    with gr.Row():
        before = gr.Image(label="before", interactive=False, elem_id="results-before", height=320)
        after = gr.Image(label="after", interactive=False, elem_id="results-after", height=320)
    numbers = gr.Dataframe(headers=["measure", "before", "after"], label="numbers", interactive=False)
    evaluation = gr.Dataframe(
        headers=views.EVALUATION_HEADERS,
        label="evaluation (points; base = step 0, best = what output/ holds)",
        interactive=False,
        elem_id="results-evaluation",
    )
    files = gr.File(label="output files", file_count="multiple", interactive=False, elem_id="results-files")
    with gr.Accordion("Generate with this", open=True):
        with gr.Row():
            prompt = gr.Textbox(label="prompt", scale=4, elem_id="results-prompt")
            seed = gr.Number(label="seed", value=0, precision=0, scale=1)
            strength = gr.Slider(
                0.0,
                2.0,
                value=1.0,
                step=0.05,
                label="strength",
                info="LoRA weight, hypernetwork multiplier, or a whole model blended with its base; 0 = the base "
                "model. Embeddings have none.",
                scale=2,
                elem_id="results-strength",
            )
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
        generate_message = widgets.message(gr, "generate-message")
    with gr.Accordion("Report (report.html)", open=True):
        report = gr.HTML("", elem_id="results-report")

    def show(value: str | None):
        try:
            root = app.run_root(value)
            found = views.results(root)
        except Exception as exc:  # noqa: BLE001
            return widgets.error(exc), None, None, [], [], None, "", gr.skip()
        return (
            widgets.ok(found.message()),
            gr.Image(value=found.before, label=found.before_label or "before"),
            gr.Image(value=found.after, label=found.after_label or "after"),
            found.numbers,
            found.evaluation,
            found.files or None,
            found.report_html,
            views.default_prompt(root),
        )

    run.change(show, [run], [message, before, after, numbers, evaluation, files, report, prompt])

    def generate_images(value, text, seed_, strength_, steps_):
        try:
            images = views.generate_with(
                app.run_root(value), text, int(seed_ or 0), float(strength_), int(steps_ or 20)
            )
        except Exception as exc:  # noqa: BLE001
            return widgets.error(exc), gr.skip()
        return widgets.ok(
            f"{len(images)} image(s) with seed {int(seed_ or 0)} at strength {float(strength_):g}"
        ), images

    generate.click(generate_images, [run, prompt, seed, strength, steps], [generate_message, generated])
    return {"run": run, "refresh": refresh}
