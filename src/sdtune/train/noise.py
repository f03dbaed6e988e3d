"""Noise, timesteps, targets and loss weights for diffusion training: small pure functions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def per_sample_noise(shape: Sequence[int], generators: Sequence[torch.Generator], offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise, one generator per sample, so a sample's noise does not depend on how the batch is split.

    ``offset`` adds offset noise (Guttenberg 2023, "Diffusion with Offset Noise"): a per-channel constant shift
    ``offset * N(0, 1)`` that lets the model learn very dark or very bright images.
    """
    noise = torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])
    if offset > 0:
        shift = torch.stack([torch.randn(shape[0], 1, 1, generator=g) for g in generators])
        noise = noise + offset * shift
    return noise


def per_sample_timesteps(num_train_timesteps: int, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Uniform training timesteps in [0, T), one per sample from its own generator."""
    return torch.cat([torch.randint(0, num_train_timesteps, (1,), generator=g) for g in generators])


def target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (Salimans & Ho 2022)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}")


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023, arXiv 2303.09556).

    epsilon: min(SNR, gamma) / SNR; v-prediction: min(SNR, gamma) / (SNR + 1). SNR from diffusers' ``compute_snr``.
    """
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr.clamp(min=1e-8)


def diffusion_loss(
    prediction: torch.Tensor,
    wanted: torch.Tensor,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error per sample, weighted per sample (``weights [B]``), averaged over the batch.

    ``mask`` (``[B, 1, h, w]``, broadcast over channels) weights pixels: each sample's error is the mask-weighted
    mean, ``sum(mask * err) / (C * sum(mask))``, so an all-ones mask gives exactly the unmasked loss and the loss
    scale does not depend on how much of an image is masked in. A sample whose mask is all zeros contributes 0.
    """
    err = (prediction.float() - wanted.float()) ** 2
    dims = tuple(range(1, err.ndim))
    if mask is None:
        per_sample = err.mean(dim=dims)
    else:
        mask = mask.to(err)
        # mean / mean (not sum / sum): with an all-ones mask this is err.mean() / 1.0, bit for bit
        per_sample = (err * mask).mean(dim=dims) / mask.mean(dim=dims).clamp_min(1e-12)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()
