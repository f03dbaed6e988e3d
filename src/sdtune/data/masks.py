"""Loss masks: per-pixel weights at latent resolution, read from mask images or from PNG alpha.

Where a mask comes from, in order:

1. the entry's own ``mask`` (the ``"mask"`` key of a JSONL manifest line);
2. the folder convention: ``masks/<image stem>.png`` in the image's folder (``photos/a.jpg`` ->
   ``photos/masks/a.png``); a sub-folder, so masks are never listed as training images;
3. with ``data.alpha_mask: true``, the image's own alpha channel (images without one are fully weighted).

A mask is read as greyscale (white = train, black = ignore, grey in between), scaled to the image's size if it
differs, cropped with the same centre square :func:`sdtune.data.images.load_image` takes, and area-averaged onto
the latent grid, so each latent pixel's weight is the share of its pixels that are masked in. ``data.mask_floor``
then lifts the weights: ``floor + (1 - floor) * mask``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from sdtune.core.errors import DataError
from sdtune.data.sources import Entry

MASK_FOLDER = "masks"


def conventional_mask(image: Path) -> Path | None:
    """``masks/<stem>.png`` next to ``image`` if that file exists (the folder convention)."""
    candidate = image.parent / MASK_FOLDER / f"{image.stem}.png"
    return candidate if candidate.is_file() else None


def mask_source(entry: Entry) -> Path | None:
    """The mask file of ``entry``: its own ``mask``, else the folder convention, else ``None``."""
    return entry.mask if entry.mask is not None else conventional_mask(entry.image)


def _upright(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - malformed EXIF: load_image leaves such images as stored too
        return im


def _centre_box(width: int, height: int) -> tuple[float, float, float, float]:
    side = min(width, height)
    return ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)


def to_grid(mask: Image.Image, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """A mask (any mode) on the ``(h, w)`` latent ``grid``: the image's centre square, area-averaged; ``[1, h, w]``.

    ``image_size`` is the upright ``(width, height)`` of the image the mask belongs to; a mask of another size
    is stretched onto the image first (the crop box is scaled with it).
    """
    width, height = image_size
    grey = mask.convert("L") if mask.mode not in ("L", "F") else mask
    sx, sy = grey.width / width, grey.height / height
    left, top, right, bottom = _centre_box(width, height)
    box = (left * sx, top * sy, right * sx, bottom * sy)
    h, w = grid
    small = grey.convert("F").resize((w, h), Image.Resampling.BOX, box=box)
    arr = np.asarray(small, dtype=np.float32) / 255.0
    return torch.from_numpy(np.clip(arr, 0.0, 1.0).copy())[None]


def read_mask(path: Path, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """The mask file ``path`` on the latent grid (see :func:`to_grid`); unreadable files are one-line errors."""
    try:
        with Image.open(path) as opened:
            im = _upright(opened)
            im.load()
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise DataError(f"{path}: cannot read the mask ({exc}); re-save it as a greyscale PNG or remove it") from None
    return to_grid(im, image_size, grid)


def alpha_of(path: Path, grid: tuple[int, int]) -> torch.Tensor:
    """The alpha channel of the image ``path`` on the latent grid; all ones when it has none."""
    with Image.open(path) as opened:
        im = _upright(opened)
        has_alpha = im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info
        if not has_alpha:
            return torch.ones(1, *grid)
        alpha = im.convert("RGBA").getchannel("A")
    return to_grid(alpha, im.size, grid)


def loss_weights(
    entries: Sequence[Entry], grid: tuple[int, int], alpha_mask: bool = False, floor: float = 0.0
) -> torch.Tensor | None:
    """Per-pixel loss weights ``[N, 1, h, w]`` of ``entries`` (one row per entry), or ``None`` when none of them
    has a mask and ``alpha_mask`` is off (then the loss is unweighted and nothing is stored)."""
    from sdtune.data.prep import image_size  # header read, EXIF-aware: the size load_image crops

    sources = [mask_source(e) for e in entries]
    if not alpha_mask and all(s is None for s in sources):
        return None
    rows = []
    for entry, source in zip(entries, sources, strict=True):
        if source is not None:
            rows.append(read_mask(source, image_size(entry.image), grid))
        elif alpha_mask:
            rows.append(alpha_of(entry.image, grid))
        else:
            rows.append(torch.ones(1, *grid))
    weights = torch.stack(rows)
    return floor + (1.0 - floor) * weights if floor else weights
