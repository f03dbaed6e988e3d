"""The Datasets and Results pages' work, without a browser: captions, bulk tags, check, captioner, masks, views."""

from __future__ import annotations

import codecs
import json

import numpy as np
import pytest
from PIL import Image

from sdtune.core.errors import DataError, SdtuneError
from sdtune.data.captioners import BlipCaptioner, WD14Tagger
from sdtune.ui import datasets, views
from sdtune.ui.paths import PathRefused, Roots
from sdtune.world import write_concept_dataset


@pytest.fixture
def dataset(tmp_path):
    paths = write_concept_dataset("teal_heart", tmp_path / "data", n=4)
    return Roots([tmp_path]), tmp_path / "data", paths


def test_open_lists_images_with_their_captions(dataset):
    roots, folder, paths = dataset
    items = datasets.open_dataset(roots, "data")
    assert [i.image for i in items] == [p.resolve() for p in paths]
    assert items[0].caption == paths[0].with_suffix(".txt").read_text().strip()
    assert all(i.editable and i.mask is None for i in items)


def test_save_caption_writes_the_sidecar_and_keeps_bom_line_endings_and_final_newline(dataset):
    roots, folder, paths = dataset
    sidecar = paths[0].with_suffix(".txt")
    assert datasets.save_caption(roots, paths[0], "a new caption") == sidecar.resolve()
    assert sidecar.read_bytes() == b"a new caption\n"
    sidecar.write_bytes(codecs.BOM_UTF8 + b"old\r\nsecond line")
    datasets.save_caption(roots, paths[0], "one\ntwo")
    assert sidecar.read_bytes() == codecs.BOM_UTF8 + b"one\r\ntwo"
    paths[1].with_suffix(".txt").unlink()
    datasets.save_caption(roots, paths[1], "made from nothing")  # a missing sidecar is created
    assert paths[1].with_suffix(".txt").read_text() == "made from nothing\n"
    sidecar.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(DataError, match="not UTF-8"):
        datasets.save_caption(roots, paths[0], "x")
    assert sidecar.read_bytes() == b"\xff\xfe not utf-8"


def test_bulk_tags_dry_run_then_apply(dataset):
    roots, folder, paths = dataset
    before = [p.with_suffix(".txt").read_text() for p in paths]
    report = datasets.bulk_tags(roots, "data", add="flat, teal", replace="a teal heart=heart shape", dry_run=True)
    assert len(report.changes) == 4 and not report.written
    assert [p.with_suffix(".txt").read_text() for p in paths] == before
    datasets.bulk_tags(roots, "data", add="flat", replace="a teal heart on a white background=white scene")
    text = paths[0].with_suffix(".txt").read_text()
    assert text.startswith("flat, ") and "white scene" in text
    counts = dict(map(tuple, datasets.frequencies(roots, "data")))
    assert counts["flat"] == 4
    with pytest.raises(DataError):
        datasets.bulk_tags(roots, "data", replace="no equals sign")


def test_the_dataset_check_reports_broken_files(dataset):
    roots, folder, _ = dataset
    (folder / "broken.png").write_bytes(b"not a png")
    report = datasets.check(roots, "data")
    kinds = {(f.path.name, f.kind) for f in report.findings}
    assert ("broken.png", "not_an_image") in kinds
    assert not report.passed()


def test_the_shapes_world_captioner_reads_the_concept_back(dataset):
    roots, folder, paths = dataset
    truth = [p.with_suffix(".txt").read_text().strip() for p in paths]
    assert datasets.caption_dataset(roots, "data", "shapes-world scorer (built-in)") == (0, 0)  # all captioned
    for p in paths:
        p.with_suffix(".txt").unlink()
    written, unreadable = datasets.caption_dataset(roots, "data", "shapes-world scorer (built-in)", prefix="<th>")
    assert (written, unreadable) == (4, 0)
    assert [p.with_suffix(".txt").read_text().strip() for p in paths] == [f"<th>, {t}" for t in truth]
    Image.new("RGB", (64, 64), (10, 200, 30)).save(folder / "plain.png")  # nothing to read: no caption
    assert datasets.caption_dataset(roots, "data", "shapes-world scorer (built-in)") == (0, 1)
    with pytest.raises(DataError, match="unknown"):
        datasets.caption_dataset(roots, "data", "nope")
    with pytest.raises(DataError, match="captioner model: blip needs a local model folder"):
        datasets.caption_dataset(roots, "data", "BLIP (local model folder)")


def _solid_images(folder, colours):
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(colours):
        Image.new("RGB", (8, 8), colour).save(folder / f"{i}.png")
    return [folder / f"{i}.png" for i in range(len(colours))]


