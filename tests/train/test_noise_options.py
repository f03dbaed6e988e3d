"""The noise and loss options of the shared denoising loss, each against an independent restatement of its formula
(kohya-ss/sd-scripts, OneTrainer, Lin et al. 2023, Ning et al. 2023), on small tensors.

Every restatement below is written from the source, not from sdtune's code: kohya's ``pyramid_noise_like`` (with
``torch.nn.Upsample`` and Python's loop), ``apply_debiased_estimation`` (SNR from ``alphas_cumprod``), Lin et al.'s
Algorithm 1 for the zero-terminal-SNR betas, OneTrainer's shifted timestep, diffusers' ``--input_perturbation``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from sdtune.models.text_encoding import Conditioning
from sdtune.train.diffusion import denoising_loss
from sdtune.train.noise import (
    debiased_weights,
    min_snr_weights,
    per_sample_noise,
    per_sample_timesteps,
    pyramid_noise,
    shifted_timesteps,
)


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _sd_scheduler(prediction_type: str = "epsilon", **extra) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        **extra,
    )


# -- multi-resolution noise ------------------------------------------------------------------------------------


def kohya_pyramid(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """kohya's ``pyramid_noise_like`` for one sample (batch of 1), its ``random.random()`` and ``torch.randn`` drawn
    from ``generator`` in the same order: per level one uniform number, then the level's noise."""
    b, c, w, h = noise[None].shape  # kohya's names: w, h are dims 2 and 3
    u = torch.nn.Upsample(size=(w, h), mode="bilinear")
    noise = noise[None].clone()
    for i in range(iterations):
        r = torch.rand(1, generator=generator, dtype=torch.float64).item() * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(torch.randn(b, c, wn, hn, generator=generator)) * discount**i
        if wn == 1 or hn == 1:
            break
    return (noise / noise.std())[0]


@pytest.mark.parametrize(("shape", "iterations", "discount"), [((4, 16, 12), 3, 0.5), ((2, 5, 7), 10, 0.3)])
def test_pyramid_noise_is_kohyas_pyramid_noise_like(shape, iterations, discount):
    # (2, 5, 7) with 10 levels reaches size 1 after a few: the loop must stop there, else it draws and adds more
    base = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    ours = pyramid_noise(base, torch.Generator().manual_seed(4), iterations, discount)
    theirs = kohya_pyramid(base, torch.Generator().manual_seed(4), iterations, discount)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert abs(float(ours.std()) - 1.0) < 1e-6
    assert (ours - base / base.std()).abs().max() > 0.1  # the coarse levels are really there


def test_multires_noise_of_a_sample_does_not_depend_on_its_batch():
    shape = (4, 8, 8)
    whole = per_sample_noise(shape, _gens(4), offset=0.1, multires_iterations=6, multires_discount=0.3)
    first = per_sample_noise(shape, _gens(2), offset=0.1, multires_iterations=6, multires_discount=0.3)
    second = per_sample_noise(shape, _gens(2, seed=2), offset=0.1, multires_iterations=6, multires_discount=0.3)
    assert torch.equal(whole, torch.cat([first, second]))
    # offset first, then the pyramid over it (kohya's order), each sample normalised by its own std
    g = torch.Generator().manual_seed(0)
    plain = torch.randn(shape, generator=g)
    shifted = plain + 0.1 * torch.randn(shape[0], 1, 1, generator=g)
    torch.testing.assert_close(whole[0], kohya_pyramid(shifted, g, 6, 0.3), rtol=0, atol=1e-6)
    assert [round(float(s.std()), 5) for s in whole] == [1.0] * 4


def test_no_multires_noise_is_the_plain_noise_bit_for_bit():
    shape = (4, 8, 8)
    g = _gens(3)
    expected = torch.stack([torch.randn(shape, generator=x) for x in _gens(3)])
    assert torch.equal(per_sample_noise(shape, g), expected)


# -- timesteps ---------------------------------------------------------------------------------------------------


def test_timestep_range_draws_kohyas_uniform_integers():
    got = per_sample_timesteps(1000, _gens(64), (200, 300))
    want = torch.cat([torch.randint(200, 300, (1,), generator=g) for g in _gens(64)])  # kohya get_timesteps
    assert torch.equal(got, want)
    assert int(got.min()) >= 200 and int(got.max()) <= 299
    assert torch.equal(per_sample_timesteps(1000, _gens(8)), per_sample_timesteps(1000, _gens(8), (0, 1000)))


def onetrainer_shift(u: float, shift: float, num_train_timesteps: int = 1000) -> int:
    """OneTrainer ``_get_timestep_discrete``, uniform distribution over the whole schedule, then ``.int()``."""
    t = num_train_timesteps * u
    return int(num_train_timesteps * shift * t / ((shift - 1) * t + num_train_timesteps))


