"""Dataset prep on real files: the source is never touched, outputs are sized, cropped and captioned as asked."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdtune.cli.main import app
from sdtune.core.errors import DataError
from sdtune.data.buckets import Bucket, BucketOptions, crop_box
from sdtune.data.prep import MANIFEST, ColorJitter, PrepOptions, fit_to_bucket, focal_center, prep_folder, tile_grid

RES = 128
SMALL = BucketOptions(resolution=RES, step=32)  # buckets 64..256 px: fast tests


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def smooth(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth colour gradient (procedural, compresses well, no detail anywhere)."""
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    base = np.array([40 + seed * 10, 90, 160])[None, None, :]
    arr = base + 60 * x + 40 * y
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def roughness(im: Image.Image) -> float:
    """Mean absolute difference of horizontally neighbouring grey pixels: ~0 for a gradient, large for noise."""
    grey = np.asarray(im.convert("L"), dtype=np.float64)
    return float(np.abs(np.diff(grey, axis=1)).mean())


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: name -> (sha256, permission bits)."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A small mixed folder: sizes, modes, an EXIF-rotated JPEG, captions, a broken file."""
    folder = tmp_path / "src"
    folder.mkdir()
    smooth(300, 200).save(folder / "wide.png")
    (folder / "wide.txt").write_bytes(b"red car, street\r\n")
    smooth(90, 300, 1).save(folder / "tall.jpg")
    smooth(150, 150, 2).convert("L").save(folder / "grey.png")
    rgba = smooth(160, 120, 3).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "alpha.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.md").write_text("not an image")
    return folder


def test_source_folder_is_never_modified(src: Path, tmp_path: Path) -> None:
    before = snapshot(src)
    options = PrepOptions(size=SMALL, buckets=True, flip=True, color_copies=2, split_factor=1.0, crop="entropy")
    report = prep_folder(src, tmp_path / "out", options)
    assert snapshot(src) == before
    assert report.images > 0 and [s.path.name for s in report.skipped] == ["broken.jpg"]


