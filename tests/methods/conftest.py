from __future__ import annotations

from pathlib import Path

import pytest
import torch

from image_folders import write_image_folder
from sdtune.models.loading import save_model


@pytest.fixture
def tiny_checkpoint(tiny_model, tmp_path_factory):
    """A tiny model of a family saved as a single file, as a user's checkpoint would be."""

    def make(family: str = "sd1") -> Path:
        path = tmp_path_factory.mktemp("model") / f"tiny-{family}.safetensors"
        return save_model(tiny_model(family), path, dtype=torch.float32)

    return make


@pytest.fixture
def image_folder(tmp_path):
    """Four small coloured images with .txt captions."""
    return write_image_folder(tmp_path / "images")


@pytest.fixture
def diffusers_pipelines(tmp_path_factory):
    """What diffusers itself makes of an exported whole model: ``load(folder, file, model)`` returns the pipelines
    of ``from_pretrained(folder)`` and ``from_single_file(file)`` (with sdtune's shipped configs at ``model``'s
    widths), so tests compare them with the model that trained."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from sdtune.models.shipped import materialize_config_dir

    def load(folder: Path, file: Path, model):
        config = materialize_config_dir(model.family, tmp_path_factory.mktemp("config"), configs=model.configs())
        pipeline = StableDiffusionXLPipeline if model.family.arch == "sdxl" else StableDiffusionPipeline
        extra = {} if pipeline is StableDiffusionXLPipeline else {"safety_checker": None}
        from_folder = pipeline.from_pretrained(str(folder), local_files_only=True, **extra)
        from_file = pipeline.from_single_file(str(file), config=str(config), local_files_only=True, **extra)
        return from_folder, from_file

    return load


@pytest.fixture
def unet_output():
    """``unet_output(unet)``: the UNet's prediction on fixed inputs, computed in fp32 (weights cast for the call)."""

    def run(unet) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        sample = torch.randn(1, unet.config.in_channels, 16, 16, generator=g)
        context = torch.randn(1, 7, unet.config.cross_attention_dim, generator=g)
        extra = {}
        if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding and size conditioning
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])
            extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled, generator=g), "time_ids": time_ids}}
        dtype, training = unet.dtype, unet.training
        unet.to(torch.float32).eval()
        try:
            with torch.no_grad():
                return unet(sample, torch.tensor([500]), context, **extra).sample
        finally:
            unet.to(dtype).train(training)

    return run


@pytest.fixture
def bf16_accelerator(accelerator_in):
    """An ``Accelerator`` in bf16 (see ``accelerator_in``)."""
    return accelerator_in("bf16")
