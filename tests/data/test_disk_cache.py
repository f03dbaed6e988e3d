"""Disk caches of latents and text-encoder outputs: reused across loads, invalidated by exactly what changed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.config.blocks import DataConfig
from sdtune.data.dataset import ImageCaptionSet
from sdtune.data.disk_cache import DiskCache, text_store
from sdtune.models.text_encoding import TextCache


def _folder(root: Path, n: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _load(folder: Path, cache: Path, vae, resolution: int = 16, **data) -> ImageCaptionSet:
    cfg = DataConfig(path=str(folder), cache_dir=str(cache), **data)
    return ImageCaptionSet.load(cfg, vae, resolution, seed=0)


def _all_latents(data: ImageCaptionSet) -> torch.Tensor:
    return data.latents(list(range(len(data))), [torch.Generator().manual_seed(0) for _ in range(len(data))])


@pytest.mark.parametrize("mode", ["once", "deterministic", "random"])
def test_second_load_encodes_nothing_and_gives_the_same_latents(tmp_path, tiny_model, mode):
    vae = tiny_model("sd1").vae
    folder, cache = _folder(tmp_path / "d"), tmp_path / "cache"
    first = _load(folder, cache, vae, latent_sampling=mode)
    assert first.cache.encoded_count == 4
    second = _load(folder, cache, vae, latent_sampling=mode)
    assert second.cache.encoded_count == 0
    assert torch.equal(_all_latents(first), _all_latents(second))
    # the stored posterior is the VAE's: the mean matches an in-memory deterministic encode
    if mode == "deterministic":
        memory = ImageCaptionSet.load(DataConfig(path=str(folder), latent_sampling=mode), vae, 16, seed=0)
        torch.testing.assert_close(_all_latents(second), _all_latents(memory), rtol=1e-5, atol=1e-6)
    # sharded by key prefix, nothing flat, no temporary files left
    files = sorted((cache / "latents").rglob("*"))
    stored = [p for p in files if p.is_file()]
    assert len(stored) == 4 and all(p.parent.name == p.name[:2] and p.suffix == ".safetensors" for p in stored)
    assert not any(p.name.startswith(".") for p in files)


def test_changed_image_resolution_flip_and_vae_invalidate_exactly_what_they_change(tmp_path, tiny_model):
    vae = tiny_model("sd1").vae
    folder, cache = _folder(tmp_path / "d"), tmp_path / "cache"
    before = _all_latents(_load(folder, cache, vae, latent_sampling="deterministic"))
    # new content in one file: that one is encoded again, the rest reused
    Image.fromarray(np.full((24, 24, 3), 7, np.uint8)).save(folder / "2.png")
    changed = _load(folder, cache, vae, latent_sampling="deterministic")
    assert changed.cache.encoded_count == 1
    after = _all_latents(changed)
    assert torch.equal(after[[0, 1, 3]], before[[0, 1, 3]]) and not torch.equal(after[2], before[2])
    # the same bytes under a new name: content, not names, is the key
    (folder / "2.png").rename(folder / "renamed.png")
    assert _load(folder, cache, vae, latent_sampling="deterministic").cache.encoded_count == 0
    # another resolution: everything again
    assert _load(folder, cache, vae, resolution=8, latent_sampling="deterministic").cache.encoded_count == 4
    # mirroring: only the mirrored copies are new
    assert _load(folder, cache, vae, latent_sampling="deterministic", flip=True).cache.encoded_count == 4
    assert _load(folder, cache, vae, latent_sampling="deterministic", flip=True).cache.encoded_count == 0
    # another VAE (other weights): everything again
    assert _load(folder, cache, tiny_model("sd1", seed=1).vae).cache.encoded_count == 4


def test_unreadable_cache_file_is_a_miss(tmp_path):
    disk = DiskCache(tmp_path)
    disk.put("abcdef", {"x": torch.ones(2)})
    assert torch.equal(disk.get("abcdef")["x"], torch.ones(2)) and disk.path("abcdef").parent.name == "ab"
    disk.path("abcdef").write_bytes(b"garbage")
    assert disk.get("abcdef") is None


def test_text_encoder_outputs_are_reused_across_runs(tmp_path, tiny_model):
    model = tiny_model("sd1")
    prompts = ["a red circle", "a blue star", "a red circle"]

    def cache_for(m) -> TextCache:
        return TextCache(m, text_store(tmp_path, m.text_encoders, m.tokenizers, m.family.arch))

    first = cache_for(model)
    a = first(prompts)
    assert first.encoded == 2
    second = cache_for(model)
    b = second(prompts)
    assert second.encoded == 0 and torch.equal(a.context, b.context)
    third = cache_for(model)
    third(["a green heart", "a blue star"])
    assert third.encoded == 1  # only the new prompt
    other = cache_for(tiny_model("sd1", seed=1))  # other text-encoder weights
    other(prompts)
    assert other.encoded == 2
    sdxl = tiny_model("sdxl")  # pooled outputs are stored too
    xl = cache_for(sdxl)(prompts[:1])
    again = cache_for(sdxl)
    assert torch.equal(again(prompts[:1]).pooled, xl.pooled) and again.encoded == 0