def test_wd14_captions_with_its_thresholds_from_a_model_folder_inside_the_roots(tmp_path, tiny_tagger):
    images = _solid_images(tmp_path / "data", [(10, 100, 204), (204, 100, 10)])
    label = "WD14 tagger (local model folder)"
    with pytest.raises(PathRefused, match="captioner model"):  # the model folder must lie inside the roots too
        datasets.caption_dataset(Roots([tmp_path]), "data", label, model=str(tiny_tagger))
    assert not any(p.with_suffix(".txt").exists() for p in images)
    roots = Roots([tmp_path, tiny_tagger])
    assert datasets.caption_dataset(roots, "data", label, prefix="ohwx", model=str(tiny_tagger)) == (2, 0)
    tagger = WD14Tagger(tiny_tagger)  # the data layer's tagger gives the same tags
    for path in images:
        with Image.open(path) as im:
            assert path.with_suffix(".txt").read_text() == f"ohwx, {tagger(im.convert('RGB'))}\n"
    assert images[0].with_suffix(".txt").read_text() == "ohwx, hatsune miku, blue sky, long hair, green hair, ^_^\n"
    # thresholds reach the tagger: lower ones let more tags in; existing captions are replaced only on request
    assert datasets.caption_dataset(roots, "data", "wd14", model=str(tiny_tagger), threshold=0.1) == (0, 0)
    written = datasets.caption_dataset(
        roots, "data", "wd14", overwrite=True, model=str(tiny_tagger), threshold=0.1, character_threshold=0.5
    )
    assert written == (2, 0)
    loose = "hatsune miku, kagamine rin, blue sky, long hair, green hair, ^_^, smile\n"
    assert images[0].with_suffix(".txt").read_text() == loose
    with pytest.raises(DataError, match="--threshold"):
        datasets.caption_dataset(roots, "data", "wd14", overwrite=True, model=str(tiny_tagger), threshold=1.5)


def test_blip_captions_from_a_model_folder(tmp_path, tiny_blip):
    images = _solid_images(tmp_path / "data", [(200, 20, 20), (20, 20, 200), (20, 200, 20)])
    roots = Roots([tmp_path, tiny_blip])
    written = datasets.caption_dataset(roots, "data", "BLIP (local model folder)", model=str(tiny_blip), num_beams=2)
    assert written == (3, 0)
    blip = BlipCaptioner(tiny_blip, num_beams=2)  # what `sdtune data caption --captioner blip` runs
    for path in images:
        with Image.open(path) as im:
            assert path.with_suffix(".txt").read_text() == blip(im.convert("RGB")) + "\n"
    with pytest.raises(PathRefused, match="does not exist"):
        datasets.caption_dataset(roots, "data", "blip", overwrite=True, model="models/missing")


def test_masks_from_a_manifest_are_previewed(tmp_path):
    write_concept_dataset("teal_heart", tmp_path / "imgs", n=1)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255  # right half trained, left half masked out
    Image.fromarray(mask).save(tmp_path / "imgs" / "mask.png")
    line = {"image": "imgs/0000.png", "caption": "a teal heart", "mask": "imgs/mask.png"}
    (tmp_path / "set.jsonl").write_text(json.dumps(line) + "\n")
    roots = Roots([tmp_path])
    (item,) = datasets.open_dataset(roots, "set.jsonl")
    assert item.mask == (tmp_path / "imgs" / "mask.png").resolve() and not item.editable
    overlay = np.asarray(datasets.mask_overlay(item.image, item.mask)).astype(int)
    original = np.asarray(Image.open(item.image).convert("RGB")).astype(int)
    assert np.array_equal(overlay[:, 40:], original[:, 40:])  # kept area unchanged
    tint = np.array([255, 0, 64])
    closer = np.abs(original[:, :20] - tint).sum(-1) - np.abs(overlay[:, :20] - tint).sum(-1)
    assert closer.min() > 50  # every masked-out pixel is tinted


def pixels_of(path) -> np.ndarray:
    from sdtune.data.images import upright_rgb  # what training sees: alpha over white

    with Image.open(path) as im:
        return np.asarray(upright_rgb(im)).astype(int)


def _tinted(overlay: np.ndarray, original: np.ndarray) -> np.ndarray:
    """Per pixel: True where the overlay moved the colour towards the mask tint."""
    tint = np.array([255, 0, 64])
    return np.abs(original - tint).sum(-1) - np.abs(overlay - tint).sum(-1) > 50


