"""Read a shapes-world image back into words: which shape, which foreground and background colour.

This is the ground truth for "did the model learn the concept", so it must work on imperfect images
(blur, noise, colour shifts, JPEG artefacts) and say ``None`` rather than guess when nothing is readable.

Method:

1. Background: the border pixels vote for their nearest palette colour; the background reference is the
   median of the winning pixels (the observed colour, not the palette one, so colour shifts cancel).
2. Foreground: pixels clearly away from the background; its colour is the median of the most distinct
   of them (the interior, not the anti-aliased edge).
3. Coverage: each pixel's position on the line from background to foreground colour gives a soft mask
   that keeps sub-pixel edge information and ignores noise along other colour directions.
4. Shape: the mask is normalised for position (centroid) and scale (sqrt of its area), resampled onto a
   fixed grid and compared with soft IoU against a bank of templates of every shape at many rotations and
   a few blur levels (blur is a nuisance, not evidence). The best shape wins if its IoU is high enough.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from sdtune.world.palette import COLOURS, check_colour, nearest_colours, srgb_to_lab
from sdtune.world.shapes import CANVAS, SHAPES, Scene, check_shape, shape_mask, symmetry_period

GRID = 32  # canonical grid side, in samples
EXTENT = 1.25  # the grid spans +-EXTENT * sqrt(area): every shape fits (star tips reach ~0.9)
ANGLE_STEP = 4.0  # degrees between template rotations
TEMPLATE_BLURS = (0.0, 0.04, 0.08, 0.12)  # Gaussian sigma in units of sqrt(area)
MIN_IOU = 0.72  # below this the mask is not any known shape
FG_MIN_DELTA = 15.0  # CIELAB distance from the background that makes a pixel foreground
MIN_AREA_FRACTION = 0.012  # smaller foregrounds (< ~50 px at 64 x 64) are specks, not shapes
MAX_AREA_FRACTION = 0.6  # larger ones mean the "background" is not a background
MAX_COLOUR_DISTANCE = 35.0  # farther than this from every palette colour: no name fits
MIN_BG_AGREEMENT = 0.5  # share of border pixels that must agree on the background colour
FOREIGN_DELTA = 20.0  # CIELAB distance from the fg/bg blend line that makes a pixel a third colour
MIN_SIDE = 16  # smaller images have too few pixels for a border ring and a shape
MAX_FOREIGN = 0.3  # share of foreground pixels of a third colour above which there is no single shape


@dataclass(frozen=True)
class Reading:
    """What the scorer saw. ``None`` means absent or unreadable; the other fields say how sure it is."""

    shape: str | None
    fg: str | None
    bg: str | None
    shape_iou: float = 0.0  # soft IoU of the best template
    runner_up: str | None = None  # second-best shape
    shape_margin: float = 0.0  # best IoU minus the runner-up's
    fg_distance: float = math.nan  # CIELAB distance of the measured fg colour to its name
    bg_distance: float = math.nan
    bg_agreement: float = 0.0  # share of border pixels voting for the background colour
    area: float = 0.0  # foreground area as a share of the image
    foreign: float = 0.0  # share of foreground pixels that are neither fg, bg nor a blend of the two


@dataclass(frozen=True)
class Expectation:
    """What an image should show. ``fg=None`` accepts any named foreground colour."""

    shape: str
    fg: str | None
    bg: str

    def __post_init__(self) -> None:
        check_shape(self.shape)
        if self.fg is not None:
            check_colour(self.fg)
        check_colour(self.bg)


Target = Expectation | Scene  # a Scene is an exact expectation


def _gaussian_matrix(sigma: float) -> np.ndarray:
    """GRID x GRID matrix that blurs one axis of a canonical mask (identity for sigma 0)."""
    if sigma <= 0:
        return np.eye(GRID)
    pos = np.linspace(-EXTENT, EXTENT, GRID)
    k = np.exp(-0.5 * ((pos[:, None] - pos[None, :]) / sigma) ** 2)
    return k / k.sum(axis=1, keepdims=True)


def _canonical(alpha: np.ndarray) -> np.ndarray | None:
    """Resample a soft mask onto the canonical grid (centroid-centred, scaled by sqrt(area)); flat vector."""
    mass = float(alpha.sum())
    # Scale from the area inside the half-coverage contour (a steep ramp keeps it smooth): unlike the
    # plain sum it survives blur and a foreground colour read too weak on thin shapes.
    half_area = float(np.clip((alpha - 0.25) / 0.5, 0.0, 1.0).sum())
    if mass <= 0 or half_area <= 0:
        return None
    h, w = alpha.shape
    ys, xs = np.mgrid[0:h, 0:w]
    cy, cx = float((alpha * ys).sum() / mass), float((alpha * xs).sum() / mass)
    scale = math.sqrt(half_area)
    pos = np.linspace(-EXTENT, EXTENT, GRID) * scale
    px = np.broadcast_to(cx + pos[None, :], (GRID, GRID))  # columns: image x
    py = np.broadcast_to(cy + pos[:, None], (GRID, GRID))  # rows: image y (down)
    # Bilinear interpolation with zeros outside the image.
    x0, y0 = np.floor(px).astype(int), np.floor(py).astype(int)
    fx, fy = px - x0, py - y0
    padded = np.pad(alpha, 1)

    def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        return padded[np.clip(yy + 1, 0, h + 1), np.clip(xx + 1, 0, w + 1)]

    out = (
        at(y0, x0) * (1 - fx) * (1 - fy)
        + at(y0, x0 + 1) * fx * (1 - fy)
        + at(y0 + 1, x0) * (1 - fx) * fy
        + at(y0 + 1, x0 + 1) * fx * fy
    )
    return out.astype(np.float32).ravel()


_BANK: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


def _unit_frame(shape: str, n: int = 384) -> tuple[float, float, float]:
    """Area and centroid ``(area, cu, cv)`` of ``shape`` at rotation 0, in unit coordinates."""
    t = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    inside = shape_mask(shape, t[None, :], t[:, None])
    area = float(inside.mean()) * 4.0
    cu = float((inside * t[None, :]).sum() / inside.sum())
    cv = float((inside * t[:, None]).sum() / inside.sum())
    return area, cu, cv


def _template(shape: str, angle: float, frame: tuple[float, float, float], sub: int = 4) -> np.ndarray:
    """Canonical-grid view of ``shape`` rotated by ``angle``, evaluated analytically (no rendering).

    Each grid cell averages ``sub`` x ``sub`` samples over half a cell, about the footprint of one pixel
    for the shape sizes in play, which is what the bilinear resampling of a rendered image sees.
    """
    area, cu, cv = frame
    step = 2 * EXTENT / (GRID - 1)
    offsets = ((np.arange(sub) + 0.5) / sub - 0.5) * step / 2
    pos = (np.linspace(-EXTENT, EXTENT, GRID)[:, None] + offsets[None, :]).ravel()  # (GRID * sub,)
    s = math.sqrt(area)
    # Canonical grid: columns go right (+u), rows go down (-v); offsets are from the centroid.
    du, dv = pos[None, :] * s, -pos[:, None] * s
    a = math.radians(angle)
    # Undo the rotation: a point of the rotated shape maps to centroid + R(-angle) * offset.
    u = cu + du * math.cos(a) + dv * math.sin(a)
    v = cv - du * math.sin(a) + dv * math.cos(a)
    inside = shape_mask(shape, u, v).astype(np.float32)
    return inside.reshape(GRID, sub, GRID, sub).mean(axis=(1, 3))


def _dead_zone(alpha: np.ndarray) -> np.ndarray:
    """Map coverage 0.1..0.9 to 0..1: noise lifts the clipped background above 0 everywhere, and this
    removes it (and the same on the foreground side) while keeping edges soft."""
    return np.clip((alpha - 0.1) / 0.8, 0.0, 1.0)


def _template_bank() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Templates ``(n, GRID*GRID)``, their shape index and their area ``(n,)``; built once, then cached."""
    global _BANK
    if _BANK is None:
        vectors: list[np.ndarray] = []
        labels: list[int] = []
        blurs = [_gaussian_matrix(s) for s in TEMPLATE_BLURS]
        for index, shape in enumerate(SHAPES):
            frame = _unit_frame(shape)
            period = symmetry_period(shape)
            angles = np.arange(0.0, period, ANGLE_STEP) if period > 0 else np.zeros(1)
            for angle in angles:
                grid = _template(shape, float(angle), frame).astype(np.float64)
                for k in blurs:
                    blurred = k @ grid @ k.T
                    # Mimic the reading of a blurred image: thin parts never reach the full foreground
                    # colour, so the measured colour is the blurred peak and coverage is relative to it.
                    vectors.append(_dead_zone(blurred / blurred.max()).astype(np.float32).ravel())
                    labels.append(index)
        bank = np.stack(vectors)
        _BANK = (bank, np.array(labels), bank.sum(axis=1))
    return _BANK


