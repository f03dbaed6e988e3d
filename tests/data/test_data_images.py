"""Scanning a dataset folder (bad files skipped with reasons) and loading images as VAE-ready tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.core.errors import DataError
from sdtune.data import IMAGE_SUFFIXES, Skipped, load_image, scan_images


def _noise_image(size: int = 32, seed: int = 0) -> Image.Image:
    # Noise does not compress, so cutting the file in half really truncates pixel data.
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _png_bytes(path: Path, seed: int = 0) -> bytes:
    _noise_image(seed=seed).save(path)
    return path.read_bytes()


def test_scan_skips_bad_files_with_reasons(tmp_path: Path) -> None:
    _noise_image(seed=1).save(tmp_path / "b_good.png")
    _noise_image(seed=2).save(tmp_path / "a_good.JPG", format="JPEG")
    _noise_image(seed=3).save(tmp_path / "c_good.webp", format="WEBP")
    data = _png_bytes(tmp_path / "d_truncated.png", seed=4)
    (tmp_path / "d_truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "e_text.png").write_text("this is not a picture\n")
    (tmp_path / "f_empty.jpg").write_bytes(b"")
    (tmp_path / "b_good.txt").write_text("a caption")  # not an image suffix: ignored, not skipped
    _noise_image(seed=5).save(tmp_path / "step_100.preview.png")  # training previews are never data
    (tmp_path / "sub.png").mkdir()  # a folder with an image suffix is not a candidate

    good, skipped = scan_images(tmp_path)

    assert [p.name for p in good] == ["a_good.JPG", "b_good.png", "c_good.webp"]
    assert skipped == [
        Skipped(tmp_path / "d_truncated.png", "truncated file"),
        Skipped(tmp_path / "e_text.png", "not an image"),
        Skipped(tmp_path / "f_empty.jpg", "empty file"),
    ]


def test_scan_accepts_str_and_is_not_recursive(tmp_path: Path) -> None:
    (tmp_path / "nested").mkdir()
    _noise_image().save(tmp_path / "nested" / "deep.png")
    _noise_image().save(tmp_path / "top.bmp")
    good, skipped = scan_images(str(tmp_path))
    assert good == [tmp_path / "top.bmp"] and skipped == []


def test_scan_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no such dataset folder; set data.path") as info:
        scan_images(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)


def test_scan_file_instead_of_folder(tmp_path: Path) -> None:
    target = tmp_path / "one.png"
    _noise_image().save(target)
    with pytest.raises(DataError, match=r"not a folder"):
        scan_images(target)


def test_scan_no_images(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hi")
    _noise_image().save(tmp_path / "x.preview.png")
    with pytest.raises(DataError) as info:
        scan_images(tmp_path)
    message = str(info.value)
    assert "no images found" in message and ".webp" in message and "put training images there" in message
    assert "\n" not in message


def test_scan_all_images_broken(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_text("nope")
    (tmp_path / "b.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"none of the 2 images could be decoded, e.g. a.png: not an image"):
        scan_images(tmp_path)


def test_suffixes_are_the_documented_ones() -> None:
    assert IMAGE_SUFFIXES == (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _pixel(t: torch.Tensor, y: int, x: int) -> list[float]:
    return [round(v, 2) for v in t[:, y, x].tolist()]


def test_load_image_shape_range_and_values(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.new("RGB", (40, 40), (255, 0, 128)).save(path)
    t = load_image(path, 16)
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    assert t.min() >= -1.0 and t.max() <= 1.0
    assert _pixel(t, 8, 8) == [1.0, -1.0, round(128 / 127.5 - 1, 2)]
    noisy = load_image(_save(tmp_path / "n.png", _noise_image(48)), 20)  # downscale of real detail stays in range
    assert noisy.shape == (3, 20, 20) and noisy.min() >= -1.0 and noisy.max() <= 1.0


def _save(path: Path, im: Image.Image, **kwargs: object) -> Path:
    im.save(path, **kwargs)
    return path


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored image: top half red, bottom half blue. Orientation 6 means "rotate 90 degrees clockwise to
    # display", so the displayed image has red on the right and blue on the left.
    im = Image.new("RGB", (32, 32), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 32, 16))
    exif = im.getexif()
    exif[0x0112] = 6
    path = _save(tmp_path / "phone.jpg", im, exif=exif, quality=95)
    t = load_image(path, 32)
    left, right = t[:, 16, 3], t[:, 16, 28]
    assert right[0] > 0.8 and right[2] < -0.8, "red should be on the right"
    assert left[2] > 0.8 and left[0] < -0.8, "blue should be on the left"
    # Without the tag the same pixels are top/bottom: proves the tag (not the pixels) caused the rotation.
    plain = load_image(_save(tmp_path / "plain.jpg", im, quality=95), 32)
    assert plain[0, 3, 16] > 0.8 and plain[2, 28, 16] > 0.8


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    im = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # fully transparent black
    im.paste((255, 0, 0, 255), (0, 0, 8, 16))  # opaque red left half
    t = load_image(_save(tmp_path / "alpha.png", im), 16)
    assert _pixel(t, 8, 12) == [1.0, 1.0, 1.0]  # transparent -> white, not black
    assert _pixel(t, 8, 2) == [1.0, -1.0, -1.0]


def test_la_and_palette_with_transparency(tmp_path: Path) -> None:
    la = Image.new("LA", (8, 8), (0, 0))
    assert _pixel(load_image(_save(tmp_path / "la.png", la), 8), 4, 4) == [1.0, 1.0, 1.0]
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 255, 0, 10, 20, 30])
    pal.putpixel((0, 0), 1)
    path = _save(tmp_path / "pal.png", pal, transparency=1)
    t = load_image(path, 8)
    assert _pixel(t, 4, 4) == [-1.0, 1.0, -1.0]  # palette entry 0 is green
    assert _pixel(t, 0, 0) == [1.0, 1.0, 1.0]  # the transparent entry is white


def test_palette_cmyk_and_16_bit_load(tmp_path: Path) -> None:
    pal = Image.new("RGB", (12, 12), (200, 40, 40)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    t = load_image(_save(tmp_path / "pal.gif.png", pal), 12)
    assert t.shape == (3, 12, 12) and t[0].mean() > 0.4 and t[1].mean() < -0.5

    cmyk = Image.new("CMYK", (12, 12), (0, 255, 255, 0))  # pure red in CMYK
    t = load_image(_save(tmp_path / "cmyk.jpg", cmyk, quality=95), 12)
    assert t[0].mean() > 0.8 and t[1].mean() < -0.8 and t[2].mean() < -0.8

    grey16 = Image.fromarray(np.full((12, 12), 32768, dtype=np.uint16))
    assert grey16.mode == "I;16"
    t = load_image(_save(tmp_path / "deep.png", grey16), 12)
    # 32768/65535 is mid grey: ~0 in [-1, 1]. Pillow's own convert("L") would clip it to white (1.0).
    assert t.abs().max() < 0.02


def test_non_square_is_centre_cropped(tmp_path: Path) -> None:
    # 96x32: red | green | blue in thirds. The centre crop keeps only the green middle.
    im = Image.new("RGB", (96, 32), (255, 0, 0))
    im.paste((0, 255, 0), (32, 0, 64, 32))
    im.paste((0, 0, 255), (64, 0, 96, 32))
    t = load_image(_save(tmp_path / "wide.png", im), 16)
    assert t.shape == (3, 16, 16)
    # Lanczos reads a little past the crop edge, hence the tolerance in the edge columns.
    assert t[1].min() > 0.8 and t[0].max() < -0.8 and t[2].max() < -0.8
    assert t[1, :, 2:-2].min() > 0.99

    # Left half red, right half blue, 64x16: crop 16 px wide in the middle keeps both halves equally.
    im = Image.new("RGB", (64, 16), (255, 0, 0))
    im.paste((0, 0, 255), (32, 0, 64, 16))
    t = load_image(_save(tmp_path / "halves.png", im), 8)
    red_cols = int((t[0, 4] > 0).sum())
    blue_cols = int((t[2, 4] > 0).sum())
    assert red_cols == blue_cols == 4
    assert torch.allclose(t[0], t[2].flip(-1), atol=0.02)  # mirror-symmetric: exactly centred


def test_tall_upscale_uses_shorter_side(tmp_path: Path) -> None:
    im = Image.new("RGB", (8, 24), (0, 0, 0))
    im.paste((255, 255, 255), (0, 8, 8, 16))  # white middle band: the centre crop of a tall image
    t = load_image(_save(tmp_path / "tall.png", im), 32)
    assert t.shape == (3, 32, 32) and t[:, 4:28].min() > 0.9


def test_load_image_unreadable_is_data_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.png"
    path.write_text("nope")
    with pytest.raises(DataError, match=r"bad.png: cannot load the image"):
        load_image(path, 8)


def test_scan_reports_os_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Permission bits do not stop root (CI containers), so simulate the OS error Pillow would see.
    _noise_image().save(tmp_path / "a.png")
    _noise_image().save(tmp_path / "locked.png")
    real_open = Image.open

    def fake_open(fp, *args, **kwargs):
        if Path(fp).name == "locked.png":
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", fake_open)
    good, skipped = scan_images(tmp_path)
    assert good == [tmp_path / "a.png"]
    assert skipped == [Skipped(tmp_path / "locked.png", "unreadable: Permission denied")]
