"""Which modules a concept model (LoRA family) adapts, by preset: the one table of target modules.

Names are module-name suffixes as peft matches them (``to_q`` matches every ``...attn1.to_q``). They are the
same for SD 1.x, 2.x and XL because diffusers and transformers name the layers alike across the families.

- ``attention``: the attention projections (kohya's default LoRA minus the feed-forward and projections)
- ``attention_ff``: + ``proj_in``/``proj_out`` and the feed-forward, i.e. every Linear in the transformer blocks
  (kohya ``networks.lora`` without ``conv_dim``)
- ``all``: + the ResNet and resampler convolutions and time-embedding projections (LoCon / LyCORIS ``full``)
"""

from __future__ import annotations

from typing import Literal

Preset = Literal["attention", "attention_ff", "all"]

UNET_TARGETS: dict[str, tuple[str, ...]] = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "attention_ff": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
    "all": (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
        "conv1",
        "conv2",
        "conv_shortcut",
        "time_emb_proj",
        "downsamplers.0.conv",
        "upsamplers.0.conv",
    ),
}
TEXT_ENCODER_TARGETS: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "attention_ff": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "all": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
