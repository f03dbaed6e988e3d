"""Small captioned image folders that tests train on (imported by fixtures in several test packages)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image_folder(folder: Path, size: int = 40, count: int = 4) -> Path:
    """``count`` small reddish images ``0.png``... (seeded noise) with ``.txt`` captions ``"tag<i>, red, square"``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = np.full((size, size, 3), [200, 40 * i, 30], np.uint8)
        pixels += rng.integers(0, 20, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"tag{i}, red, square")
    return folder