def test_buckets_flip_and_captions(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = prep_folder(src, out, PrepOptions(size=SMALL, buckets=True, flip=True))
    assert (report.sources, report.images, report.flipped) == (4, 8, 4)
    assert sum(report.buckets.values()) == 8
    for name in ("wide", "tall", "grey", "alpha"):
        for stem in (name, f"{name}-flip"):
            with Image.open(out / f"{stem}.png") as im:
                assert im.mode == "RGB"
                assert im.width % 32 == 0 and im.height % 32 == 0 and im.width * im.height <= RES * RES
    with Image.open(out / "wide.png") as im:
        assert im.width > im.height  # 3:2 stays landscape
    with Image.open(out / "tall.png") as im:
        assert im.height > 2 * im.width
    # The caption is copied byte for byte, also next to the flipped copy.
    assert (out / "wide.txt").read_bytes() == b"red car, street\r\n"
    assert (out / "wide-flip.txt").read_bytes() == b"red car, street\r\n"
    # No sidecar in the source: the base output keeps the file-name caption; the flipped copy gets it written out.
    assert not (out / "tall.txt").exists()
    assert (out / "tall-flip.txt").read_text() == "tall"
    with Image.open(out / "wide.png") as a, Image.open(out / "wide-flip.png") as b:
        assert np.array_equal(np.asarray(a)[:, ::-1], np.asarray(b))
    manifest = json.loads((out / MANIFEST).read_text())["files"]
    assert set(manifest) == {p.name for p in out.iterdir() if p.name != MANIFEST}
    assert all(hashlib.sha256((out / n).read_bytes()).hexdigest() == h for n, h in manifest.items())


def test_square_mode_exif_and_alpha(src: Path, tmp_path: Path) -> None:
    # Stored 200x100: left half red, right half blue; EXIF orientation 6 shows it rotated 90° clockwise, so the
    # upright image is 100x200 with red on top.
    stored = Image.new("RGB", (200, 100), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 100, 100))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(src / "phone.jpg", exif=exif, quality=95)
    out = tmp_path / "out"
    prep_folder(src, out, PrepOptions(size=SMALL, buckets=True))
    with Image.open(out / "phone.png") as im:
        assert im.height > im.width  # upright: portrait
        arr = np.asarray(im).astype(int)
    assert arr[5, im.width // 2, 0] > 200 and arr[5, im.width // 2, 2] < 60  # red at the top
    assert arr[-5, im.width // 2, 2] > 200 and arr[-5, im.width // 2, 0] < 60  # blue at the bottom

    square = tmp_path / "square"
    prep_folder(src, square, PrepOptions(size=SMALL))
    for path in square.glob("*.png"):
        with Image.open(path) as im:
            assert im.size == (RES, RES) and im.mode == "RGB"
    with Image.open(square / "alpha.png") as im:
        # 50 % alpha over white: lighter than the opaque colour, never black.
        assert np.asarray(im).min() > 100


def detail_object_image() -> tuple[Image.Image, tuple[int, int, int, int]]:
    """768x256: a smooth gradient with a 100x100 noise patch near the right edge; returns it and the patch box."""
    im = smooth(768, 256)
    box = (620, 70, 720, 170)
    im.paste(noise(100, 100, seed=5), box[:2])
    return im, box


@pytest.mark.parametrize("mode", ["entropy", "edges"])
def test_focal_crop_keeps_an_off_centre_detailed_object(mode: str) -> None:
    im, (x0, y0, x1, y1) = detail_object_image()
    bucket = Bucket(RES, RES)
    focal = crop_box(im.width, im.height, bucket, focal_center(im, bucket, mode))
    centre = crop_box(im.width, im.height, bucket)
    assert focal[0] <= x0 and x1 <= focal[2] and focal[1] <= y0 and y1 <= focal[3]  # the object lies inside
    assert not (centre[0] <= x0 and x1 <= centre[2])  # a centre crop cuts it
    # And in the pixels: the focal crop holds the noisy patch, the centre crop only the smooth gradient.
    assert roughness(fit_to_bucket(im, bucket, focal_center(im, bucket, mode))) > 2
    assert roughness(fit_to_bucket(im, bucket)) < 0.5


@pytest.mark.parametrize("mode", ["entropy", "edges"])
def test_focal_crop_without_detail_is_centred(mode: str) -> None:
    flat = Image.new("RGB", (512, 128), (90, 120, 30))
    assert focal_center(flat, Bucket(128, 128), mode) == (0.5, 0.5)


def test_focal_crop_through_prep(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    detail_object_image()[0].save(src / "object.png")
    prep_folder(src, tmp_path / "focal", PrepOptions(size=SMALL, crop="entropy"))
    prep_folder(src, tmp_path / "centre", PrepOptions(size=SMALL, crop="center"))
    with Image.open(tmp_path / "focal" / "object.png") as f, Image.open(tmp_path / "centre" / "object.png") as c:
        assert roughness(f) > 2 and roughness(c) < 0.5


def test_random_crop_and_colour_jitter_are_seeded(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    noise(512, 128).save(src / "strip.png")
    outputs = {}
    for seed in (0, 0, 1, 2, 3):
        out = tmp_path / f"out{len(outputs)}-{seed}"
        prep_folder(src, out, PrepOptions(size=SMALL, crop="random", seed=seed, color_copies=1))
        outputs.setdefault(seed, []).append(snapshot(out))
    assert outputs[0][0] == outputs[0][1]  # same seed: same bytes
    crops = {snap["strip.png"][0] for runs in outputs.values() for snap in runs}
    assert len(crops) >= 3  # different seeds: different crops
    out = tmp_path / "out0-0"
    with Image.open(out / "strip.png") as base, Image.open(out / "strip-color1.png") as jittered:
        assert base.size == jittered.size and not np.array_equal(np.asarray(base), np.asarray(jittered))


def test_colour_jitter_ranges() -> None:
    im = smooth(64, 64)
    assert np.array_equal(np.asarray(ColorJitter(0, 0, 0, 0).apply(im, random.Random(0))), np.asarray(im))
    red = Image.new("RGB", (8, 8), (200, 30, 30))
    shifted = np.asarray(ColorJitter(0, 0, 0, 0.5).apply(red, random.Random(3))).astype(int)
    assert abs(shifted[0, 0] - np.array([200, 30, 30])).max() > 40  # a hue turn moves red elsewhere
    a = ColorJitter().apply(im, random.Random(9))
    b = ColorJitter().apply(im, random.Random(9))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(DataError, match="brightness: jitter must be in"):
        ColorJitter(brightness=1.5)


def test_oversized_images_are_split_into_tiles(tmp_path: Path) -> None:
    assert tile_grid(1000, 600, 128, 2.0) == (4, 3)
    assert tile_grid(1000, 200, 128, 2.0) == (1, 1)  # only one side is large: buckets handle that
    assert tile_grid(1000, 600, 128, 0.0) == (1, 1)
    src = tmp_path / "src"
    src.mkdir()
    smooth(1000, 600).save(src / "big.png")
    (src / "big.txt").write_text("mountain")
    out = tmp_path / "out"
    report = prep_folder(src, out, PrepOptions(size=SMALL, buckets=True, split_factor=2.0))
    assert report.tiles == 12 and report.images == 12
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == sorted(f"big-r{j}c{i}.png" for j in range(3) for i in range(4))
    assert all((out / f"big-r{j}c{i}.txt").read_text() == "mountain" for j in range(3) for i in range(4))
    for path in out.glob("*.png"):
        with Image.open(path) as im:
            assert im.size == (128, 128)  # 250x200 tiles, nearest bucket at 128² with step 32


def test_same_stem_sources_get_distinct_names(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    smooth(100, 100).save(src / "a.png")
    smooth(100, 100, 3).save(src / "a.jpg")
    (src / "a.txt").write_text("shared")
    out = tmp_path / "out"
    prep_folder(src, out, PrepOptions(size=SMALL))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST, "a-jpg.png", "a-jpg.txt", "a-png.png", "a-png.txt"]
    )


@pytest.mark.parametrize(
    ("where", "message"),
    [("same", "is the source folder"), ("inside", "is inside the source folder")],
)
def test_refuses_to_write_into_the_source(src: Path, where: str, message: str) -> None:
    before = snapshot(src)
    out = src if where == "same" else src / "prepared"
    with pytest.raises(DataError, match=message) as info:
        prep_folder(src, out, PrepOptions(size=SMALL, overwrite=True))
    assert "\n" not in str(info.value)
    assert snapshot(src) == before and not (src / "prepared").exists()


def test_non_empty_output_needs_overwrite_which_spares_other_files(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.md").write_text("keep me")
    with pytest.raises(DataError, match="is not empty; choose a new output folder, or add --overwrite"):
        prep_folder(src, out, PrepOptions(size=SMALL))
    assert [p.name for p in out.iterdir()] == ["mine.md"]

    prep_folder(src, out, PrepOptions(size=SMALL, flip=True, overwrite=True))
    assert (out / "wide-flip.png").exists()
    report = prep_folder(src, out, PrepOptions(size=SMALL, overwrite=True))  # flips no longer wanted
    assert not (out / "wide-flip.png").exists() and not (out / "wide-flip.txt").exists()
    assert report.removed == 8
    assert (out / "mine.md").read_text() == "keep me"

    # A file sdtune wrote and the user then edited is not overwritten.
    (out / "wide.txt").write_text("my careful edit")
    with pytest.raises(DataError, match="wide.txt: was changed after sdtune wrote it"):
        prep_folder(src, out, PrepOptions(size=SMALL, overwrite=True))
    assert (out / "wide.txt").read_text() == "my careful edit"


def test_overwrite_never_replaces_a_file_sdtune_did_not_write(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "wide.png").write_bytes(b"the user's own file")
    with pytest.raises(DataError, match="wide.png: exists and was not written by sdtune prep"):
        prep_folder(src, out, PrepOptions(size=SMALL, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["wide.png"]  # nothing written, not even the manifest
    assert (out / "wide.png").read_bytes() == b"the user's own file"


def test_cli_prep_and_buckets(src: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    before = snapshot(src)
    out = tmp_path / "out"
    args = ["data", "prep", str(src), str(out), "--resolution", "128", "--step", "32", "--buckets", "--flip"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "4 source images -> 8 images" in result.output and "1 skipped" in result.output
    assert "skipped broken.jpg" in result.output
    assert "images per bucket" in result.output and "160x96" in result.output
    assert snapshot(src) == before

    again = runner.invoke(app, args)  # OUT is no longer empty
    assert isinstance(again.exception, DataError) and "--overwrite" in str(again.exception)
    inside = runner.invoke(app, ["data", "prep", str(src), str(src / "x")])
    assert isinstance(inside.exception, DataError) and "inside the source folder" in str(inside.exception)

    shown = runner.invoke(app, ["data", "buckets", str(src), "--resolution", "128", "--step", "32"])
    assert shown.exit_code == 0, shown.output
    assert "4 images" in shown.output and "worst aspect error" in shown.output
    assert snapshot(src) == before
