"""The denoising loss every diffusion-training method shares: noise a latent at a random timestep, predict.

Also the validation loss: the same loss at fixed noise and fixed timesteps spread over the schedule, so two
evaluations of the same weights give the same number and evaluations at different steps are comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from sdtune.models.components import SDComponents, vae_scale_factor
from sdtune.models.text_encoding import Conditioning
from sdtune.train.noise import diffusion_loss, min_snr_weights, per_sample_noise, per_sample_timesteps, target


def denoising_loss(
    model: SDComponents,
    scheduler,
    latents: torch.Tensor,
    cond: Conditioning,
    generators: Sequence[torch.Generator],
    *,
    noise_offset: float = 0.0,
    min_snr_gamma: float | None = None,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean (optionally Min-SNR-, per-sample- and per-pixel-weighted) MSE of the UNet's prediction against its target.

    Sample i's noise and timestep come from ``generators[i]`` only (see :mod:`sdtune.train.loop`). ``mask``
    (``[B, 1, h, w]`` at latent resolution, e.g. from :meth:`sdtune.data.dataset.ImageCaptionSet.latents_and_weights`)
    weights pixels, normalised per sample so an all-ones mask equals no mask. ``timesteps`` (``[B]``) replaces the
    random draw (validation); the noise still comes from the generators. SDXL's size conditioning is the latents'
    size in pixels (a bucket's size with ``data.buckets``).
    """
    device, dtype = latents.device, model.unet.dtype
    noise = per_sample_noise(latents.shape[1:], generators, noise_offset).to(device)
    if timesteps is None:
        timesteps = per_sample_timesteps(scheduler.config.num_train_timesteps, generators)
    timesteps = timesteps.to(device=device, dtype=torch.long)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    factor = vae_scale_factor(model)  # the image size (SDXL's size conditioning) follows the latents: buckets
    extra = cond.unet_kwargs(latents.shape[-2] * factor, latents.shape[-1] * factor)
    prediction = model.unet(noisy.to(dtype), timesteps, cond.context.to(dtype), **extra).sample
    snr = min_snr_weights(scheduler, timesteps, min_snr_gamma) if min_snr_gamma else None
    if weights is not None:
        snr = weights.to(device) if snr is None else snr * weights.to(device)
    mask = mask.to(device) if mask is not None else None
    return diffusion_loss(prediction, target(scheduler, latents, noise, timesteps), snr, mask)


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
