"""Auto-captioning: sidecar plumbing with a tiny BLIP built in code, exact WD14 tag selection with a tiny ONNX
tagger built in code, and the shapes-world captioner against ground truth."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner_models import VOCAB
from sdtune.core.errors import DataError
from sdtune.data.captioners import (
    BlipCaptioner,
    Tag,
    WD14Tagger,
    caption_folder,
    read_tag_table,
    select_tags,
    wd14_input,
)
from sdtune.tools.captioning import ShapesCaptioner, make_captioner
from sdtune.world.captions import caption as world_caption
from sdtune.world.shapes import random_scene, render


def _images(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# -- BLIP ----------------------------------------------------------------------------------------------------


def test_blip_writes_one_deterministic_caption_per_image_and_respects_existing(tmp_path, tiny_blip):
    images = _images(tmp_path / "a")
    blip = BlipCaptioner(tiny_blip, max_new_tokens=6)
    report = caption_folder(tmp_path / "a", blip, prefix="ohwx")
    sidecars = [p.with_suffix(".txt") for p in images]
    assert report.written == sidecars and all(p.is_file() for p in sidecars)
    texts = [p.read_text() for p in sidecars]
    assert all(t.startswith("ohwx, ") and len(t) > len("ohwx, ") for t in texts)
    words = set(VOCAB[6:])
    assert all(set(t[len("ohwx, ") :].split()) <= words for t in texts)  # decoded words, no special tokens
    # deterministic: the same images elsewhere get the same captions from a freshly loaded model
    copies = _images(tmp_path / "b")
    caption_folder(tmp_path / "b", BlipCaptioner(tiny_blip, max_new_tokens=6), prefix="ohwx")
    assert [p.with_suffix(".txt").read_text() for p in copies] == texts
    # existing captions: an error by default, kept with skip, replaced with overwrite
    sidecars[0].write_text("hand written")
    sidecars[1].unlink()
    with pytest.raises(DataError, match="--skip-existing"):
        caption_folder(tmp_path / "a", blip)
    report = caption_folder(tmp_path / "a", blip, existing="skip", prefix="ohwx")
    assert report.kept == [images[0], images[2]] and report.written == [sidecars[1]]
    assert sidecars[0].read_text() == "hand written" and sidecars[1].read_text() == texts[1]
    caption_folder(tmp_path / "a", blip, existing="overwrite", prefix="ohwx")
    assert sidecars[0].read_text() == texts[0]
    assert [p.read_bytes() for p in images] == [p.read_bytes() for p in copies]  # images never touched


def test_missing_model_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="--model"):
        make_captioner("blip", tmp_path / "nope")
    with pytest.raises(DataError, match="needs a local model folder"):
        make_captioner("wd14", None)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.onnx").write_bytes(b"")
    with pytest.raises(DataError, match="selected_tags.csv"):
        make_captioner("wd14", tmp_path / "half")


# -- WD14 ------------------------------------------------------------------------------------------------------


def test_wd14_selects_thresholds_orders_and_spells_tags_exactly(tmp_path, tiny_tagger):
    tagger = WD14Tagger(tiny_tagger)
    assert tagger.side == 8  # read from the model's input shape
    solid = Image.new("RGB", (8, 8), (10, 100, 204))  # R 10, G 100, B 204
    # characters first (0.85), then general tags (0.35) by falling score; rating never; kaomoji kept
    assert tagger(solid) == "hatsune miku, blue sky, long hair, green hair, ^_^"
    folder = tmp_path / "imgs"
    folder.mkdir()
    solid.save(folder / "x.png")
    caption_folder(folder, tagger)
    assert (folder / "x.txt").read_text() == "hatsune miku, blue sky, long hair, green hair, ^_^"
    # lower thresholds let more in, in the same order rule
    loose = WD14Tagger(tiny_tagger, threshold=0.1, character_threshold=0.5)
    assert loose(solid) == "hatsune miku, kagamine rin, blue sky, long hair, green hair, ^_^, smile"


def test_wd14_input_is_white_padded_bgr_in_0_255(tiny_tagger):
    wide = Image.new("RGB", (8, 4), (0, 0, 0))  # black band, white padding above and below
    arr = wd14_input(wide, 8)
    assert arr.shape == (8, 8, 3) and arr.dtype == np.float32
    assert (arr[:2] == 255).all() and (arr[2:6] == 0).all() and (arr[6:] == 255).all()
    bgr = wd14_input(Image.new("RGB", (8, 8), (10, 100, 204)), 8)
    assert bgr[0, 0].tolist() == [204.0, 100.0, 10.0]
    clear = wd14_input(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), 8)
    assert (clear == 255).all()  # transparency over white
    probs = WD14Tagger(tiny_tagger).probabilities(wide)
    np.testing.assert_allclose(probs[[2, 3, 8]], 0.5, atol=1e-6)


def test_select_tags_edges():
    tags = [Tag("a", 0), Tag("b", 0), Tag("c", 4), Tag("r", 9)]
    assert select_tags([0.25, 0.25000001, 0.9, 1.0], tags, 0.25, 0.85) == ["c", "b"]  # strictly above
    assert select_tags([0.5, 0.5, 0.1, 1.0], tags, 0.35, 0.85) == ["a", "b"]  # ties keep table order
    with pytest.raises(DataError, match="4 rows"):
        select_tags([0.5], tags, 0.35, 0.85)


def test_tag_table_needs_name_and_category(tmp_path):
    bad = tmp_path / "selected_tags.csv"
    bad.write_text("tag_id,tag\n1,x\n")
    with pytest.raises(DataError, match="name and category"):
        read_tag_table(bad)


# -- shapes world ----------------------------------------------------------------------------------------------


def test_shapes_captioner_gives_the_ground_truth_caption(tmp_path):
    rng = np.random.default_rng(11)
    scenes = [random_scene(rng) for _ in range(100)]
    for i, scene in enumerate(scenes):
        render(scene).save(tmp_path / f"s{i:03d}.png")
    report = caption_folder(tmp_path, ShapesCaptioner())
    got = [(tmp_path / f"s{i:03d}.txt") for i in range(100)]
    exact = sum(p.is_file() and p.read_text() == world_caption(s) for p, s in zip(got, scenes, strict=True))
    assert exact >= 98, f"{exact}/100 exact; uncaptioned {report.uncaptioned}"


def test_cli_caption_command(tmp_path):
    for i, scene in enumerate([random_scene(np.random.default_rng(s)) for s in range(2)]):
        render(scene).save(tmp_path / f"{i}.png")

    def sdtune(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "sdtune.cli.main", "data", "caption", str(tmp_path), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    first = sdtune("--captioner", "shapes", "--prefix", "shp")
    assert first.returncode == 0, first.stderr
    assert "2 captions written" in first.stdout and (tmp_path / "0.txt").read_text().startswith("shp, a ")
    again = sdtune("--captioner", "shapes")
    assert again.returncode == 2 and "--skip-existing" in again.stderr and "Traceback" not in again.stderr
