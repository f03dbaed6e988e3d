"""A folder of images with captions, loaded once: decoded images, caption text and cached VAE latents."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdtune.config.blocks import DataConfig
from sdtune.data.captions import caption_for
from sdtune.data.images import Skipped, load_image, scan_images
from sdtune.data.latents import LatentCache


@dataclass
class ImageCaptionSet:
    """Training examples: ``captions[i]`` describes image i; ``latents(indices, generators)`` gives its latents."""

    paths: list[Path]
    captions: list[str]
    cache: LatentCache
    vae: Any
    images: torch.Tensor | None  # kept only when latents are not cached (encoded on every use)

    @classmethod
    def load(
        cls,
        cfg: DataConfig,
        vae: Any,
        resolution: int,
        seed: int,
        report: Callable[[Skipped], None] = lambda item: None,
    ) -> ImageCaptionSet:
        """Scan, decode and caption ``cfg.path``; encode latents once (unless ``cfg.cache_latents`` is off)."""
        paths, skipped = scan_images(cfg.path)
        for item in skipped:
            report(item)
        images = torch.stack([load_image(p, resolution) for p in paths]).to(vae.device, vae.dtype)
        captions = [caption_for(p, cfg.caption_extension, cfg.filename_word_regex, cfg.filename_join) for p in paths]
        cache = LatentCache.encode(
            vae,
            images if cfg.cache_latents else images[:1],
            cfg.latent_sampling,
            torch.Generator().manual_seed(seed),
            flip=cfg.flip,
        )
        return cls(paths, captions, cache, vae, None if cfg.cache_latents else images)

    def __len__(self) -> int:
        return len(self.paths)

    def latents(self, indices: Sequence[int], generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Latents of the examples: from the cache, or (uncached) through the VAE now, one generator per sample."""
        if self.images is None:
            return torch.cat([self.cache.get([i], g) for i, g in zip(indices, generators, strict=True)])
        with torch.no_grad():
            dist = self.vae.encode(self.images[list(indices)]).latent_dist
            noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators]).to(dist.mean)
            return (dist.mean + dist.std * noise) * self.vae.config.scaling_factor
