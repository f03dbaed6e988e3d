"""Tiny Stable Diffusion models built in code, for tests.

Same classes and key names as the real SD 1.x, 2.x and XL models, at widths of 8-24 channels, so a model
builds in well under a second on a CPU and every conversion, adapter and training path can be exercised
without downloading weights (the idea of diffusers' ``get_dummy_components``).
"""

from __future__ import annotations

from typing import Any

import torch

from sdtune.models.components import SDComponents, build_modules
from sdtune.models.family import ModelFamily
from sdtune.models.shipped import shipped_configs, shipped_tokenizers

_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "projection_dim": 16,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
_VAE = {
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": 4,
    "in_channels": 3,
    "out_channels": 3,
    "sample_size": 32,
}


def tiny_configs(family: ModelFamily | str = "sd1") -> dict[str, dict[str, Any]]:
    """Component configs of a tiny model of ``family`` (real configs with narrow widths)."""
    family = ModelFamily.parse(family) if isinstance(family, str) else family
    real = shipped_configs(family)
    in_channels = 9 if family.inpainting else 4
    unet: dict[str, Any] = {
        "block_out_channels": [8, 16],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "sample_size": 16,
        "in_channels": in_channels,
        "out_channels": 4,
    }
    if family.arch == "sd1":
        te = [dict(_TEXT, hidden_act="quick_gelu", architectures=["CLIPTextModel"])]
        unet |= {
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "attention_head_dim": 2,
            "cross_attention_dim": 16,
        }
    elif family.arch == "sd2":
        te = [dict(_TEXT, hidden_act="gelu", num_hidden_layers=3, architectures=["CLIPTextModel"])]
        unet |= {
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "attention_head_dim": [2, 4],
            "cross_attention_dim": 16,
            "use_linear_projection": True,
        }
    else:
        te = [
            dict(
                _TEXT,
                hidden_size=8,
                intermediate_size=16,
                projection_dim=8,
                hidden_act="quick_gelu",
                architectures=["CLIPTextModel"],
            ),
            dict(_TEXT, hidden_act="gelu", architectures=["CLIPTextModelWithProjection"]),
        ]
        # SDXL: no attention in the first block, several transformer layers deeper, time/size conditioning.
        unet |= {
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": [2, 4],
            "transformer_layers_per_block": [1, 2],
            "layers_per_block": 2,
            "cross_attention_dim": 24,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 8 * 6 + 16,
        }
    configs = {"unet": real["unet"] | unet, "vae": real["vae"] | _VAE, "scheduler": real["scheduler"]}
    for name, cfg in zip(("text_encoder", "text_encoder_2"), te, strict=False):
        configs[name] = cfg
    return configs


def build_tiny(family: ModelFamily | str = "sd1", seed: int = 0) -> SDComponents:
    """A tiny randomly initialised model of ``family`` (deterministic for a given seed)."""
    family = ModelFamily.parse(family) if isinstance(family, str) else family
    return _random_model(family, tiny_configs(family), seed, f"tiny:{family.name}")


def build_real_size(family: ModelFamily | str = "sd1", seed: int = 0) -> SDComponents:
    """A model of ``family`` at its real width (the shipped configs: SD 1.5's 860M-parameter UNet, SDXL's 2.6B)
    with random weights, for memory and speed measurements of the real layout without downloading weights."""
    family = ModelFamily.parse(family) if isinstance(family, str) else family
    return _random_model(family, shipped_configs(family), seed, f"random:{family.name}")


def _random_model(family: ModelFamily, configs: dict[str, dict[str, Any]], seed: int, source: str) -> SDComponents:
    torch.manual_seed(seed)
    modules = build_modules(configs)
    return SDComponents(
        family=family,
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoders=[modules[n] for n in ("text_encoder", "text_encoder_2") if n in modules],
        tokenizers=shipped_tokenizers(family),
        scheduler_config=configs["scheduler"],
        source=source,
    )
