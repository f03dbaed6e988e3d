"""Loss masks: per-pixel weights at latent resolution, read from mask images or from PNG alpha.

Where a mask comes from, in order:

1. the entry's own ``mask`` (the ``"mask"`` key of a JSONL manifest line);
2. the folder convention: ``masks/<image stem>.png`` in the image's folder (``photos/a.jpg`` ->
   ``photos/masks/a.png``); a sub-folder, so masks are never listed as training images;
3. with ``data.alpha_mask: true``, the image's own alpha channel (images without one are fully weighted).

A mask is read as greyscale (white = train, black = ignore, grey in between), scaled to the image's size if it
differs, cropped with the same centred box :func:`sdtune.data.images.load_image` takes (square, or the bucket's
aspect), and area-averaged onto the latent grid, so each latent pixel's weight is the share of its pixels that are
masked in. ``data.mask_floor`` then lifts the weights: ``floor + (1 - floor) * mask``.

:func:`mask_for` is the one answer to "which mask will training use for this image" (the UI's mask preview asks
it too) and :func:`mask_image` reads that mask at full size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from sdtune.core.errors import DataError
from sdtune.data.buckets import Bucket, crop_box
from sdtune.data.sources import Entry

MASK_FOLDER = "masks"


def conventional_mask(image: Path) -> Path | None:
    """``masks/<stem>.png`` next to ``image`` if that file exists (the folder convention)."""
    candidate = image.parent / MASK_FOLDER / f"{image.stem}.png"
    return candidate if candidate.is_file() else None


def mask_source(entry: Entry) -> Path | None:
    """The mask file of ``entry``: its own ``mask``, else the folder convention, else ``None``."""
    return entry.mask if entry.mask is not None else conventional_mask(entry.image)


@dataclass(frozen=True)
class MaskSource:
    """Where an image's loss mask is read from: a mask file, or (``alpha``) the alpha channel of the image itself."""

    path: Path
    alpha: bool = False


def _alpha_in(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info


def has_alpha(image: Path) -> bool:
    """True if the image file has an alpha channel (or a transparent palette colour); reads the header only."""
    try:
        with Image.open(image) as im:
            return _alpha_in(im)
    except (OSError, ValueError, SyntaxError, EOFError):
        return False  # not decodable: training skips the image and reports it by name


def mask_for(entry: Entry, alpha_mask: bool = False) -> MaskSource | None:
    """The mask training uses for ``entry``: its mask file (own, else ``masks/<stem>.png``), else with
    ``alpha_mask`` the image's alpha channel, else ``None`` (every pixel fully weighted)."""
    source = mask_source(entry)
    if source is not None:
        return MaskSource(source)
    if alpha_mask and has_alpha(entry.image):
        return MaskSource(entry.image, alpha=True)
    return None


def _upright(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - malformed EXIF: load_image leaves such images as stored too
        return im


def mask_image(source: MaskSource) -> Image.Image:
    """The mask of ``source`` at its own size, upright (EXIF): the mask file as stored (any mode), or the image's
    alpha channel as ``L`` (all white when it has none). White = trained, black = ignored."""
    try:
        with Image.open(source.path) as opened:
            im = _upright(opened)
            im.load()
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        what = "image" if source.alpha else "mask"
        raise DataError(
            f"{source.path}: cannot read the {what} ({exc}); re-save it as a greyscale PNG or remove it"
        ) from None
    if not source.alpha:
        return im
    if _alpha_in(im):
        return im.convert("RGBA").getchannel("A")
    return Image.new("L", im.size, 255)


def to_grid(mask: Image.Image, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """A mask (any mode) on the ``(h, w)`` latent ``grid``: the part of the image training crops (the centred box of
    the grid's aspect, as :func:`sdtune.data.images.load_image` takes it), area-averaged; ``[1, h, w]``.

    ``image_size`` is the upright ``(width, height)`` of the image the mask belongs to; a mask of another size
    is stretched onto the image first (the crop box is scaled with it).
    """
    width, height = image_size
    grey = mask.convert("L") if mask.mode not in ("L", "F") else mask
    sx, sy = grey.width / width, grey.height / height
    h, w = grid
    left, top, right, bottom = crop_box(width, height, Bucket(w, h))
    box = (left * sx, top * sy, right * sx, bottom * sy)
    small = grey.convert("F").resize((w, h), Image.Resampling.BOX, box=box)
    arr = np.asarray(small, dtype=np.float32) / 255.0
    return torch.from_numpy(np.clip(arr, 0.0, 1.0).copy())[None]


def read_mask(path: Path, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """The mask file ``path`` on the latent grid (see :func:`to_grid`); unreadable files are one-line errors."""
    return to_grid(mask_image(MaskSource(path)), image_size, grid)


def alpha_of(path: Path, grid: tuple[int, int]) -> torch.Tensor:
    """The alpha channel of the image ``path`` on the latent grid; all ones when it has none."""
    alpha = mask_image(MaskSource(path, alpha=True))
    return to_grid(alpha, alpha.size, grid)


def loss_weights(
    entries: Sequence[Entry], grid: tuple[int, int], alpha_mask: bool = False, floor: float = 0.0
) -> torch.Tensor | None:
    """Per-pixel loss weights ``[N, 1, h, w]`` of ``entries`` (one row per entry), or ``None`` when none of them
    has a mask and ``alpha_mask`` is off (then the loss is unweighted and nothing is stored)."""
    from sdtune.data.prep import image_size  # header read, EXIF-aware: the size load_image crops

    sources = [mask_for(e, alpha_mask) for e in entries]
    if not alpha_mask and all(s is None for s in sources):
        return None
    rows = []
    for entry, source in zip(entries, sources, strict=True):
        if source is None:
            rows.append(torch.ones(1, *grid))
        else:
            rows.append(to_grid(mask_image(source), image_size(entry.image), grid))
    weights = torch.stack(rows)
    return floor + (1.0 - floor) * weights if floor else weights
