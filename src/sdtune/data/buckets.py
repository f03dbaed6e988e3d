"""Aspect-ratio buckets: train on non-square images without squashing them or cropping them to squares.

The bucket grid follows kohya-ss sd-scripts (``make_bucket_resolutions``; options ``bucket_reso_steps``,
``min_bucket_reso``, ``max_bucket_reso``, ``bucket_no_upscale``): for each width from ``min_side`` to
``max_side`` in steps of ``step``, the tallest height (a multiple of ``step``, at most ``max_side``) whose area
stays within the target area, in both orientations, plus the largest square. Sides are rounded *down*, so a
bucket's area never exceeds the target area (no rounding allowance is needed).

An image goes to the bucket of nearest aspect ratio, measured as ``|log(bucket_ar / image_ar)|`` so that 2:1 and
1:2 are equally far from 1:1. **Aspect-error bound**: for an image whose aspect lies within the grid's range
(1:4 to 4:1 with the default sides ``resolution/2 .. 2*resolution``), the error is at most half the widest
log-gap between neighbouring buckets, :func:`grid_aspect_error`: 0.152 at 512² with step 64 (about 16 %, the gap
between 256x832 and 320x768), 0.102 at 768², 0.077 at 1024² (figures rounded up).

With ``no_upscale`` every image gets its own bucket instead: the image scaled down (never up) to fit the target
area and ``max_side``, then each side rounded down to a multiple of ``step`` (the candidate among a few with the
least aspect error is used). So the bucket's sides never exceed the image's sides, and its aspect error is below
``log(S / (S - step))`` where ``S`` is the scaled image's shorter side (0.288 for ``S >= 4 * step``), see
:func:`no_upscale_aspect_bound`. The one exception: a side shorter than one step is given one step.

This module is pure arithmetic (no image decoding); :mod:`sdtune.data.prep` applies the buckets to images.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from sdtune.core.errors import DataError


@dataclass(frozen=True, order=True)
class Bucket:
    """A training resolution ``width`` x ``height`` in pixels (both multiples of the bucket step)."""

    width: int
    height: int

    @property
    def aspect(self) -> float:
        """Width over height."""
        return self.width / self.height

    @property
    def area(self) -> int:
        return self.width * self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class BucketOptions:
    """How buckets are made: target area ``resolution``², sides multiples of ``step`` within ``[min_side, max_side]``.

    ``min_side`` / ``max_side`` default to ``resolution / 2`` and ``2 * resolution`` (rounded to the step), which
    spans aspect ratios 1:4 to 4:1. ``no_upscale`` gives each image its own bucket that fits inside it (kohya's
    ``bucket_no_upscale``).
    """

    resolution: int = 512
    step: int = 64
    min_side: int | None = None
    max_side: int | None = None
    no_upscale: bool = False

    def __post_init__(self) -> None:
        if self.step < 8 or self.step % 8:
            raise DataError(f"step: must be a positive multiple of 8, the VAE's factor (got {self.step}); e.g. 64")
        if self.resolution < self.step:
            raise DataError(f"resolution: must be at least the step {self.step} (got {self.resolution}); e.g. 512")
        for name in ("min_side", "max_side"):
            value = getattr(self, name)
            if value is not None and (value < self.step or value % self.step):
                raise DataError(f"{name}: must be a multiple of the step {self.step} (got {value}); e.g. 256")
        if self.lo > self.hi:
            raise DataError(f"min_side: {self.lo} is above max_side {self.hi}; lower min_side or raise max_side")
        if self.lo * self.lo > self.area:
            raise DataError(
                f"min_side: {self.lo}x{self.lo} is larger than the target area {self.resolution}²; "
                f"use at most {math.isqrt(self.area) // self.step * self.step}"
            )

    @property
    def area(self) -> int:
        """The target area in pixels (``resolution²``)."""
        return self.resolution * self.resolution

    @property
    def lo(self) -> int:
        """The smallest side of a grid bucket."""
        if self.min_side is not None:
            return self.min_side
        return max(self.step, self.resolution // 2 // self.step * self.step)

    @property
    def hi(self) -> int:
        """The largest side of any bucket."""
        return self.max_side if self.max_side is not None else 2 * self.resolution // self.step * self.step


def make_buckets(options: BucketOptions) -> list[Bucket]:
    """The bucket grid (kohya's rule, see the module docstring), sorted by aspect ratio, tall to wide."""
    step, lo, hi, area = options.step, options.lo, options.hi, options.area
    found: set[Bucket] = set()
    side = math.isqrt(area) // step * step
    if lo <= side <= hi:
        found.add(Bucket(side, side))
    for width in range(lo, hi + 1, step):
        height = min(hi, area // width // step * step)
        if height >= lo:
            found.add(Bucket(width, height))
            found.add(Bucket(height, width))
    return sorted(found, key=lambda b: (b.aspect, b.area))


def aspect_error(width: float, height: float, bucket: Bucket) -> float:
    """``|log(bucket_ar / image_ar)|``: 0 for an exact match, symmetric in portrait and landscape."""
    return abs(math.log(bucket.aspect) - math.log(width / height))


def grid_aspect_error(buckets: Sequence[Bucket]) -> float:
    """The worst aspect error of nearest-bucket assignment for images within the grid's aspect range.

    Half the widest gap between neighbouring buckets' log-aspects (an image in the middle of that gap is that
    far from both). Images outside the range are further from the end bucket than this.
    """
    logs = sorted({math.log(b.aspect) for b in buckets})
    if len(logs) < 2:
        return 0.0
    return max(b - a for a, b in itertools.pairwise(logs)) / 2


def no_upscale_aspect_bound(width: int, height: int, options: BucketOptions) -> float:
    """The stated bound on :func:`assign_bucket`'s aspect error for one image under ``no_upscale``.

    ``log(S / (S - step))`` with ``S`` the shorter side after scaling into the target area; infinite when
    ``S <= step`` (a one-step side may be far off, e.g. 64x127 -> 64x64).
    """
    sw, sh = _scaled_to_fit(width, height, options)
    short = min(sw, sh)
    return math.log(short / (short - options.step)) if short > options.step else math.inf


def _scaled_to_fit(width: int, height: int, options: BucketOptions) -> tuple[float, float]:
    scale = min(1.0, math.sqrt(options.area / (width * height)), options.hi / max(width, height))
    return width * scale, height * scale


def _floor_step(x: float, step: int) -> int:
    return max(step, int(x // step) * step)


def _fitted_bucket(width: int, height: int, options: BucketOptions) -> Bucket:
    """The ``no_upscale`` bucket: inside the scaled image, sides rounded down, least aspect error of 3 candidates."""
    step = options.step
    sw, sh = _scaled_to_fit(width, height, options)
    fw, fh = _floor_step(sw, step), _floor_step(sh, step)
    ar = width / height
    candidates = [
        Bucket(fw, fh),  # both sides rounded down: the bound of the module docstring holds for this one
        Bucket(fw, min(fh, max(step, round(fw / ar / step) * step))),  # width kept, height to match the aspect
        Bucket(min(fw, max(step, round(fh * ar / step) * step)), fh),  # height kept, width to match the aspect
    ]
    return min(candidates, key=lambda b: (round(aspect_error(width, height, b), 12), -b.area))


def assign_bucket(width: int, height: int, buckets: Sequence[Bucket], options: BucketOptions) -> Bucket:
    """The bucket of an image of ``width`` x ``height`` pixels (after EXIF orientation).

    Without ``no_upscale``: the grid bucket of nearest log-aspect (ties: the larger area). With ``no_upscale``:
    the image's own fitted bucket (``buckets`` is not used). See the module docstring for the error bounds.
    """
    if width < 1 or height < 1:
        raise DataError(f"image size {width}x{height}: both sides must be positive; remove the empty image")
    if options.no_upscale:
        return _fitted_bucket(width, height, options)
    if not buckets:
        raise DataError("buckets: the bucket list is empty; make it with make_buckets(options)")
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.aspect) - target), -b.area))


