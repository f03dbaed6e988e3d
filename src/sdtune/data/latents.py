"""VAE latents of the training images, encoded once and kept in memory.

Encoding is the slowest part of a small training step, and the images never change, so every image is
run through the VAE once before training (as A1111's textual-inversion dataset and kohya's
``cache_latents`` do). The three ``mode`` values are A1111's "latent sampling method":

- ``once``: draw one sample from the VAE posterior at encode time and reuse it every step;
- ``deterministic``: use the posterior mean;
- ``random``: keep mean and std and draw a new sample every step.

With ``data.cache_dir``, :meth:`LatentCache.encode_files` keeps each image's posterior on disk across runs
(:mod:`sdtune.data.disk_cache`) and encodes only images it has not seen with these settings and this VAE.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from sdtune.data.disk_cache import DiskCache, digest, file_digest, latent_key, module_fingerprint

LatentMode = Literal["once", "deterministic", "random"]
_MODES = ("once", "deterministic", "random")

ENCODE_PIXEL_BUDGET = 2 * 512 * 512
"""Pixels one VAE encode call takes at most (16 images at most): 2 images at 512 px, 1 at 1024 px, 16 at 256 px.
The VAE's activations, not the images, set the start-up peak; at 512 px in fp32 one image's encode holds about
0.5 GB of them, so the chunk shrinks as the side grows instead of a fixed 16 (2 x 8 GB at 1024 px)."""

Progress = Callable[[int, int], None]
"""``progress(done, total)``: called after each encoded chunk."""


def encode_batch_size(height: int, width: int, limit: int = 16) -> int:
    """Images per VAE encode call at ``height`` x ``width`` (see :data:`ENCODE_PIXEL_BUDGET`)."""
    return max(1, min(limit, ENCODE_PIXEL_BUDGET // max(1, height * width)))


class ImageFiles:
    """Image files decoded on demand, one chunk at a time, so a whole dataset never sits in memory at once.

    ``load(path)`` returns ``[3, H, W]`` in ``[-1, 1]``; ``files[a:b]`` is the stacked chunk ``[b - a, 3, H, W]``.
    """

    def __init__(self, paths: Sequence[Path], load: Callable[[Path], torch.Tensor], size: tuple[int, int]) -> None:
        self.paths, self.load, self.size = list(paths), load, size  # size: (width, height) every image decodes to

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, chunk: slice) -> torch.Tensor:
        return torch.stack([self.load(p) for p in self.paths[chunk]])


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
        images: torch.Tensor | ImageFiles,
        mode: LatentMode,
        generator: torch.Generator,
        batch_size: int | None = None,
        flip: bool = False,
        progress: Progress | None = None,
    ) -> LatentCache:
        """Encode ``images`` (``[N, 3, H, W]`` in ``[-1, 1]``, or :class:`ImageFiles` decoded a chunk at a time)
        with a diffusers ``AutoencoderKL``, ``batch_size`` images per call (default :func:`encode_batch_size`).

        Latents are ``(z - shift_factor) * scaling_factor`` (``shift_factor`` only where the VAE config has
        one, e.g. SD3/Flux). The VAE runs in its own device and dtype under ``torch.no_grad()``. With
        ``flip`` the left-right mirrored images are encoded too, after all the originals, so the
        originals' ``once`` samples are the same with and without ``flip``.
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"images must be [N, 3, H, W], got {list(images.shape)}")
            height, width = images.shape[2:]
        else:
            width, height = images.size
        if len(images) == 0:
            raise ValueError("no images to encode")
        batch_size = encode_batch_size(height, width) if batch_size is None else batch_size
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
        total = len(images) * len(variants)
        with torch.no_grad():
            for mirrored in variants:
                v_mean: list[torch.Tensor] = []
                v_std: list[torch.Tensor] = []
                for start in range(0, len(images), batch_size):
                    x = images[start : start + batch_size]
                    if mirrored:
                        x = torch.flip(x, dims=[3])
                    dist = vae.encode(x.to(device=device, dtype=dtype)).latent_dist
                    del x
                    count += dist.mean.shape[0]
                    if mode == "once":
                        z = dist.sample(generator=generator)
                    else:
                        z = dist.mean
                    v_mean.append(((z.float() - shift) * scale).cpu())
                    if mode == "random":
                        v_std.append((dist.std.float() * scale).cpu())
                    del dist, z
                    if progress is not None:
                        progress(count, total)
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
        return self.get_with_flips(indices, generator)[0]

    def get_with_flips(
        self, indices: torch.Tensor | Sequence[int], generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`get`, plus which items came back mirrored (bool ``[B]``), so that per-pixel loss weights can be
        mirrored with them. Uses the generator exactly as :meth:`get` does."""
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
        return latents, variant.bool()

    @classmethod
    def encode_files(
        cls,
        vae: Any,
        paths: Sequence[Path],
        load: Callable[[Path], torch.Tensor],
        resolution: int | tuple[int, int],
        mode: LatentMode,
        seed: int,
        disk: DiskCache,
        flip: bool = False,
        batch_size: int | None = None,
        progress: Progress | None = None,
    ) -> LatentCache:
        """Like :meth:`encode`, for image files, through a disk cache (``data.cache_dir``).

        Each image's scaled posterior (mean and std) is stored under :func:`~sdtune.data.disk_cache.latent_key`
        (its bytes, the crop rule, ``resolution`` (a side, or a bucket's ``(width, height)``), mirroring and the
        VAE's identity); only images without a stored
        posterior are decoded (``load(path)`` -> ``[3, H, W]`` in ``[-1, 1]``) and encoded, so ``encoded_count``
        counts real VAE encodes. One stored posterior serves all three modes. The ``once`` sample of an image is
        drawn from a generator seeded by (``seed``, its key): it does not depend on which other images are loaded.
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if not paths:
            raise ValueError("no images to encode")
        param = next(vae.parameters())
        device, dtype = param.device, param.dtype
        scale = float(_config_value(vae.config, "scaling_factor"))
        shift = _config_value(vae.config, "shift_factor")
        shift = 0.0 if shift is None else float(shift)
        identity = module_fingerprint([vae])
        contents = [file_digest(p) for p in paths]
        variants = [False, True] if flip else [False]
        keys = {(v, i): latent_key(contents[i], resolution, v, identity) for v in variants for i in range(len(paths))}
        found: dict[tuple[bool, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for vi, key in keys.items():
            stored = disk.get(key)
            if stored is not None:
                found[vi] = (stored["mean"], stored["std"])
        need = [i for i in range(len(paths)) if any((v, i) not in found for v in variants)]
        if batch_size is None:
            width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
            batch_size = encode_batch_size(height, width)
        total = sum((v, i) not in found for v in variants for i in need)
        count = 0
        with torch.no_grad():
            for start in range(0, len(need), batch_size):
                chunk = need[start : start + batch_size]
                images = torch.stack([load(paths[i]) for i in chunk])
                for mirrored in variants:
                    rows = [j for j, i in enumerate(chunk) if (mirrored, i) not in found]
                    if not rows:
                        continue
                    x = images[rows]
                    if mirrored:
                        x = torch.flip(x, dims=[3])
                    dist = vae.encode(x.to(device=device, dtype=dtype)).latent_dist
                    count += len(rows)
                    means = ((dist.mean.float() - shift) * scale).cpu()
                    stds = (dist.std.float() * scale).cpu()
                    for r, j in enumerate(rows):
                        vi = (mirrored, chunk[j])
                        found[vi] = (means[r].clone(), stds[r].clone())
                        disk.put(keys[vi], {"mean": found[vi][0], "std": found[vi][1]})
                    if progress is not None:
                        progress(count, total)
        means, stds = [], []
        for mirrored in variants:
            v_mean = torch.stack([found[(mirrored, i)][0] for i in range(len(paths))]).float()
            v_std = torch.stack([found[(mirrored, i)][1] for i in range(len(paths))]).float()
            if mode == "once":
                noise = torch.stack(
                    [
                        torch.randn(v_mean.shape[1:], generator=_key_generator(seed, keys[(mirrored, i)]))
                        for i in range(len(paths))
                    ]
                )
                v_mean = v_mean + v_std * noise
            means.append(v_mean)
            stds.append(v_std)
        return cls(mode, torch.stack(means), torch.stack(stds) if mode == "random" else None, count)


def _key_generator(seed: int, key: str) -> torch.Generator:
    """A generator that depends only on ``seed`` and a cache key."""
    return torch.Generator().manual_seed(int(digest(seed, key)[:15], 16))
