"""Seeded generation with a loaded model: diffusers' Stable Diffusion pipelines over sdtune's components."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from sdtune import __version__
from sdtune.adapters.hypernetwork import InstalledHypernetwork, install
from sdtune.core.errors import ModelError
from sdtune.formats.hypernetwork_file import load_hypernetwork
from sdtune.inference.infotext import format_infotext, save_png
from sdtune.inference.samplers import infotext_name, make_sampler
from sdtune.models.components import SDComponents, native_size  # noqa: F401 - re-exported


@dataclass(frozen=True)
class GenerationSettings:
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "ddim"
    width: int | None = None  # None = the model's native resolution
    height: int | None = None
    negative_prompt: str = ""


def make_pipeline(components: SDComponents, sampler: str = "ddim"):
    """A diffusers pipeline that shares (does not copy) the components' modules."""
    scheduler = make_sampler(sampler, components.scheduler_config, components.family.prediction_type)
    common = {"vae": components.vae, "unet": components.unet, "scheduler": scheduler}
    if components.family.arch == "sdxl":
        return StableDiffusionXLPipeline(
            text_encoder=components.text_encoders[0],
            text_encoder_2=components.text_encoders[1],
            tokenizer=components.tokenizers[0],
            tokenizer_2=components.tokenizers[1],
            **common,
        )
    return StableDiffusionPipeline(
        text_encoder=components.text_encoders[0],
        tokenizer=components.tokenizers[0],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **common,
    )


def apply_hypernetwork(components: SDComponents, path: str | Path, strength: float = 1.0) -> InstalledHypernetwork:
    """Hook an A1111 hypernetwork file into the UNet at ``strength`` (``.remove()`` on the result takes it out)."""
    hn = load_hypernetwork(path)
    hn.hypernetwork.multiplier = strength
    hn.hypernetwork.to(components.unet.device)
    try:
        return install(components.unet, hn.hypernetwork)
    except ValueError as exc:
        raise ModelError(f"{path}: {exc}; use a hypernetwork made for this model family") from None


@torch.no_grad()
def generate(
    components: SDComponents,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: GenerationSettings,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> list[Image.Image]:
    """One image per (prompt, seed) pair; image i depends only on prompt i and seed i, not on batching."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    pipe = make_pipeline(components, settings.sampler)
    pipe.set_progress_bar_config(disable=not progress)
    side = native_size(components)
    width, height = settings.width or side, settings.height or side
    images: list[Image.Image] = []
    with _mixed_precision(components):
        for start in range(0, len(prompts), batch_size):
            images += _generate_chunk(pipe, prompts, seeds, settings, slice(start, start + batch_size), width, height)
    return images


def _mixed_precision(components: SDComponents):
    """Autocast to the lowest float precision among the modules when they differ (a bf16 frozen base with fp32
    adapters, or fp32 trained weights beside bf16 frozen encoders); a no-op for a model in one precision."""
    dtypes = {p.dtype for m in components.modules().values() for p in m.parameters() if p.is_floating_point()}
    if len(dtypes) < 2:
        return contextlib.nullcontext()
    low = min(dtypes, key=lambda d: torch.finfo(d).bits)
    device = next(components.unet.parameters()).device
    return torch.autocast(device.type, dtype=low)


def _generate_chunk(pipe, prompts, seeds, settings: GenerationSettings, chunk: slice, width: int, height: int):
    """One batch of images: prompts and seeds at ``chunk``."""
    # A list of generators makes diffusers draw each image's starting noise from its own seed.
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[chunk]]
    out = pipe(
        prompt=list(prompts[chunk]),
        negative_prompt=[settings.negative_prompt] * len(generators),
        num_inference_steps=settings.steps,
        guidance_scale=settings.cfg_scale,
        width=width,
        height=height,
        generator=generators,
        output_type="pil",
    )
    return out.images


def infotext(
    components: SDComponents,
    prompt: str,
    seed: int,
    settings: GenerationSettings,
    model_hash: str | None,
    model_name: str | None,
) -> str:
    side = native_size(components)
    params = {
        "Steps": settings.steps,
        "Sampler": infotext_name(settings.sampler),
        "CFG scale": settings.cfg_scale,
        "Seed": seed,
        "Size": f"{settings.width or side}x{settings.height or side}",
        "Model hash": model_hash,
        "Model": model_name,
        "Version": f"sdtune {__version__}",
    }
    return format_infotext(prompt, settings.negative_prompt, params)


def grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Images tiled row by row (all the size of the first)."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, img in enumerate(images):
        sheet.paste(img, ((i % columns) * w, (i // columns) * h))
    return sheet


def save_images(images: Sequence[Image.Image], texts: Sequence[str], out_dir: str | Path, stem: str = "") -> list[Path]:
    out_dir = Path(out_dir)
    return [
        save_png(img, out_dir / f"{stem}{i:04d}.png", text)
        for i, (img, text) in enumerate(zip(images, texts, strict=True))
    ]