def assign_buckets(sizes: Iterable[tuple[int, int]], options: BucketOptions) -> list[Bucket]:
    """:func:`assign_bucket` for many ``(width, height)`` sizes at once (vectorised for the grid case)."""
    sizes = list(sizes)
    if options.no_upscale:
        return [assign_bucket(w, h, (), options) for w, h in sizes]
    buckets = make_buckets(options)
    if not sizes:
        return []
    arr = np.asarray(sizes, dtype=np.float64)
    if (arr <= 0).any():
        w, h = sizes[int(np.argmax((arr <= 0).any(axis=1)))]
        raise DataError(f"image size {w}x{h}: both sides must be positive; remove the empty image")
    image_logs = np.log(arr[:, 0] / arr[:, 1])
    # Buckets are sorted by (aspect, area), so argmin's first hit on a tie is the smaller area; flip the order so
    # ties go to the larger area, as in assign_bucket.
    order = buckets[::-1]
    bucket_logs = np.log(np.array([b.aspect for b in order]))
    nearest = np.abs(image_logs[:, None] - bucket_logs[None, :]).argmin(axis=1)
    return [order[i] for i in nearest]


def crop_box(
    width: int, height: int, bucket: Bucket, center: tuple[float, float] = (0.5, 0.5)
) -> tuple[float, float, float, float]:
    """The part of a ``width`` x ``height`` image that fills ``bucket``: ``(left, top, right, bottom)`` in image pixels.

    The largest box of the bucket's aspect that fits in the image, centred on ``center`` (fractions of width and
    height; ``(0.5, 0.5)`` is a centre crop) and shifted inside the image where it would stick out. Resizing that
    box to the bucket (``Image.resize(bucket size, box=...)``) scales and crops in one step; the scale factor is
    ``bucket.width / (right - left)``. Edges may be fractional so the crop is exact at any scale.
    """
    cx, cy = center
    if not (0.0 <= cx <= 1.0 and 0.0 <= cy <= 1.0):
        raise ValueError(f"center must be fractions in [0, 1], got {center}")
    # The side that touches the image edges is taken exactly, so float error never pushes the box outside.
    if width * bucket.height >= height * bucket.width:
        box_w, box_h = height * bucket.aspect, float(height)
    else:
        box_w, box_h = float(width), width / bucket.aspect
    left = max(0.0, min(cx * width - box_w / 2, width - box_w))
    top = max(0.0, min(cy * height - box_h / 2, height - box_h))
    return left, top, min(float(width), left + box_w), min(float(height), top + box_h)


def random_center(width: int, height: int, bucket: Bucket, rng: random.Random) -> tuple[float, float]:
    """A crop centre for :func:`crop_box` drawn uniformly over the positions the crop can take (random crop)."""
    left, top, right, bottom = crop_box(width, height, bucket, (0.0, 0.0))
    box_w, box_h = right - left, bottom - top
    x = rng.uniform(0.0, width - box_w) + box_w / 2
    y = rng.uniform(0.0, height - box_h) + box_h / 2
    return x / width, y / height


def bucket_histogram(assigned: Iterable[Bucket]) -> dict[Bucket, int]:
    """How many images went to each bucket, ordered by aspect ratio (tall to wide)."""
    counts = Counter(assigned)
    return {b: counts[b] for b in sorted(counts, key=lambda b: (b.aspect, b.area))}
