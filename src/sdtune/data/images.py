"""Finding and loading training images.

:func:`scan_images` decodes every image once up front so that a broken file is reported (and skipped)
before training starts instead of crashing step 800. :func:`load_image` turns any image Pillow can read
into the square ``[-1, 1]`` tensor the VAE expects.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from sdtune.core.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Preview images that a training run writes are PNGs; they must never be trained on if the output folder
# happens to be the dataset folder.
_PREVIEW_SUFFIX = ".preview.png"


@dataclass(frozen=True)
class Skipped:
    """An image file that was left out of the dataset, and why (e.g. ``"truncated file"``)."""

    path: Path
    reason: str


def _is_candidate(path: Path) -> bool:
    name = path.name.lower()
    return path.suffix.lower() in IMAGE_SUFFIXES and not name.endswith(_PREVIEW_SUFFIX)


def is_hidden(path: Path) -> bool:
    """Dot files (macOS ``._name.png`` resource forks, editors' backups) are never training data."""
    return path.name.startswith(".")


def decode_failure(exc: BaseException) -> str:
    """The short reason :func:`scan_images` gives when opening or decoding an image raised ``exc``.

    Shared with the dataset check (``sdtune data check``) so that it states exactly what training will do.
    """
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    if isinstance(exc, Image.DecompressionBombError):
        return "too many pixels to decode safely"
    if isinstance(exc, OSError):
        # errno is set for file-system problems (permissions, I/O errors); Pillow's decode errors have none.
        if exc.errno is not None:
            return f"unreadable: {exc.strerror or exc}"
        if "truncated" in str(exc).lower():
            return "truncated file"
        return f"corrupt image: {exc}"
    if isinstance(exc, EOFError):
        return "truncated file"
    # Pillow plugins raise SyntaxError, ValueError, struct.error...
    return f"corrupt image: {type(exc).__name__}: {exc}"


def _decode_problem(path: Path) -> str | None:
    """Fully decode ``path``; return a short reason if that fails, else ``None``."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as im:
            im.load()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a reason; see decode_failure
        return decode_failure(exc)
    return None


def list_candidates(folder: str | Path) -> tuple[list[Path], list[Skipped]]:
    """The image files directly in ``folder`` that training considers (sorted by name), without decoding them.

    Candidates have a suffix in :data:`IMAGE_SUFFIXES` (any case) and are not folders or ``*.preview.png``.
    Hidden candidates (``.name.png``) are returned as :class:`Skipped`. Raises :class:`DataError` if the
    folder is missing or cannot be listed; an empty result is not an error here.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: no such dataset folder; set data.path to a folder of images")
    if not folder.is_dir():
        raise DataError(f"{folder}: is a file, not a folder; set data.path to a folder of images")
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise DataError(f"{folder}: cannot list the folder ({exc.strerror}); check its permissions") from None
    candidates = [p for p in entries if _is_candidate(p) and not p.is_dir()]
    hidden = [Skipped(p, "hidden file") for p in candidates if is_hidden(p)]
    return [p for p in candidates if not is_hidden(p)], hidden


def decode_all(paths: list[Path]) -> tuple[list[Path], list[Skipped]]:
    """Fully decode each of ``paths`` once: the decodable ones, and the others as :class:`Skipped`."""
    good: list[Path] = []
    skipped: list[Skipped] = []
    for path in paths:
        reason = _decode_problem(path)
        if reason is None:
            good.append(path)
        else:
            skipped.append(Skipped(path, reason))
    return good, skipped


def scan_images(folder: str | Path) -> tuple[list[Path], list[Skipped]]:
    """Return the decodable images directly in ``folder`` (sorted by name) and the skipped ones.

    Only files with a suffix in :data:`IMAGE_SUFFIXES` are considered (sub-folders, caption ``.txt`` files
    and ``*.preview.png`` are ignored; hidden files are skipped). Each is fully decoded once; failures
    become :class:`Skipped` with a short reason rather than an error, as A1111 and kohya also train on what
    is readable. Raises :class:`DataError` if the folder is missing, holds no images, or none of them decodes.
    """
    folder = Path(folder)
    candidates, hidden = list_candidates(folder)
    if not candidates:
        kinds = ", ".join(IMAGE_SUFFIXES)
        raise DataError(f"{folder}: no images found ({kinds}); put training images there")
    good, skipped = decode_all(candidates)
    if not good:
        first = skipped[0]
        raise DataError(
            f"{folder}: none of the {len(skipped)} images could be decoded, e.g. {first.path.name}: {first.reason}"
        )
    return good, sorted(hidden + skipped, key=lambda s: s.path.name)


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """Grey images with more than 8 bits (``I;16*``, ``I``, ``F``) scaled to 8 bits.

    Pillow's own ``convert("L")`` clips these at 255 instead of scaling, which turns most 16-bit PNGs white.
    """
    arr = np.asarray(im).astype(np.float64)
    if im.mode.startswith("I;16"):
        arr = arr / 257.0
    elif im.mode == "F":
        # Float images are either 0..1 or 0..255; values beyond 1 mean the latter.
        arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
    elif arr.size and arr.max() > 255:  # mode "I" holding 16-bit data (older Pillow opens 16-bit PNGs so)
        arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """CMYK to RGB through the embedded ICC profile when there is one (print files usually have one)."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms  # needs littleCMS, which some Pillow builds lack

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            out = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            if out is not None:
                return out
        except Exception:  # noqa: BLE001 - no littleCMS or a broken profile: the naive formula below still works
            pass
    return im.convert("RGB")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow image to 8-bit RGB; transparent parts become white (as A1111's preprocessing does)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        im = _high_bit_depth_to_l(im)
    if im.mode == "CMYK":
        return _cmyk_to_rgb(im)
    has_alpha = im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _exif_upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block leaves the image as stored rather than failing."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - Pillow's EXIF parser raises struct.error, TypeError, KeyError...
        return im


def upright_rgb(im: Image.Image) -> Image.Image:
    """What training makes of a decoded image before scaling: EXIF orientation applied, then 8-bit RGB."""
    return _to_rgb(_exif_upright(im))


def load_image(path: Path, size: int | tuple[int, int]) -> torch.Tensor:
    """Load ``path`` as a float32 ``[3, H, W]`` tensor in ``[-1, 1]``; ``size`` is a square side or ``(W, H)``.

    Applies the EXIF orientation (phone photos), converts to RGB (alpha over white), scales so the image covers
    the size (Lanczos when shrinking, bicubic when enlarging) and crops the centre, like A1111's and kohya's default
    centre crop; for an aspect-ratio bucket ``(W, H)`` the crop is the largest centred box of the bucket's aspect
    (:func:`sdtune.data.buckets.crop_box`).
    """
    from sdtune.data.buckets import Bucket, crop_box

    width_out, height_out = (size, size) if isinstance(size, int) else size
    if width_out < 1 or height_out < 1:
        raise ValueError(f"size must be positive, got {size}")
    path = Path(path)
    try:
        with Image.open(path) as opened:
            im = upright_rgb(opened)
            im.load()
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise DataError(f"{path}: cannot load the image ({exc}); remove it or re-save it as PNG") from None
    w, h = im.size
    # Crop and resize in one step: `box` is in source pixels, so the crop is exactly centred even when the
    # scaled size would not be a whole number of pixels.
    box = crop_box(w, h, Bucket(width_out, height_out))
    if (box[2] - box[0], box[3] - box[1]) == (width_out, height_out):
        # Nothing to scale: crop whole pixels, since a half-pixel box would resample and blur.
        left, top = (w - width_out) // 2, (h - height_out) // 2
        out = im.crop((left, top, left + width_out, top + height_out))
    else:
        resample = Image.Resampling.LANCZOS if box[2] - box[0] > width_out else Image.Resampling.BICUBIC
        out = im.resize((width_out, height_out), resample=resample, box=box)
    arr = np.asarray(out, dtype=np.uint8)
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32)
    return (tensor / 127.5 - 1.0).contiguous()