def _as_rgb(img: Image.Image | np.ndarray) -> np.ndarray:
    """Float RGB array in 0..255, box-downscaled so its longer side is at most the canvas size.

    Arrays may be uint8 (0..255) or float; a float array whose values are all <= 1 is taken as 0..1.
    """
    if isinstance(img, np.ndarray):
        arr = img
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise ValueError(f"image array has shape {arr.shape}; pass (height, width, 3) RGB")
        if arr.dtype.kind == "f" and float(arr.max(initial=0.0)) <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.rint(arr[..., :3]), 0, 255).astype(np.uint8), mode="RGB")
    img = img.convert("RGB")
    if min(img.size) < MIN_SIDE:
        raise ValueError(f"image is {img.width}x{img.height}; pass at least {MIN_SIDE}x{MIN_SIDE} pixels")
    if max(img.size) > CANVAS:
        # Area-averaging keeps edges soft and noise low; the shape maths is scale-free anyway.
        f = CANVAS / max(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float64)


def score_image(img: Image.Image | np.ndarray) -> Reading:
    """Read shape, foreground and background colour from an RGB image (PIL or ``(h, w, 3)`` array)."""
    rgb = _as_rgb(img)
    h, w, _ = rgb.shape
    lab = srgb_to_lab(rgb)

    # 1. Background from the border ring (2 px at 64 x 64).
    b = max(1, round(min(h, w) / 32))
    ring = np.ones((h, w), dtype=bool)
    ring[b:-b, b:-b] = False
    border_idx, _ = nearest_colours(rgb[ring])
    votes = np.bincount(border_idx, minlength=len(COLOURS))
    bg_index = int(votes.argmax())
    agreement = float(votes[bg_index] / votes.sum())
    bg_ref = np.median(rgb[ring][border_idx == bg_index], axis=0)
    bg_name, bg_distance = _name(bg_ref)
    bg = bg_name if agreement >= MIN_BG_AGREEMENT else None

    # 2. Foreground pixels and colour.
    delta = np.linalg.norm(lab - srgb_to_lab(bg_ref), axis=-1)
    candidates = delta > FG_MIN_DELTA
    base = Reading(
        shape=None,
        fg=None,
        bg=bg,
        bg_distance=bg_distance,
        bg_agreement=agreement,
        area=float(candidates.mean()),
    )
    if candidates.sum() < MIN_AREA_FRACTION * h * w:
        return base
    cand_delta = delta[candidates]
    # The most distinct pixels are the interior; edges are blends with the background.
    core = candidates & (delta >= 0.8 * np.percentile(cand_delta, 90))
    fg_ref = np.median(rgb[core], axis=0)
    fg_name, fg_distance = _name(fg_ref)
    fg = fg_name if fg_distance <= MAX_COLOUR_DISTANCE and fg_name != bg else None

    # 3. Soft coverage: position of each pixel on the background -> foreground colour line.
    axis = fg_ref - bg_ref
    alpha = np.clip(((rgb - bg_ref) @ axis) / max(float(axis @ axis), 1e-6), 0.0, 1.0)
    # Pixels off the blend line are a third colour: another object, not this shape's edge.
    off_line = np.linalg.norm(lab - srgb_to_lab(bg_ref + alpha[..., None] * axis), axis=-1) > FOREIGN_DELTA
    foreign = float((off_line & candidates).sum() / candidates.sum())
    alpha = _dead_zone(alpha)
    area = float(alpha.sum() / (h * w))
    reading = Reading(
        shape=None,
        fg=fg,
        bg=bg,
        fg_distance=fg_distance,
        bg_distance=bg_distance,
        bg_agreement=agreement,
        area=area,
        foreign=foreign,
    )
    vec = _canonical(alpha) if MIN_AREA_FRACTION <= area <= MAX_AREA_FRACTION else None
    if vec is None:
        return reading

    # 4. Shape by template matching in the canonical frame.
    bank, labels, bank_mass = _template_bank()
    inter = np.minimum(bank, vec[None, :]).sum(axis=1)
    iou = inter / (bank_mass + vec.sum() - inter)
    per_shape = np.full(len(SHAPES), -1.0)
    np.maximum.at(per_shape, labels, iou)
    order = np.argsort(per_shape)[::-1]
    best, second = float(per_shape[order[0]]), float(per_shape[order[1]])
    readable = best >= MIN_IOU and foreign <= MAX_FOREIGN
    return replace(
        reading,
        shape=SHAPES[order[0]] if readable else None,
        shape_iou=best,
        runner_up=SHAPES[order[1]],
        shape_margin=best - second,
    )


