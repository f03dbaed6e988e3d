from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.models.loading import save_model


@pytest.fixture
def tiny_checkpoint(tiny_model, tmp_path_factory):
    """A tiny model of a family saved as a single file, as a user's checkpoint would be."""

    def make(family: str = "sd1") -> Path:
        path = tmp_path_factory.mktemp("model") / f"tiny-{family}.safetensors"
        return save_model(tiny_model(family), path, dtype=torch.float32)

    return make


@pytest.fixture
def image_folder(tmp_path):
    """Four small coloured images with .txt captions."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        pixels = np.full((40, 40, 3), [200, 40 * i, 30], np.uint8) + rng.integers(0, 20, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"tag{i}, red, square")
    return folder
