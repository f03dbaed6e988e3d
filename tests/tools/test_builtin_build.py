"""The built-in model's build script, run small: every stage runs, the losses fall, the export loads in diffusers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from rich.console import Console

from sdtune.tools.builtin_build import Build, BuildSettings

TINY = BuildSettings(
    vae_steps=12,
    vae_batch=8,
    pool_size=96,
    unet_steps=40,
    unet_batch=8,
    warmup=1,
    decoder_steps=3,
    decoder2_steps=3,
    pool2_size=32,
    unet2_steps=4,
    warmup2=1,
    log_every=1,
    checkpoint_every=20,
)


@pytest.mark.slow
def test_small_build_runs_every_stage_losses_fall_and_exports_a_pipeline(tmp_path) -> None:
    torch.set_num_threads(1)
    build = Build(tmp_path / "work", TINY, Console(quiet=True))
    assert build.run(float("inf"))
    log = build.state["log"]
    stages = [entry["stage"] for entry in log]
    assert list(dict.fromkeys(stages)) == ["vae", "unet", "decoder", "decoder2", "unet2"]

    def losses(stage: str) -> list[float]:
        return [entry["loss"] for entry in log if entry["stage"] == stage]

    unet, vae = losses("unet"), losses("vae")
    assert np.mean(unet[-8:]) < 0.6 * np.mean(unet[:4]), unet  # the denoiser learns from scratch
    assert np.mean(vae[-4:]) < np.mean(vae[:4]), vae
    pool, pool2 = (torch.load(tmp_path / "work" / n, weights_only=True) for n in ("pool.pt", "pool2.pt"))
    assert pool["latents"].shape == (96, 4, 16, 16) and pool2["latents"].shape == (32, 4, 16, 16)
    assert 0.5 < float(pool["latents"].float().std()) < 2.0  # scaled by the fitted scaling factor

    from diffusers import StableDiffusionPipeline

    out = build.export(tmp_path / "model")
    assert json.loads((out / "build.json").read_text())["settings"]["unet_steps"] == 40
    pipe = StableDiffusionPipeline.from_pretrained(
        out, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    image = pipe(
        "a red circle on a blue background", num_inference_steps=2, height=64, width=64, output_type="np"
    ).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
