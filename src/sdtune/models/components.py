"""The parts of a Stable Diffusion model, loaded and ready: what every other layer receives.

Component names follow diffusers (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``) so that a
folder saved from these parts is a diffusers pipeline folder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdtune.models.family import ModelFamily

TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")
TOKENIZER_NAMES = ("tokenizer", "tokenizer_2")
COMPONENT_NAMES = ("unet", "vae", *TEXT_ENCODER_NAMES)

ComponentDtypes = torch.dtype | None | Mapping[str, torch.dtype | None]
"""A loader's precision: one dtype for every component, or one per component name (``None``: as stored)."""


def component_dtype(dtype: ComponentDtypes, name: str) -> torch.dtype | None:
    """The dtype component ``name`` loads in."""
    return dtype.get(name) if isinstance(dtype, Mapping) else dtype


@dataclass
class SDComponents:
    """A loaded Stable Diffusion model: its family, modules, tokenizers and noise-schedule config."""

    family: ModelFamily
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[CLIPTextModel | CLIPTextModelWithProjection]
    tokenizers: list[CLIPTokenizer]
    scheduler_config: dict[str, Any]
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def modules(self) -> dict[str, torch.nn.Module]:
        """The weight-holding modules by diffusers component name."""
        out: dict[str, torch.nn.Module] = {"unet": self.unet, "vae": self.vae}
        out.update(zip(TEXT_ENCODER_NAMES, self.text_encoders, strict=False))
        return out

    def configs(self) -> dict[str, dict[str, Any]]:
        """Plain-dict configs of every component (enough to rebuild them), plus the scheduler's."""
        out = {
            "unet": _public(dict(self.unet.config)),
            "vae": _public(dict(self.vae.config)),
            "scheduler": dict(self.scheduler_config),
        }
        for name, te in zip(TEXT_ENCODER_NAMES, self.text_encoders, strict=False):
            out[name] = _public(te.config.to_diff_dict()) | {"architectures": [type(te).__name__]}
        return out

    def noise_scheduler(self) -> DDPMScheduler:
        """The training noise schedule (DDPM with this model's betas and prediction type)."""
        return self.noise_scheduler_from(dict(self.scheduler_config, prediction_type=self.family.prediction_type))

    @staticmethod
    def noise_scheduler_from(config: dict[str, Any]) -> DDPMScheduler:
        """A DDPM noise schedule from a scheduler config of any sampler class."""
        return DDPMScheduler.from_config({k: v for k, v in config.items() if not k.startswith("_")})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SDComponents:
        for module in self.modules().values():
            module.to(device=device, dtype=dtype)
        return self

    def parameter_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in self.modules().items()}


def build_modules(configs: dict[str, dict[str, Any]], *, empty: bool = False) -> dict[str, torch.nn.Module]:
    """Build UNet, VAE and text encoders from component configs; ``empty`` builds on the meta device."""
    context = init_empty_weights() if empty else contextlib.nullcontext()
    out: dict[str, torch.nn.Module] = {}
    with context:
        out["unet"] = UNet2DConditionModel.from_config(_public(configs["unet"]))
        out["vae"] = AutoencoderKL.from_config(_public(configs["vae"]))
        for name in TEXT_ENCODER_NAMES:
            if name in configs:
                cfg = _public(configs[name])
                cls = (
                    CLIPTextModelWithProjection
                    if "CLIPTextModelWithProjection" in cfg.get("architectures", [])
                    else CLIPTextModel
                )
                out[name] = cls(CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    return out


def _public(config: dict[str, Any]) -> dict[str, Any]:
    # Drop bookkeeping keys (``_class_name``, ``_diffusers_version``, ``transformers_version``).
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}


def vae_scale_factor(components: SDComponents) -> int:
    """Image pixels per latent pixel along a side (8 for every Stable Diffusion VAE)."""
    return 2 ** (len(components.vae.config.block_out_channels) - 1)


def native_size(components: SDComponents) -> int:
    """Pixels per side the model was trained at (from the UNet's sample size and the VAE's downsampling)."""
    return int(components.unet.config.sample_size) * vae_scale_factor(components)