@pytest.mark.parametrize("shift", [3.0, 0.5])
def test_shifted_timesteps_are_onetrainers_over_the_whole_schedule(shift):
    u = torch.tensor([0.0, 0.1, 0.37, 0.5, 0.9, 0.999], dtype=torch.float64)
    got = shifted_timesteps(u, 0, 1000, shift).tolist()
    assert got == [onetrainer_shift(float(x), shift) for x in u]
    if shift == 3.0:
        assert got[1:4] == [250, 637, 750]  # 3u / (1 + 2u) x 1000, rounded down


def test_shift_applies_within_the_range_and_draws_from_each_samples_generator():
    u = torch.tensor([0.0, 0.1, 0.5, 0.999], dtype=torch.float64)
    # 100 + floor(500 x 3u / (1 + 2u))
    assert shifted_timesteps(u, 100, 600, 3.0).tolist() == [100, 225, 475, 599]
    got = per_sample_timesteps(1000, _gens(16), (100, 600), 3.0)
    draws = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in _gens(16)])
    assert torch.equal(got, shifted_timesteps(draws, 100, 600, 3.0))
    many = per_sample_timesteps(1000, _gens(2000), None, 3.0).double()
    assert abs(float(many.mean()) / 1000 - (1.5 - 0.75 * math.log(3))) < 0.02  # E[3u / (1 + 2u)] = 0.676


# -- loss weights ------------------------------------------------------------------------------------------------


def kohya_all_snr(scheduler: DDPMScheduler) -> torch.Tensor:
    """kohya ``prepare_scheduler_for_custom_training``: (sqrt(a) / sqrt(1 - a))^2 of ``alphas_cumprod``."""
    a = scheduler.alphas_cumprod
    return (torch.sqrt(a) / torch.sqrt(1.0 - a)) ** 2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_debiased_weights_are_kohyas_apply_debiased_estimation(prediction_type):
    scheduler = _sd_scheduler(prediction_type)
    t = torch.tensor([0, 1, 10, 250, 500, 999])  # t = 0 has SNR ~1175 > 1000: kohya's cap matters there
    snr = torch.minimum(kohya_all_snr(scheduler)[t], torch.ones(len(t)) * 1000)
    want = 1 / (snr + 1) if prediction_type == "v_prediction" else 1 / torch.sqrt(snr)
    torch.testing.assert_close(debiased_weights(scheduler, t), want, rtol=1e-5, atol=0)
    assert float(kohya_all_snr(scheduler)[0]) > 1000


def test_zero_terminal_snr_schedule_is_lin_et_al_algorithm_1_and_weights_stay_finite():
    plain = _sd_scheduler("v_prediction")
    rescaled = _sd_scheduler("v_prediction", rescale_betas_zero_snr=True)
    # Lin et al. 2023, Algorithm 1, restated
    alphas_bar_sqrt = torch.cumprod(1 - plain.betas.double(), 0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2  # betas = 1 - alphas_bar[t] / alphas_bar[t - 1]; their cumprod is alphas_bar
    torch.testing.assert_close(rescaled.alphas_cumprod.double(), alphas_bar, rtol=0, atol=2e-6)
    assert float(plain.alphas_cumprod[-1]) > 4e-3 and float(rescaled.alphas_cumprod[-1]) == 0.0
    t = torch.tensor([0, 500, 998, 999])
    min_snr = min_snr_weights(rescaled, t, 5.0)
    debiased = debiased_weights(rescaled, t)
    assert torch.isfinite(min_snr).all() and torch.isfinite(debiased).all()
    assert float(min_snr[-1]) == 0.0 and float(debiased[-1]) == 1.0  # min(0, 5) / (0 + 1) and 1 / (0 + 1)


# -- the denoising loss: what the UNet sees and what it is compared with ----------------------------------------


class RecordingUNet(torch.nn.Module):
    """A 1x1-convolution 'UNet' that records its inputs."""

    dtype = torch.float32

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 1)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, context, **kwargs):
        self.seen.append((x.detach().clone(), t.detach().clone()))
        return SimpleNamespace(sample=self.conv(x))


def _model():
    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=[4, 4, 4, 4]))
    return SimpleNamespace(unet=RecordingUNet(), vae=vae)


