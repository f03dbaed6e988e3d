"""Noise, timesteps, targets and loss weights for diffusion training: small pure functions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def per_sample_noise(
    shape: Sequence[int],
    generators: Sequence[torch.Generator],
    offset: float = 0.0,
    multires_iterations: int = 0,
    multires_discount: float = 0.3,
) -> torch.Tensor:
    """Gaussian noise, one generator per sample, so a sample's noise does not depend on how the batch is split.

    ``offset`` adds offset noise (Guttenberg 2023, "Diffusion with Offset Noise"): a per-channel constant shift
    ``offset * N(0, 1)`` that lets the model learn very dark or very bright images. ``multires_iterations`` then
    turns it into multi-resolution noise (:func:`pyramid_noise`), as kohya applies the two in that order.
    """
    noise = torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])
    if offset > 0:
        shift = torch.stack([torch.randn(shape[0], 1, 1, generator=g) for g in generators])
        noise = noise + offset * shift
    if multires_iterations > 0:
        pairs = zip(noise, generators, strict=True)
        noise = torch.stack([pyramid_noise(n, g, multires_iterations, multires_discount) for n, g in pairs])
    return noise


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise of one sample's ``noise`` ``[C, H, W]`` (Whitaker 2023, "Multi-Resolution
    Noise for Diffusion Model Training"; kohya-ss/sd-scripts ``pyramid_noise_like``).

    For level i = 0 .. iterations - 1: r_i = 2 + 2 u_i (u_i uniform in [0, 1)), a fresh N(0, 1) tensor of size
    ``max(1, int(H / r_i^i)) x max(1, int(W / r_i^i))`` is upsampled bilinearly to H x W (``align_corners=False``)
    and added with weight ``discount^i``; it stops after the level whose size reaches 1. The sum is divided by its
    standard deviation. Every draw comes from ``generator``, and the standard deviation is this sample's (kohya
    divides by the whole batch's), so a sample's noise does not depend on the batch it is in.
    """
    channels, height, width = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = 2.0 + 2.0 * float(torch.rand(1, generator=generator, dtype=torch.float64))
        h, w = max(1, int(height / r**i)), max(1, int(width / r**i))
        level = torch.randn(1, channels, h, w, generator=generator)
        out += torch.nn.functional.interpolate(level, size=(height, width), mode="bilinear")[0] * discount**i
        if h == 1 or w == 1:
            break
    return out / out.std()


def per_sample_timesteps(
    num_train_timesteps: int,
    generators: Sequence[torch.Generator],
    timestep_range: tuple[int, int] | None = None,
    shift: float = 1.0,
) -> torch.Tensor:
    """Training timesteps, one per sample from its own generator: uniform integers in ``timestep_range`` = [min, max)
    (default [0, T); kohya's ``--min_timestep`` / ``--max_timestep``), or with ``shift`` != 1 the shifted draw of
    :func:`shifted_timesteps`."""
    low, high = timestep_range or (0, num_train_timesteps)
    if shift == 1.0:
        return torch.cat([torch.randint(low, high, (1,), generator=g) for g in generators])
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    return shifted_timesteps(u, low, high, shift)


def shifted_timesteps(u: torch.Tensor, low: int, high: int, shift: float) -> torch.Tensor:
    """Timesteps in [low, high) from uniform ``u`` in [0, 1), shifted: ``low + floor((high - low) * s u / (1 + (s - 1)
    u))``. The map is SD3's timestep shift of the flow-matching sigmas (Esser et al. 2024, eq. 23) and OneTrainer's
    ``timestep_shift`` on the normalised timestep (``modules/modelSetup/mixin/ModelSetupNoiseMixin.py``); with the
    whole range [0, T) it is OneTrainer's ``int(T s t / ((s - 1) t + T))``. sdtune applies it within the range, so
    the range still bounds the timesteps. ``s`` > 1 draws noisier timesteps more often."""
    shifted = shift * u / (1 + (shift - 1) * u)
    return (low + torch.floor((high - low) * shifted)).long().clamp(low, high - 1)


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
    Finite at SNR 0 (zero terminal SNR, v-prediction only): the weight there is 0.
    """
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr.clamp(min=1e-8)


def debiased_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights of the debiased estimation loss (Yu et al. 2024, "Unmasking Bias in Diffusion Model
    Training", arXiv 2310.08442), as kohya-ss/sd-scripts ``apply_debiased_estimation`` computes them: with SNR capped
    at 1000 (it is infinite at t = 0 of some schedules), epsilon: 1 / sqrt(SNR); v-prediction: 1 / (SNR + 1)."""
    snr = torch.clamp(compute_snr(scheduler, timesteps), max=1000)
    if scheduler.config.prediction_type == "v_prediction":
        return 1 / (snr + 1)
    return 1 / torch.sqrt(snr)


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
