"""Scenes of the shapes world and their anti-aliased renderer.

A :class:`Scene` is one coloured shape on a flat background. Geometry is given in pixels of a
``CANVAS`` x ``CANVAS`` (64 x 64) image; :func:`render` scales it to any output size, so the same scene
can be drawn at 64 px for the tiny model and larger for previews.

Every shape is defined as an inside-test in *unit* coordinates (y pointing up) and fits inside the unit
circle, so a scene's ``size`` is the radius of a circle that contains the whole shape at any rotation.
That makes "fully inside the frame" a simple bound on ``size`` + offset.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdtune.world.palette import COLOURS, PALETTE, check_colour

CANVAS = 64
SUPERSAMPLE = 4  # 4x4 sub-pixel samples per pixel -> 17 coverage levels on edges.

# Random scenes: radius and centre offset in canvas pixels. 23 + 6 = 29 < 32 leaves a >= 3 px ring of
# pure background at the border, which the scorer reads the background from.
SIZE_RANGE = (13.0, 23.0)
MAX_OFFSET = 6.0
SMALL_BELOW = 16.0  # captions may call a shape "small" below this radius ...
LARGE_ABOVE = 20.0  # ... and "large" above this one.

Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 1.0


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.6**2)


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    h = math.sqrt(0.5)  # half side of the square inscribed in the unit circle
    return (np.abs(u) <= h) & (np.abs(v) <= h)


def _regular_polygon(sides: int, phase: float) -> Mask:
    """Convex regular polygon with circumradius 1 and a vertex at angle ``phase`` (radians)."""
    apothem = math.cos(math.pi / sides)
    # Edge k's outward normal points half-way between vertices k and k + 1.
    mids = [phase + math.pi * (2 * k + 1) / sides for k in range(sides)]
    normals = [(math.cos(m), math.sin(m)) for m in mids]

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        out = np.ones(np.broadcast(u, v).shape, dtype=bool)
        for nx, ny in normals:
            out &= u * nx + v * ny <= apothem
        return out

    return inside


def _diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # A rhombus, not a square: a square rotated 45 degrees would be indistinguishable from a diamond.
    return np.abs(u) / 0.6 + np.abs(v) <= 1.0


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    half_width, half_length = 0.3, 0.95  # corners at radius ~0.997: inside the unit circle
    au, av = np.abs(u), np.abs(v)
    return ((au <= half_width) & (av <= half_length)) | ((av <= half_width) & (au <= half_length))


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Five points, outer radius 1, inner radius 0.45 (chubbier than the classic 0.38 so that arms
    # survive at 13 px radius). Fold the angle into one arm, then test against its two edges.
    inner = 0.45
    sector = 2 * math.pi / 5
    theta = np.mod(np.arctan2(u, v), sector)  # 0 at the tip pointing up
    theta = np.abs(theta - np.where(theta > sector / 2, sector, 0.0))
    r = np.hypot(u, v)
    x, y = r * np.sin(theta), r * np.cos(theta)  # point folded into the arm around the +y axis
    # Edge from the tip (0, 1) to the inner vertex at angle sector/2; inside = the origin's side of it.
    ix, iy = inner * math.sin(sector / 2), inner * math.cos(sector / 2)
    return x * (iy - 1.0) - (y - 1.0) * ix >= 0.0


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Classic (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0; its smallest enclosing circle has radius 1.25 centred at
    # y = 0.25, so rescale to fit the unit circle.
    x, y = u * 1.25, v * 1.25 + 0.25
    return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0


def _crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Unit disk minus an offset disk: thickest (0.6) on the left, opening to the right.
    return (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.85**2)


# name -> (inside test, rotational symmetry period in degrees; 0 = rotation changes nothing)
_SHAPES: dict[str, tuple[Mask, float]] = {
    "circle": (_circle, 0.0),
    "square": (_square, 90.0),
    "triangle": (_regular_polygon(3, math.pi / 2), 120.0),
    "diamond": (_diamond, 180.0),
    "cross": (_cross, 90.0),
    "star": (_star, 72.0),
    "heart": (_heart, 360.0),
    "ring": (_ring, 0.0),
    "hexagon": (_regular_polygon(6, 0.0), 60.0),
    "crescent": (_crescent, 360.0),
}
SHAPES: tuple[str, ...] = tuple(_SHAPES)

# Shapes with a natural "up" are only tilted (+- degrees) in random scenes, so captions stay truthful to how
# people name them: a square turned 45 degrees reads as a diamond, a cross as an "x", an upside-down heart
# is a poor example. The scorer still recognises every rotation.
_TILT: dict[str, float] = {"square": 20.0, "diamond": 30.0, "cross": 20.0, "heart": 30.0, "crescent": 45.0}


def check_shape(name: str) -> str:
    """Return ``name`` if it is a known shape, else raise ``ValueError`` listing the choices."""
    if name not in _SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return name


def symmetry_period(shape: str) -> float:
    """Rotation (degrees) that maps ``shape`` onto itself; 0 for rotation-invariant shapes."""
    return _SHAPES[check_shape(shape)][1]


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test for ``shape`` at rotation 0 in unit coordinates (y up, shape within the unit circle)."""
    return _SHAPES[check_shape(shape)][0](u, v)


