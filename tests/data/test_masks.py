"""Loss masks: mask files and PNG alpha on the latent grid, the folder convention, the floor, and mirroring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.config.blocks import DataConfig
from sdtune.data.dataset import ImageCaptionSet
from sdtune.data.masks import alpha_of, read_mask

RES = 16  # the tiny VAE halves: latents are 8 x 8


@pytest.fixture
def vae(tiny_model):
    return tiny_model("sd1").vae


def _half(width: int, height: int, left: int, right: int) -> Image.Image:
    arr = np.full((height, width), right, np.uint8)
    arr[:, : width // 2] = left
    return Image.fromarray(arr, mode="L")


def test_alpha_becomes_the_mask(tmp_path: Path) -> None:
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 3] = 0
    rgba[:, :8, 3] = 255  # left half opaque
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    grid = alpha_of(tmp_path / "a.png", (8, 8))
    assert grid.shape == (1, 8, 8)
    assert torch.equal(grid[0, :, :4], torch.ones(8, 4)) and torch.equal(grid[0, :, 4:], torch.zeros(8, 4))
    Image.new("RGB", (16, 16)).save(tmp_path / "b.png")
    assert torch.equal(alpha_of(tmp_path / "b.png", (8, 8)), torch.ones(1, 8, 8))  # no alpha: all weighted


def test_masks_follow_the_centre_crop_at_any_mask_size(tmp_path: Path) -> None:
    # a 32 x 16 image is cropped to x in [8, 24): of a mask black on its left half, a quarter stays black
    for size in [(32, 16), (16, 8)]:
        _half(*size, left=0, right=255).save(tmp_path / "m.png")
        grid = read_mask(tmp_path / "m.png", (32, 16), (8, 8))[0]
        assert torch.equal(grid[:, :4], torch.zeros(8, 4)) and torch.equal(grid[:, 4:], torch.ones(8, 4)), size
    # area average: a one-pixel-wide white line in a 2-pixel latent cell weighs 0.5
    arr = np.zeros((16, 16), np.uint8)
    arr[:, 0] = 255
    Image.fromarray(arr, mode="L").save(tmp_path / "line.png")
    grid = read_mask(tmp_path / "line.png", (16, 16), (8, 8))[0]
    assert torch.allclose(grid[:, 0], torch.full((8,), 0.5)) and grid[:, 1:].abs().max() == 0


def _dataset(folder: Path, n: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"thing {i}")


def test_folder_convention_jsonl_masks_and_floor(tmp_path: Path, vae) -> None:
    _dataset(tmp_path / "d")
    (tmp_path / "d" / "masks").mkdir()
    _half(RES, RES, 255, 0).save(tmp_path / "d" / "masks" / "1.png")  # image 1: left half trains
    cfg = DataConfig(path=str(tmp_path / "d"), latent_sampling="deterministic", mask_floor=0.25)
    data = ImageCaptionSet.load(cfg, vae, RES, seed=0)
    assert len(data) == 3, "masks/ must not become training images"
    assert data.weights is not None and data.weights.shape == (3, 1, 8, 8)
    assert torch.equal(data.weights[0], torch.ones(1, 8, 8)) and torch.equal(data.weights[2], torch.ones(1, 8, 8))
    assert torch.equal(data.weights[1, 0, :, :4], torch.ones(8, 4))
    assert torch.equal(data.weights[1, 0, :, 4:], torch.full((8, 4), 0.25))  # the floor
    # no masks anywhere: nothing stored, the loss stays unweighted
    _dataset(tmp_path / "plain")
    plain = ImageCaptionSet.load(DataConfig(path=str(tmp_path / "plain")), vae, RES, seed=0)
    assert plain.weights is None and plain.latents_and_weights([0], [torch.Generator()])[1] is None
    # a JSONL "mask" names its file anywhere
    _half(RES, RES, 0, 255).save(tmp_path / "right.png")
    lines = [{"image": "d/0.png", "caption": "x", "mask": "right.png"}, {"image": "d/2.png", "caption": "y"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    data = ImageCaptionSet.load(DataConfig(path=str(tmp_path / "m.jsonl")), vae, RES, seed=0)
    assert torch.equal(data.weights[0, 0, :, :4], torch.zeros(8, 4)) and data.weights[0, 0, :, 4:].min() == 1
    assert torch.equal(data.weights[1], torch.ones(1, 8, 8))


def test_alpha_mask_option_and_mirrored_latents_get_mirrored_masks(tmp_path: Path, vae) -> None:
    folder = tmp_path / "a"
    folder.mkdir()
    rgba = np.random.default_rng(0).integers(0, 255, (RES, RES, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[:, : RES // 2, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(folder / "a.png")
    cfg = DataConfig(path=str(folder), latent_sampling="deterministic", alpha_mask=True, flip=True)
    data = ImageCaptionSet.load(cfg, vae, RES, seed=0)
    left = torch.zeros(1, 8, 8)
    left[..., :4] = 1
    seen = set()
    for seed in range(12):
        latents, weights = data.latents_and_weights([0], [torch.Generator().manual_seed(seed)])
        mirrored = bool(weights[0, 0, 0, 7] == 1)
        seen.add(mirrored)
        assert torch.equal(weights[0], torch.flip(left, dims=[2]) if mirrored else left)
        assert torch.equal(latents[0], data.cache._mean[int(mirrored), 0])  # the latent of the same orientation
        # and exactly the latents a caller without masks sees for the same generator state
        assert torch.equal(data.latents([0], [torch.Generator().manual_seed(seed)]), latents)
    assert seen == {False, True}
