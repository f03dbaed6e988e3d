"""The Datasets page: open a dataset as training reads it, preview masks, edit captions, bulk tags, check, caption.

Widgets only: the work is :mod:`sdtune.ui.datasets`'s, where every path goes through the roots.
"""

# No `from __future__ import annotations`: gradio reads handler annotations (gr.SelectData) at run time.
from pathlib import Path
from typing import TYPE_CHECKING

from sdtune.core.errors import SdtuneError
from sdtune.ui import datasets, widgets

if TYPE_CHECKING:
    from sdtune.ui.app import App

# a row of the page's state: [image, caption, sidecar, editable, mask file ("" = none), mask is the image's alpha]
IMAGE, CAPTION, SIDECAR, EDITABLE, MASK, ALPHA = range(6)


def build(gr, app: "App") -> dict:
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
        alpha_mask = gr.Checkbox(
            label="PNG alpha as mask",
            value=False,
            info="data.alpha_mask: images without a mask file use their transparency as the loss mask.",
            scale=1,
            elem_id="dataset-alpha-mask",
        )
        open_button = gr.Button("Open", variant="primary", scale=1, elem_id="dataset-open")
    status = widgets.message(gr, "dataset-message")
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
                label="selected image (areas its loss mask leaves out are tinted)",
                height=220,
                interactive=False,
                elem_id="dataset-picture",
            )
            mask_note = gr.Markdown("", elem_id="dataset-mask-note")
            caption = gr.Textbox(label="caption", lines=3, elem_id="dataset-caption")
            save = gr.Button("Save caption", elem_id="dataset-save-caption")
            caption_message = widgets.message(gr, "caption-message")
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
        check_summary = widgets.message(gr, "check-message")
        findings = gr.Dataframe(
            headers=["file", "severity", "kind", "found", "training will"], label="findings", interactive=False
        )
    with gr.Accordion("Caption with a captioner", open=False, elem_id="dataset-captioner"):
        first = next(iter(datasets.CAPTIONERS))
        with gr.Row():
            captioner = gr.Dropdown(
                list(datasets.CAPTIONERS), value=first, label="captioner", elem_id="dataset-captioner-kind"
            )
            prefix = gr.Textbox(label="prefix (e.g. a trigger word)")
            overwrite = gr.Checkbox(label="overwrite existing captions", value=False)
        model = gr.Textbox(
            label="model folder",
            placeholder="models/wd-vit-tagger-v3",
            info="A local BLIP folder, or a WD14 tagger's folder (model.onnx + selected_tags.csv); inside "
            f"{roots.shown()}. Nothing is downloaded.",
            visible=False,
            elem_id="dataset-captioner-model",
        )
        with gr.Row(visible=False) as wd14_options:
            threshold = gr.Slider(0.0, 1.0, value=0.35, step=0.01, label="general tag threshold")
            character_threshold = gr.Slider(0.0, 1.0, value=0.85, step=0.01, label="character tag threshold")
        with gr.Row(visible=False) as blip_options:
            max_new_tokens = gr.Number(label="longest caption (tokens)", value=40, precision=0, minimum=1)
            num_beams = gr.Number(label="beams (1 = greedy)", value=1, precision=0, minimum=1)
        caption_all = gr.Button("Caption the images", elem_id="dataset-caption-all")
        captioner_message = widgets.message(gr, "captioner-message")

    def captioner_options(label: str):
        kind = datasets.CAPTIONERS.get(label, label)
        return (
            gr.Textbox(visible=kind in datasets.NEEDS_MODEL),
            gr.Row(visible=kind == "wd14"),
            gr.Row(visible=kind == "blip"),
        )

    captioner.change(captioner_options, [captioner], [model, wd14_options, blip_options])

    def open_dataset(path: str, ext: str, alpha: bool):
        try:
            found = datasets.open_dataset(roots, path, ext, alpha)
        except Exception as exc:  # noqa: BLE001
            return widgets.error(exc), [], [], gr.Dropdown(choices=[], value=None), "", None, "", gr.skip()
        rows = [
            [str(i.image), i.caption, str(i.sidecar), i.editable, str(i.mask) if i.mask else "", i.mask_alpha]
            for i in found
        ]
        base = roots.resolve(path, what="dataset")
        names = [(widgets.short(i.image, base), str(i.image)) for i in found]
        thumbs = [(str(i.image), widgets.short(i.image, base)) for i in found]
        masks = sum(1 for i in found if i.mask)
        text = widgets.ok(f"{len(found)} images" + (f", {masks} with masks" if masks else "") + f" in `{base}`")
        try:
            table = datasets.frequencies(roots, path, ext)
        except SdtuneError:
            table = []
        first_image = names[0][1] if names else None
        return text, rows, thumbs, gr.Dropdown(choices=names, value=first_image), *select(rows, first_image), table

    def select(rows: list, image: str | None):
        row = next((r for r in rows if r[IMAGE] == image), None)
        if row is None:
            return "", None, ""
        if not row[MASK]:
            return row[CAPTION], row[IMAGE], "no loss mask: every pixel trains"
        try:
            preview = datasets.mask_overlay(Path(row[IMAGE]), Path(row[MASK]), alpha=bool(row[ALPHA]))
        except Exception as exc:  # noqa: BLE001
            return row[CAPTION], row[IMAGE], widgets.error(exc)
        source = "its alpha channel" if row[ALPHA] else f"`{widgets.short(Path(row[MASK]), Path(row[IMAGE]).parent)}`"
        return row[CAPTION], preview, f"loss mask: {source}"

    open_outputs = [status, items, gallery, chosen, caption, picture, mask_note, counts]
    open_button.click(open_dataset, [folder, extension, alpha_mask], open_outputs)
    folder.submit(open_dataset, [folder, extension, alpha_mask], open_outputs)

    def pick(rows: list, evt: gr.SelectData):
        return rows[evt.index][IMAGE] if 0 <= evt.index < len(rows) else gr.skip()

    gallery.select(pick, [items], [chosen])
    chosen.change(lambda rows, image: select(rows, image), [items, chosen], [caption, picture, mask_note])

    def save_caption(rows: list, image: str | None, text: str, ext: str):
        try:
            if not image:
                raise SdtuneError("image: choose an image first")
            row = next((r for r in rows if r[IMAGE] == image), None)
            if row is not None and not row[EDITABLE]:
                raise SdtuneError("caption: this caption is a line of the .jsonl manifest; edit it there")
            sidecar = datasets.save_caption(roots, image, text, ext)
        except Exception as exc:  # noqa: BLE001
            return widgets.error(exc), gr.skip()
        updated = [[r[IMAGE], text if r[IMAGE] == image else r[CAPTION], *r[SIDECAR:]] for r in rows]
        return widgets.ok(f"saved `{sidecar}`"), updated

    save.click(save_caption, [items, chosen, caption, extension], [caption_message, items])

    def apply_tags(path, ext, add_, remove_, replace_, position_, dry):
        try:
            report = datasets.bulk_tags(roots, path, add_, remove_, replace_, position_, ext, dry)
            table = datasets.frequencies(roots, path, ext)
        except Exception as exc:  # noqa: BLE001
            return widgets.error(exc).replace("**", ""), gr.skip()
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
            return widgets.error(exc), []
        root = Path(report.root)
        rows = [[widgets.short(f.path, root), f.severity, f.kind, f.message, f.action] for f in report.findings]
        errors, warnings = len(report.errors), len(report.warnings)
        verdict = "pass" if report.passed() else "fail"
        summary = (
            f"**{verdict}**: {report.images_checked} images read, {report.images_used} usable; "
            f"{errors} errors, {warnings} warnings, {len(rows) - errors - warnings} notes"
        )
        return summary, rows

    check_button.click(run_check, [folder, extension], [check_summary, findings])

    def caption_images(path, ext, name, prefix_, overwrite_, model_, threshold_, character_, tokens_, beams_):
        try:
            written, unreadable = datasets.caption_dataset(
                roots,
                path,
                name,
                overwrite_,
                prefix_,
                ext,
                model=model_ or "",
                threshold=threshold_,
                character_threshold=character_,
                max_new_tokens=int(tokens_ or 40),
                num_beams=int(beams_ or 1),
            )
        except Exception as exc:  # noqa: BLE001
            return widgets.error(exc)
        extra = f"; {unreadable} images the captioner could not read" if unreadable else ""
        return widgets.ok(f"wrote {written} captions with {name}{extra}; press Open to see them")

    caption_all.click(
        caption_images,
        [folder, extension, captioner, prefix, overwrite, model, threshold, character_threshold, max_new_tokens]
        + [num_beams],
        [captioner_message],
    )
    return {"folder": folder, "gallery": gallery}
