"""sdtune's built-in base model: a tiny SD 1.x-class pipeline trained from scratch on the shapes world.

It uses the real classes (``AutoencoderKL``, ``UNet2DConditionModel``, ``CLIPTextModel`` with the real CLIP
tokenizer) and SD 1.x's noise schedule (scaled_linear, beta 0.00085-0.012, 1,000 steps, epsilon), so training
recipes behave as they do on SD 1.5, but it is small enough to train and evaluate on a CPU in minutes. The
weights are committed under ``models/assets/builtin`` as a diffusers folder; ``sdtune builtin build`` makes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdtune.core.errors import ModelError
from sdtune.models.tokenizers import ASSETS

BUILTIN_DIR = ASSETS / "builtin"
RESOLUTION = 64

# The architecture, as diffusers / transformers configs. VAE: 64 px -> 16x16x4 latents (three levels).
# UNet: attention at 16x16 and 8x8 like SD 1.x's upper levels. Text: CLIP-L's layout at width 64.
VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "act_fn": "silu",
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "sample_size": RESOLUTION,
    "scaling_factor": 1.0,  # replaced by 1/std of the latents after VAE training
}
UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": RESOLUTION // 4,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [64, 96, 128],
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": 4,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 64,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}


def builtin_configs() -> dict[str, dict[str, Any]]:
    """Component configs of the built-in model (before training fixes the VAE scaling factor)."""
    from sdtune.models.family import ModelFamily
    from sdtune.models.shipped import shipped_configs

    return {
        "unet": dict(UNET_CONFIG),
        "vae": dict(VAE_CONFIG),
        "text_encoder": dict(TEXT_ENCODER_CONFIG),
        "scheduler": shipped_configs(ModelFamily("sd1"))["scheduler"],
    }


def builtin_path() -> Path:
    """The folder of the committed built-in model; an error says how to build it when it is missing."""
    if not (BUILTIN_DIR / "model_index.json").is_file():
        raise ModelError(f"{BUILTIN_DIR}: the built-in model is not built; run `sdtune builtin build`")
    return BUILTIN_DIR