def _name(rgb: np.ndarray) -> tuple[str, float]:
    idx, dist = nearest_colours(rgb)
    return COLOURS[int(idx)], float(dist)


def matches(reading: Reading, expect: Target) -> bool:
    """True when shape, fg and bg are all read as expected (``expect.fg is None``: any named colour)."""
    fg_ok = reading.fg is not None if expect.fg is None else reading.fg == expect.fg
    return reading.shape == expect.shape and fg_ok and reading.bg == expect.bg


def accuracy(images: Iterable[Image.Image | np.ndarray], expectations: Sequence[Target]) -> dict[str, float]:
    """Score ``images`` against ``expectations`` (same order): fractions ``full``, ``shape``, ``fg``, ``bg``.

    Also returns ``n``, the number of images scored.
    """
    counts = {"full": 0, "shape": 0, "fg": 0, "bg": 0}
    n = 0
    for img, expect in zip(images, expectations, strict=True):
        r = score_image(img)
        n += 1
        counts["shape"] += r.shape == expect.shape
        counts["fg"] += (r.fg is not None) if expect.fg is None else (r.fg == expect.fg)
        counts["bg"] += r.bg == expect.bg
        counts["full"] += matches(r, expect)
    if n == 0:
        raise ValueError("no images to score; pass at least one image and expectation")
    return {**{k: v / n for k, v in counts.items()}, "n": float(n)}


__all__ = ["Expectation", "Reading", "accuracy", "matches", "score_image"]