LATENTS = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
COND = Conditioning(torch.zeros(3, 4, 8))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_input_perturbation_perturbs_what_the_unet_sees_and_keeps_the_target(prediction_type):
    model, scheduler, gamma = _model(), _sd_scheduler(prediction_type), 0.1
    with torch.no_grad():
        loss = denoising_loss(model, scheduler, LATENTS, COND, _gens(3), input_perturbation=gamma)
    # diffusers train_text_to_image --input_perturbation, per sample from its generator: noise, t, then the extra
    noise, t, extra = [], [], []
    for g in _gens(3):
        noise.append(torch.randn(4, 8, 8, generator=g))
        t.append(torch.randint(0, 1000, (1,), generator=g))
        extra.append(torch.randn(4, 8, 8, generator=g))
    noise, t, extra = torch.stack(noise), torch.cat(t), torch.stack(extra)
    noisy = scheduler.add_noise(LATENTS, noise + gamma * extra, t)
    seen_x, seen_t = model.unet.seen[-1]
    assert torch.equal(seen_t, t)
    torch.testing.assert_close(seen_x, noisy, rtol=0, atol=1e-6)
    wanted = noise if prediction_type == "epsilon" else scheduler.get_velocity(LATENTS, noise, t)
    with torch.no_grad():
        pred = model.unet.conv(noisy)
    torch.testing.assert_close(loss, ((pred - wanted) ** 2).mean(), rtol=1e-6, atol=0)
    perturbed = noise + gamma * extra
    wrong = perturbed if prediction_type == "epsilon" else scheduler.get_velocity(LATENTS, perturbed, t)
    assert abs(float(((pred - wrong) ** 2).mean()) - float(loss)) > 1e-4  # the target is not the perturbed noise


def test_validation_loss_uses_plain_noise_whatever_the_training_noise_options():
    scheduler, t = _sd_scheduler(), torch.tensor([100, 500, 900])
    options = dict(multires_noise_iterations=6, input_perturbation=0.2, timestep_range=(0, 10), timestep_shift=3.0)
    with torch.no_grad():
        plain = denoising_loss(_model(), scheduler, LATENTS, COND, _gens(3), timesteps=t)
        with_options = denoising_loss(_model(), scheduler, LATENTS, COND, _gens(3), timesteps=t, **options)
        training = denoising_loss(_model(), scheduler, LATENTS, COND, _gens(3), **options)
    assert torch.equal(plain, with_options)
    assert not torch.equal(plain, training)


def test_training_options_reach_the_unet_and_weights_multiply():
    model, scheduler = _model(), _sd_scheduler()
    options = dict(multires_noise_iterations=4, multires_noise_discount=0.5, timestep_range=(300, 700))
    with torch.no_grad():
        loss = denoising_loss(model, scheduler, LATENTS, COND, _gens(3), min_snr_gamma=5.0, debiased_estimation=True,
                              **options)  # fmt: skip
    seen_x, seen_t = model.unet.seen[-1]
    noise = per_sample_noise((4, 8, 8), _gens(3), 0.0, 4, 0.5)
    gens = _gens(3)
    for g in gens:  # the noise's draws come first
        per_sample_noise((4, 8, 8), [g], 0.0, 4, 0.5)
    t = torch.cat([torch.randint(300, 700, (1,), generator=g) for g in gens])
    assert torch.equal(seen_t, t)
    torch.testing.assert_close(seen_x, scheduler.add_noise(LATENTS, noise, t), rtol=0, atol=1e-6)
    snr = kohya_all_snr(scheduler)[t]
    weights = torch.clamp(snr, max=5.0) / snr * (1 / torch.sqrt(torch.clamp(snr, max=1000)))
    with torch.no_grad():
        per_sample = ((model.unet.conv(seen_x) - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, (per_sample * weights).mean(), rtol=1e-5, atol=0)


def test_schedule_options_on_the_model_config_and_a_range_beyond_the_models_schedule():
    from sdtune.config import LoraConfig
    from sdtune.core.errors import ConfigError
    from sdtune.train.recipe import apply_schedule_options

    raw = {"method": "lora", "name": "x", "data": {"path": "."}, "model": {"prediction_type": "v_prediction"}}
    cfg = LoraConfig.model_validate(raw | {"train": {"zero_terminal_snr": True, "timestep_range": [0, 800]}})
    model = SimpleNamespace(scheduler_config={"num_train_timesteps": 1000, "beta_schedule": "scaled_linear"})
    apply_schedule_options(cfg, model)
    assert model.scheduler_config["rescale_betas_zero_snr"] and model.scheduler_config["timestep_spacing"] == "trailing"
    short = SimpleNamespace(scheduler_config={"num_train_timesteps": 500})
    with pytest.raises(ConfigError) as exc:
        apply_schedule_options(cfg, short)
    message = "train.timestep_range: this model's schedule has 500 timesteps (got [0, 800]); e.g. [0, 500]"
    assert str(exc.value) == message
    plain = LoraConfig.model_validate(raw)
    untouched = SimpleNamespace(scheduler_config={"num_train_timesteps": 1000})
    apply_schedule_options(plain, untouched)
    assert untouched.scheduler_config == {"num_train_timesteps": 1000}