@dataclass(frozen=True)
class Scene:
    """One shape of colour ``fg`` on a ``bg`` background; geometry in pixels of a 64 x 64 canvas.

    ``size`` is the radius of the circle that contains the shape, ``(cx, cy)`` its centre (x right, y
    down, pixel edges at integers), ``angle`` a counter-clockwise rotation in degrees.
    """

    shape: str
    fg: str
    bg: str
    size: float
    cx: float = CANVAS / 2
    cy: float = CANVAS / 2
    angle: float = 0.0

    def __post_init__(self) -> None:
        check_shape(self.shape)
        check_colour(self.fg)
        check_colour(self.bg)
        if self.fg == self.bg:
            raise ValueError(f"fg and bg are both {self.fg!r}; choose two different colours")
        if not self.size > 0:
            raise ValueError(f"size {self.size!r} must be a positive radius in pixels")


def coverage(scene: Scene, size: int = CANVAS, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel covered by the shape, float32 ``(size, size)`` in 0..1."""
    if size < 1 or supersample < 1:
        raise ValueError(f"size {size} and supersample {supersample} must both be >= 1")
    scale = size / CANVAS
    n = size * supersample
    # Sub-pixel sample centres in canvas pixels.
    t = (np.arange(n, dtype=np.float64) + 0.5) / (supersample * scale)
    dx = (t - scene.cx)[None, :] / scene.size
    dy = (scene.cy - t)[:, None] / scene.size  # flip: image y grows down, shape y grows up
    a = math.radians(scene.angle)
    # Rotate the sample points by -angle, which rotates the shape by +angle.
    u = dx * math.cos(a) + dy * math.sin(a)
    v = -dx * math.sin(a) + dy * math.cos(a)
    inside = shape_mask(scene.shape, u, v).astype(np.float32)
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def render(scene: Scene, size: int = CANVAS) -> Image.Image:
    """Draw ``scene`` as an anti-aliased RGB image of ``size`` x ``size`` pixels (deterministic)."""
    alpha = coverage(scene, size)[..., None]
    fg = np.array(PALETTE[scene.fg], dtype=np.float32)
    bg = np.array(PALETTE[scene.bg], dtype=np.float32)
    # Blend in sRGB space: it is what a naive painter does, and the scorer's alpha estimate assumes it.
    rgb = bg * (1.0 - alpha) + fg * alpha
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mode="RGB")


def random_scene(
    rng: np.random.Generator,
    shapes: Sequence[str] = SHAPES,
    fg_colours: Sequence[str] = COLOURS,
    bg_colours: Sequence[str] = COLOURS,
) -> Scene:
    """Draw a random scene: visible size, small offset, rotation where it matters, and ``fg != bg``.

    The draw order is fixed, so the same generator state always gives the same scene.
    """
    shapes, fg_colours, bg_colours = list(shapes), list(fg_colours), list(bg_colours)
    for name in shapes:
        check_shape(name)
    for name in fg_colours + bg_colours:
        check_colour(name)
    if not shapes:
        raise ValueError(f"shapes is empty; choose from {', '.join(SHAPES)}")
    if not fg_colours or not bg_colours or (len(set(fg_colours) | set(bg_colours)) < 2):
        raise ValueError(f"fg_colours {fg_colours} and bg_colours {bg_colours} leave no pair of different colours")
    shape = shapes[int(rng.integers(len(shapes)))]
    fg = fg_colours[int(rng.integers(len(fg_colours)))]
    choices = [c for c in bg_colours if c != fg]
    if not choices:  # fg was the only bg colour: pick the fg among the others instead
        bg = bg_colours[int(rng.integers(len(bg_colours)))]
        fgs = [c for c in fg_colours if c != bg]
        fg = fgs[int(rng.integers(len(fgs)))]
    else:
        bg = choices[int(rng.integers(len(choices)))]
    radius = float(rng.uniform(*SIZE_RANGE))
    cx, cy = CANVAS / 2 + rng.uniform(-MAX_OFFSET, MAX_OFFSET, size=2)
    period = symmetry_period(shape)
    raw = float(rng.uniform(0.0, 1.0))  # always drawn, so later draws do not depend on the shape
    if shape in _TILT:
        angle = (2.0 * raw - 1.0) * _TILT[shape]
    else:
        angle = raw * period
    return Scene(
        shape=shape,
        fg=fg,
        bg=bg,
        size=round(radius, 2),
        cx=round(float(cx), 2),
        cy=round(float(cy), 2),
        angle=round(angle, 1),
    )
