"""Named colours of the shapes world and the CIELAB maths to tell them apart.

The palette is deliberately small and every pair of colours is far apart in CIELAB (the smallest pairwise
CIE76 distance is checked by a test), so a slightly off-colour pixel from a generated image still has one
clear nearest name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

RGB = tuple[int, int, int]

# Values tuned in CIELAB: saturated enough to be unambiguous, with teal/gray, white/gray and blue/purple
# pushed apart because they are the pairs that crowd each other (smallest pairwise CIE76 distance ~37).
_COLOURS: dict[str, RGB] = {
    "red": (215, 25, 30),
    "green": (40, 165, 40),
    "blue": (30, 70, 235),
    "yellow": (250, 225, 20),
    "purple": (140, 25, 150),
    "orange": (250, 135, 10),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "teal": (0, 130, 110),
    "pink": (250, 140, 205),
    "gray": (140, 140, 140),
}


class Palette(Mapping[str, RGB]):
    """Read-only, ordered table ``name -> (r, g, b)`` with the Lab values precomputed."""

    def __init__(self, colours: Mapping[str, RGB]) -> None:
        self._colours = dict(colours)
        self.names: tuple[str, ...] = tuple(self._colours)
        self.rgb_array = np.array([self._colours[n] for n in self.names], dtype=np.float64)
        self.lab_array = srgb_to_lab(self.rgb_array)

    def __getitem__(self, name: str) -> RGB:
        try:
            return self._colours[name]
        except KeyError:
            raise ValueError(f"unknown colour {name!r}; choose one of {', '.join(self.names)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._colours

    def lab(self, name: str) -> np.ndarray:
        """CIELAB value of a named colour."""
        return self.lab_array[self.names.index(check_colour(name))]


def srgb_to_lab(rgb: np.ndarray | list | tuple) -> np.ndarray:
    """Convert sRGB values in 0..255 (any shape ``(..., 3)``) to CIELAB (D65 white)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    # sRGB -> XYZ (D65), then normalise by the D65 white point.
    m = np.array(
        [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ]
    )
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    lab_l = 116 * f[..., 1] - 16
    lab_a = 500 * (f[..., 0] - f[..., 1])
    lab_b = 200 * (f[..., 1] - f[..., 2])
    return np.stack([lab_l, lab_a, lab_b], axis=-1)


PALETTE = Palette(_COLOURS)
COLOURS: tuple[str, ...] = PALETTE.names


def check_colour(name: str) -> str:
    """Return ``name`` if it is a palette colour, else raise ``ValueError`` listing the choices."""
    if name not in PALETTE:
        raise ValueError(f"unknown colour {name!r}; choose one of {', '.join(COLOURS)}")
    return name


def nearest_colours(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised nearest palette colour: indices into ``COLOURS`` and CIE76 distances, shape ``(...)``."""
    lab = srgb_to_lab(rgb)
    d = np.linalg.norm(lab[..., None, :] - PALETTE.lab_array, axis=-1)
    idx = d.argmin(axis=-1)
    return idx, np.take_along_axis(d, idx[..., None], axis=-1)[..., 0]


def nearest_colour(rgb: np.ndarray | list | tuple) -> tuple[str, float]:
    """Name of the palette colour nearest to one sRGB value (0..255) and its CIELAB (CIE76) distance."""
    arr = np.asarray(rgb, dtype=np.float64)
    if arr.shape != (3,):
        raise ValueError(f"rgb must have 3 values, got shape {arr.shape}; pass (r, g, b) in 0..255")
    idx, dist = nearest_colours(arr)
    return COLOURS[int(idx)], float(dist)