def test_masks_from_the_masks_folder_and_from_png_alpha_are_previewed(tmp_path):
    folder = tmp_path / "data"
    write_concept_dataset("teal_heart", folder, n=3)  # 0000.png .. 0002.png
    (folder / "masks").mkdir()
    half = np.zeros((64, 64), np.uint8)
    half[:, 32:] = 255  # right half trained
    Image.fromarray(half).save(folder / "masks" / "0000.png")
    with Image.open(folder / "0001.png") as im:
        rgba = np.asarray(im.convert("RGBA")).copy()
    rgba[:32, :, 3] = 0  # top half transparent
    Image.fromarray(rgba, mode="RGBA").save(folder / "0001.png")
    roots = Roots([tmp_path])

    plain = {i.image.name: i for i in datasets.open_dataset(roots, "data")}
    assert plain["0000.png"].mask == (folder / "masks" / "0000.png").resolve() and not plain["0000.png"].mask_alpha
    assert plain["0001.png"].mask is None  # alpha is a mask only with data.alpha_mask, as in training
    assert plain["0002.png"].mask is None
    alpha = {i.image.name: i for i in datasets.open_dataset(roots, "data", alpha_mask=True)}
    assert alpha["0000.png"].mask == plain["0000.png"].mask  # a mask file wins over alpha
    assert alpha["0001.png"].mask == (folder / "0001.png").resolve() and alpha["0001.png"].mask_alpha
    assert alpha["0002.png"].mask is None  # no alpha channel: every pixel trains

    item = plain["0000.png"]
    overlay = np.asarray(datasets.mask_overlay(item.image, item.mask, alpha=item.mask_alpha)).astype(int)
    original = pixels_of(item.image)
    assert _tinted(overlay, original)[:, :30].all() and not _tinted(overlay, original)[:, 34:].any()
    item = alpha["0001.png"]
    overlay = np.asarray(datasets.mask_overlay(item.image, item.mask, alpha=item.mask_alpha)).astype(int)
    original = pixels_of(item.image)
    assert _tinted(overlay, original)[:30].all() and not _tinted(overlay, original)[34:].any()


def test_run_views_read_the_run_folder(tmp_path):
    run = tmp_path / "runs" / "r"
    assert views.loss_plot(run) is None
    (run / "samples" / "step-0").mkdir(parents=True)
    (run / "samples" / "step-20").mkdir(parents=True)
    (run / "samples" / "step-5").mkdir(parents=True)  # no grid.png yet: still being written
    for step in (0, 20):
        Image.new("RGB", (8, 8)).save(run / "samples" / f"step-{step}" / "grid.png")
    rows = [{"step": s, "loss": 1.0 / s, "images_per_second": 2.0} for s in range(1, 30)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 30, "lo')
    plot = views.loss_plot(run)
    assert plot is not None and plot.size[0] > 300
    assert [label for _, label in views.preview_gallery(run)] == ["step 20", "step 0"]
    (run / "events.log").write_text("2026-01-01 00:00:00 training textual_inversion from step 0 to 30\n")
    assert "training textual_inversion" in views.log_text(run)
    found = views.results(run)
    assert found.before_label == "before (step 0)" and found.after_label == "after (step 20)"
    assert found.numbers[0][0].startswith("loss")
    with pytest.raises(SdtuneError, match="config.yaml"):
        views.generate_with(run, "a prompt", 0, 1.0, 20)  # no config.yaml


def test_the_event_log_view_shows_sdtune_lines_not_the_debug_lines_of_libraries(tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "events.log").write_text(
        "2026-01-01 00:00:00 debug diffusers.models.modeling_utils: There are modules in UNet2DConditionModel ...\n"
        "2026-01-01 00:00:01 training lora from step 0 to 30, effective batch 2\n"
        "2026-01-01 00:00:02 debug sdtune.third_party: FutureWarning: `torch_dtype` is deprecated\n"
        "2026-01-01 00:00:03 skipped [name] bad.png: not an image\n"
    )
    shown = views.log_text(run).splitlines()
    assert shown == [
        "2026-01-01 00:00:01 training lora from step 0 to 30, effective batch 2",
        "2026-01-01 00:00:03 skipped [name] bad.png: not an image",
    ]
    assert "debug" in (run / "events.log").read_text()  # still in the file for whoever debugs


def test_the_run_status_shows_slow_speeds_as_seconds_per_step(tmp_path):
    from sdtune.ui.jobs import RunStatus

    slow = RunStatus(tmp_path, "r", "lora", "running", step=3, max_steps=500, steps_per_second=0.0806)
    fast = RunStatus(tmp_path, "r", "lora", "running", step=3, max_steps=500, steps_per_second=12.34)
    assert "12.4 s/step" in views.status_markdown(slow) and "0.08" not in views.status_markdown(slow)
    assert "12.3 it/s" in views.status_markdown(fast)
