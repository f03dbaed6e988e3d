"""Tiny models survive every save/load path with identical outputs, and independent loaders agree."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from sdtune.models.components import SDComponents
from sdtune.models.loading import load_model, save_model
from sdtune.models.shipped import materialize_config_dir

FAMILIES = ["sd1", "sd2-v", "sdxl", "sd1-inpaint"]


def _outputs(model: SDComponents) -> dict[str, torch.Tensor]:
    """UNet, VAE and text-encoder outputs on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    unet_cfg = model.unet.config
    sample = torch.randn(2, unet_cfg.in_channels, 8, 8, generator=g)
    context = torch.randn(2, 5, unet_cfg.cross_attention_dim, generator=g)
    kwargs = {}
    if unet_cfg.addition_embed_type == "text_time":
        pooled = model.text_encoders[-1].config.projection_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=g),
            "time_ids": torch.randn(2, 6, generator=g),
        }
    image = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    ids = model.tokenizers[0]("a photo of a cat", return_tensors="pt", padding="max_length").input_ids
    with torch.no_grad():
        out = {
            "unet": model.unet(sample, torch.tensor([10, 500]), context, **kwargs).sample,
            "vae_enc": model.vae.encode(image).latent_dist.mean,
            "vae_dec": model.vae.decode(torch.randn(1, 4, 8, 8, generator=g)).sample,
        }
        for i, te in enumerate(model.text_encoders):
            result = te(ids, output_hidden_states=True)
            out[f"te{i}"] = result.hidden_states[-2]
            if hasattr(result, "text_embeds"):
                out[f"te{i}_pooled"] = result.text_embeds
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0 if atol == 0 else 1e-3, msg=key)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("name", FAMILIES)
def test_single_file_round_trip_gives_identical_outputs(tiny_model, tmp_path, name, suffix):
    model = tiny_model(name)
    path = save_model(model, tmp_path / f"m{suffix}", dtype=torch.float32)
    loaded = load_model(path)
    assert loaded.family == model.family
    _assert_same(_outputs(model), _outputs(loaded))


@pytest.mark.parametrize("name", FAMILIES)
def test_diffusers_folder_round_trip_gives_identical_outputs(tiny_model, tmp_path, name):
    model = tiny_model(name)
    path = save_model(model, tmp_path / "folder", layout="diffusers", dtype=torch.float32)
    loaded = load_model(path)
    assert [type(t) for t in loaded.text_encoders] == [type(t) for t in model.text_encoders]
    _assert_same(_outputs(model), _outputs(loaded))


def test_half_precision_save_is_close_and_stored_as_fp16(tiny_model, tmp_path):
    from safetensors import safe_open

    model = tiny_model("sd1")
    path = save_model(model, tmp_path / "m.safetensors", dtype=torch.float16)
    with safe_open(str(path), "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F16"}
    _assert_same(_outputs(model), _outputs(load_model(path)), atol=2e-2)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_diffusers_from_single_file_reads_what_sdtune_writes(tiny_model, tmp_path, name):
    """diffusers' own single-file loader (with sdtune's shipped configs) gives the same modules."""
    model = tiny_model(name)
    path = save_model(model, tmp_path / "m.safetensors", dtype=torch.float32)
    config_dir = materialize_config_dir(model.family, tmp_path / "config", configs=model.configs())
    unet = UNet2DConditionModel.from_single_file(
        str(path), config=str(config_dir), subfolder="unet", local_files_only=True
    )
    vae = AutoencoderKL.from_single_file(str(path), config=str(config_dir), subfolder="vae", local_files_only=True)
    for ours, theirs in ((model.unet, unet), (model.vae, vae)):
        theirs_sd = theirs.state_dict()
        assert ours.state_dict().keys() == theirs_sd.keys()
        for key, value in ours.state_dict().items():
            assert torch.equal(value, theirs_sd[key].to(value.dtype)), key


def test_pipeline_from_single_file_generates_like_ours(tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    model = tiny_model("sd1")
    path = save_model(model, tmp_path / "m.safetensors", dtype=torch.float32)
    config_dir = materialize_config_dir(model.family, tmp_path / "config", configs=model.configs())
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(config_dir), local_files_only=True, safety_checker=None
    )
    ids = model.tokenizers[0]("a red circle", return_tensors="pt", padding="max_length").input_ids
    with torch.no_grad():
        ours = model.text_encoders[0](ids).last_hidden_state
        theirs = pipe.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(ours, theirs)
