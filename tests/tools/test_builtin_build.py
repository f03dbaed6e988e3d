"""The built-in model's build script, run for a few steps at a much smaller scale: it learns and resumes."""

from __future__ import annotations

import time

import torch

from sdtune.models.loading import load_model
from sdtune.tools.builtin_build import Build, BuildSettings

SMALL = BuildSettings(
    vae_steps=40,
    vae_batch=8,
    vae_lr=2e-3,
    pool_size=256,
    unet_steps=40,
    unet_batch=8,
    warmup=5,
    checkpoint_every=20,
    log_every=5,
)


def _losses(build: Build, stage: str) -> list[float]:
    return [row["loss"] for row in build.state["log"] if row["stage"] == stage]


def test_small_build_losses_fall_and_export_loads(tmp_path):
    build = Build(tmp_path / "work", SMALL)
    assert build.run(time.time() + 300)
    assert len(_losses(build, "decoder")) == 2
    for stage in ("vae", "unet"):
        losses = _losses(build, stage)
        assert len(losses) == 8
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, (stage, losses)
    out = build.export(tmp_path / "model")
    model = load_model(out)
    assert model.family.name == "sd1"
    assert model.vae.config.scaling_factor != 1.0  # set from the latents' spread
    assert (out / "tokenizer" / "vocab.json").is_file()


def test_build_resumes_where_it_stopped(tmp_path):
    """Stopped by its deadline mid-UNet and resumed, the build continues from its last saved step."""
    settings = BuildSettings(**{**SMALL.__dict__, "unet_steps": 30, "checkpoint_every": 10})
    build = Build(tmp_path / "work", settings)
    while build.state["stage"] != "unet":
        build.run(time.time() + 60)
    build.run(time.time() - 1)  # deadline already passed: saves and returns at once
    step_before = build.state["step"]
    resumed = Build(tmp_path / "work", settings)
    assert resumed.state["stage"] == "unet" and resumed.state["step"] == step_before
    assert resumed.run(time.time() + 300)
    assert resumed.state["stage"] == "done"
    # the VAE encoder was final before the UNet stage: resuming must not have touched it (latents stay valid)
    for a, b in zip(
        build.modules["vae"].encoder.parameters(), resumed.modules["vae"].encoder.parameters(), strict=True
    ):
        assert torch.equal(a, b)
