"""The denoising loss every diffusion-training method shares: noise a latent at a random timestep, predict.

Also the validation loss: the same loss at fixed noise and fixed timesteps spread over the schedule, so two
evaluations of the same weights give the same number and evaluations at different steps are comparable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from sdtune.models.components import SDComponents, vae_scale_factor
from sdtune.models.text_encoding import Conditioning
from sdtune.train.noise import (
    debiased_weights,
    diffusion_loss,
    min_snr_weights,
    per_sample_noise,
    per_sample_timesteps,
    target,
)


def denoising_loss(
    model: SDComponents,
    scheduler,
    latents: torch.Tensor,
    cond: Conditioning,
    generators: Sequence[torch.Generator],
    *,
    noise_offset: float = 0.0,
    min_snr_gamma: float | None = None,
    debiased_estimation: bool = False,
    multires_noise_iterations: int = 0,
    multires_noise_discount: float = 0.3,
    input_perturbation: float = 0.0,
    timestep_range: tuple[int, int] | None = None,
    timestep_shift: float = 1.0,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    target_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    target_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean (optionally Min-SNR-, debiased-, per-sample- and per-pixel-weighted) MSE of the UNet's prediction against
    its target.

    Sample i's noise, timestep and input perturbation come from ``generators[i]`` only (see
    :mod:`sdtune.train.loop`), drawn in that order. Training options (:class:`sdtune.config.blocks.TrainConfig`):
    offset and multi-resolution noise (:func:`~sdtune.train.noise.per_sample_noise`), the timesteps' range and shift
    (:func:`~sdtune.train.noise.per_sample_timesteps`), input perturbation (Ning et al. 2023: the UNet sees
    ``add_noise(latents, noise + gamma * N(0, 1), t)`` while the target is made from ``noise``), the loss weights of
    Min-SNR and debiased estimation (multiplied when both are on, as kohya does). ``mask`` (``[B, 1, h, w]`` at
    latent resolution, e.g. from :meth:`sdtune.data.dataset.ImageCaptionSet.latents_and_weights`) weights pixels,
    normalised per sample so an all-ones mask equals no mask. ``timesteps`` (``[B]``) replaces the random draw: the
    validation loss, which measures the plain denoising error, so multi-resolution noise and input perturbation are
    left out (offset noise and the loss weights stay). SDXL's size conditioning is the latents' size in pixels (a
    bucket's size with ``data.buckets``). ``target_fn(noisy, timesteps)`` replaces the target (noise or velocity)
    of the samples ``target_rows`` (default: all) with another model's prediction on the same input, e.g. the frozen
    base model's (:mod:`sdtune.train.preservation`).
    """
    device, dtype = latents.device, model.unet.dtype
    training = timesteps is None
    multires = multires_noise_iterations if training else 0
    noise = per_sample_noise(latents.shape[1:], generators, noise_offset, multires, multires_noise_discount).to(device)
    if training:
        T = scheduler.config.num_train_timesteps
        timesteps = per_sample_timesteps(T, generators, timestep_range, timestep_shift)
    timesteps = timesteps.to(device=device, dtype=torch.long)
    model_noise = noise
    if training and input_perturbation > 0:
        extra = torch.stack([torch.randn(tuple(latents.shape[1:]), generator=g) for g in generators]).to(device)
        model_noise = noise + input_perturbation * extra
    noisy = scheduler.add_noise(latents, model_noise, timesteps)
    factor = vae_scale_factor(model)  # the image size (SDXL's size conditioning) follows the latents: buckets
    extra_cond = cond.unet_kwargs(latents.shape[-2] * factor, latents.shape[-1] * factor)
    prediction = model.unet(noisy.to(dtype), timesteps, cond.context.to(dtype), **extra_cond).sample
    factors = []  # per-sample loss weights, multiplied
    if min_snr_gamma:
        factors.append(min_snr_weights(scheduler, timesteps, min_snr_gamma))
    if debiased_estimation:
        factors.append(debiased_weights(scheduler, timesteps))
    if weights is not None:
        factors.append(weights.to(device))
    loss_weights = math.prod(factors[1:], start=factors[0]) if factors else None
    mask = mask.to(device) if mask is not None else None
    wanted = target(scheduler, latents, noise, timesteps)
    if target_fn is not None:
        rows = torch.arange(len(latents)) if target_rows is None else target_rows
        with torch.no_grad():
            other = target_fn(noisy[rows].to(dtype), timesteps[rows])
        wanted = wanted.index_copy(0, rows.to(wanted.device), other.to(wanted.dtype))
    return diffusion_loss(prediction, wanted, loss_weights, mask)


def validation_timesteps(num_train_timesteps: int, count: int) -> list[int]:
    """``count`` timesteps spread evenly over [0, T): the centres of ``count`` equal bins."""
    return [int((k + 0.5) * num_train_timesteps / count) for k in range(count)]


def validation_generator(seed: int, example: int, slot: int) -> torch.Generator:
    """The generator of validation example ``example`` at timestep slot ``slot``: fixed for a seed, and apart
    from the training stream's generators (a different seed sequence)."""
    state = np.random.SeedSequence([seed, 0x5D7A11, example, slot]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


BatchLoss = Callable[[list[int], list[torch.Generator], torch.Tensor], torch.Tensor]


@torch.no_grad()
def fixed_validation_loss(
    batch_loss: BatchLoss,
    num_examples: int,
    seed: int,
    num_train_timesteps: int,
    count: int,
    batch_size: int,
    groups: Sequence[int] | None = None,
) -> float:
    """Mean loss over every validation example at each of ``count`` fixed timesteps.

    ``batch_loss(indices, generators, timesteps)`` is a method's loss on validation examples with the given
    timesteps; example i at slot k draws its noise (and any caption or latent choice) from
    :func:`validation_generator`, created afresh each call, so the same weights always give the same value.
    With ``groups`` (each example's size group: aspect-ratio buckets) a batch never mixes groups.
    """
    steps = validation_timesteps(num_train_timesteps, count)
    ids = list(groups) if groups is not None else [0] * num_examples
    total, seen = 0.0, 0
    for group in sorted(set(ids)):
        pairs = [(i, k) for i in range(num_examples) if ids[i] == group for k in range(count)]
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            generators = [validation_generator(seed, i, k) for i, k in chunk]
            timesteps = torch.tensor([steps[k] for _, k in chunk], dtype=torch.long)
            loss = batch_loss([i for i, _ in chunk], generators, timesteps)
            total += float(loss) * len(chunk)
            seen += len(chunk)
    return total / max(seen, 1)
