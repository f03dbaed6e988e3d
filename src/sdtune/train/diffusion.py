"""The denoising loss every diffusion-training method shares: noise a latent at a random timestep, predict."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sdtune.models.components import SDComponents
from sdtune.models.text_encoding import Conditioning
from sdtune.train.noise import diffusion_loss, min_snr_weights, per_sample_noise, per_sample_timesteps, target


def denoising_loss(
    model: SDComponents,
    scheduler,
    latents: torch.Tensor,
    cond: Conditioning,
    generators: Sequence[torch.Generator],
    *,
    resolution: int,
    noise_offset: float = 0.0,
    min_snr_gamma: float | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean (optionally Min-SNR- and per-sample-weighted) MSE of the UNet's prediction against its target.

    Sample i's noise and timestep come from ``generators[i]`` only (see :mod:`sdtune.train.loop`).
    """
    device, dtype = latents.device, model.unet.dtype
    noise = per_sample_noise(latents.shape[1:], generators, noise_offset).to(device)
    timesteps = per_sample_timesteps(scheduler.config.num_train_timesteps, generators).to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    extra = cond.unet_kwargs(resolution, resolution)
    prediction = model.unet(noisy.to(dtype), timesteps, cond.context.to(dtype), **extra).sample
    snr = min_snr_weights(scheduler, timesteps, min_snr_gamma) if min_snr_gamma else None
    if weights is not None:
        snr = weights.to(device) if snr is None else snr * weights.to(device)
    return diffusion_loss(prediction, target(scheduler, latents, noise, timesteps), snr)
