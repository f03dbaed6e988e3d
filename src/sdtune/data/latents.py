"""VAE latents of the training images, encoded once and kept in memory.

Encoding is the slowest part of a small training step, and the images never change, so every image is
run through the VAE once before training (as A1111's textual-inversion dataset and kohya's
``cache_latents`` do). The three ``mode`` values are A1111's "latent sampling method":

- ``once``: draw one sample from the VAE posterior at encode time and reuse it every step;
- ``deterministic``: use the posterior mean;
- ``random``: keep mean and std and draw a new sample every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

LatentMode = Literal["once", "deterministic", "random"]
_MODES = ("once", "deterministic", "random")


def _config_value(config: Any, key: str) -> Any:
    # diffusers' FrozenDict is a dict with attribute access; accept either so test doubles stay simple.
    if isinstance(config, dict):
        return config.get(key)
    return getattr(config, key, None)


class LatentCache:
    """Scaled VAE latents of a fixed set of images, float32 on the CPU.

    Build it with :meth:`encode`; read batches with :meth:`get`.
    """

    def __init__(self, mode: LatentMode, mean: torch.Tensor, std: torch.Tensor | None, encoded_count: int) -> None:
        """Use :meth:`encode`. ``mean``/``std`` are ``[V, N, C, h, w]`` with V=2 when flipped copies exist.

        For ``once`` ``mean`` holds the stored sample; ``std`` is only kept for ``random``.
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if mode == "random" and std is None:
            raise ValueError("mode 'random' needs std")
        self.mode: LatentMode = mode
        self._mean = mean
        self._std = std if mode == "random" else None
        self.encoded_count = encoded_count

    @classmethod
    def encode(
        cls,
        vae: Any,
        images: torch.Tensor,
        mode: LatentMode,
        generator: torch.Generator,
        batch_size: int = 16,
        flip: bool = False,
    ) -> LatentCache:
        """Encode ``images`` (``[N, 3, H, W]`` in ``[-1, 1]``) with a diffusers ``AutoencoderKL``.

        Latents are ``(z - shift_factor) * scaling_factor`` (``shift_factor`` only where the VAE config has
        one, e.g. SD3/Flux). The VAE runs in its own device and dtype under ``torch.no_grad()``. With
        ``flip`` the left-right mirrored images are encoded too, after all the originals, so the
        originals' ``once`` samples are the same with and without ``flip``.
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {list(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("no images to encode")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        param = next(vae.parameters())
        device, dtype = param.device, param.dtype
        scale = float(_config_value(vae.config, "scaling_factor"))
        shift = _config_value(vae.config, "shift_factor")
        shift = 0.0 if shift is None else float(shift)

        variants = [False, True] if flip else [False]
        means: list[torch.Tensor] = []
        stds: list[torch.Tensor] = []
        count = 0
        with torch.no_grad():
            for mirrored in variants:
                v_mean: list[torch.Tensor] = []
                v_std: list[torch.Tensor] = []
                for start in range(0, images.shape[0], batch_size):
                    x = images[start : start + batch_size]
                    if mirrored:
                        x = torch.flip(x, dims=[3])
                    dist = vae.encode(x.to(device=device, dtype=dtype)).latent_dist
                    count += x.shape[0]
                    if mode == "once":
                        z = dist.sample(generator=generator)
                    else:
                        z = dist.mean
                    v_mean.append(((z.float() - shift) * scale).cpu())
                    if mode == "random":
                        v_std.append((dist.std.float() * scale).cpu())
                means.append(torch.cat(v_mean))
                if mode == "random":
                    stds.append(torch.cat(v_std))
        std = torch.stack(stds) if mode == "random" else None
        return cls(mode, torch.stack(means), std, count)

    def __len__(self) -> int:
        """Number of images (mirrored copies are not counted)."""
        return self._mean.shape[1]

    @property
    def flip(self) -> bool:
        """Whether mirrored latents are stored (and picked half the time by :meth:`get`)."""
        return self._mean.shape[0] == 2

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of one latent."""
        c, h, w = self._mean.shape[2:]
        return (c, h, w)

    def get(self, indices: torch.Tensor | Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """Latents ``[B, C, h, w]`` (float32, CPU) of the images at ``indices``.

        The result depends only on ``indices`` and the generator's state. The generator is used, in this
        order, for the mirror choice of each item (with ``flip``: one ``torch.rand`` of B values, mirrored
        where < 0.5) and for the noise of ``random`` mode (one ``torch.randn`` of the batch's shape). For
        ``once``/``deterministic`` without ``flip`` it is not touched.
        """
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"latent index out of range for {n} images: {idx.tolist()}")
        if self.flip:
            draw = torch.rand(idx.shape[0], generator=generator, device=generator.device).cpu()
            variant = (draw < 0.5).long()
        else:
            variant = torch.zeros_like(idx)
        latents = self._mean[variant, idx]  # advanced indexing copies: callers may modify the batch
        if self._std is not None:
            noise = torch.randn(latents.shape, generator=generator, device=generator.device).cpu()
            latents = latents + self._std[variant, idx] * noise
        return latents
