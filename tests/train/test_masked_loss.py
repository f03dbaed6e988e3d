"""Per-pixel loss masks in the shared denoising loss: all-ones equals unmasked, masked-out pixels do not count."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from sdtune.models.text_encoding import Conditioning, encode_prompts
from sdtune.train.diffusion import denoising_loss
from sdtune.train.noise import diffusion_loss


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_all_ones_mask_is_exactly_the_unmasked_loss_on_a_real_unet(tiny_model):
    model = tiny_model("sd1")
    scheduler = model.noise_scheduler()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cond = encode_prompts(model, ["a red circle", "a blue star"])
        kwargs = dict(min_snr_gamma=5.0)
        plain = denoising_loss(model, scheduler, latents, cond, _gens(2), **kwargs)
        ones = denoising_loss(model, scheduler, latents, cond, _gens(2), mask=torch.ones(2, 1, 8, 8), **kwargs)
        half = torch.ones(2, 1, 8, 8)
        half[..., 4:] = 0
        masked = denoising_loss(model, scheduler, latents, cond, _gens(2), mask=half, **kwargs)
    assert torch.equal(plain, ones)
    assert not torch.equal(plain, masked)


class PointwiseUNet(torch.nn.Module):
    """A 1x1-convolution 'UNet': each output pixel depends only on the same input pixel."""

    dtype = torch.float32

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x, t, context, **kwargs):
        return SimpleNamespace(sample=self.conv(x))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_right_half_mask_makes_the_loss_blind_to_the_right_half(prediction_type):
    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=[4, 4, 4, 4]))  # pixels per latent: 8
    model = SimpleNamespace(unet=PointwiseUNet(), vae=vae)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    cond = Conditioning(torch.zeros(2, 4, 8))
    mask = torch.ones(2, 1, 8, 8)
    mask[..., 4:] = 0  # right half of the latent grid ignored
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def loss(x):
        with torch.no_grad():
            return denoising_loss(model, scheduler, x, cond, _gens(2), mask=mask)

    right, left = latents.clone(), latents.clone()
    right[..., 4:] += 5 * torch.randn(2, 4, 8, 4)
    left[..., :4] += 5 * torch.randn(2, 4, 8, 4)
    assert torch.equal(loss(latents), loss(right))
    assert not torch.allclose(loss(latents), loss(left))


def test_mask_weighted_mean_per_sample():
    pred = torch.zeros(2, 3, 2, 2)
    wanted = torch.ones(2, 3, 2, 2)
    wanted[1] = 3.0  # sample 1 errors 9
    mask = torch.tensor([1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 2, 2).repeat(2, 1, 1, 1)
    mask[1] = 0.0  # sample 1 fully masked: contributes 0
    assert diffusion_loss(pred, wanted, mask=mask).item() == pytest.approx(0.5)
    wanted[0, :, 0, 1] = 100.0  # a masked-out pixel
    assert diffusion_loss(pred, wanted, mask=mask).item() == pytest.approx(0.5)
