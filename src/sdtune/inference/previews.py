"""Preview images during training: which prompts, sampled how, and seeded generation saved as PNGs with infotext
plus a grid."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from sdtune.config.blocks import PreviewConfig
from sdtune.data import Templates
from sdtune.inference.generate import GenerationSettings, generate, grid, infotext, save_images
from sdtune.inference.infotext import save_png
from sdtune.models.components import SDComponents


def render_previews(
    model: SDComponents,
    prompts: Sequence[str],
    shown: Sequence[str],
    seeds: Sequence[int],
    settings: GenerationSettings,
    out_dir: Path,
    model_name: str,
) -> tuple[list[Path], Path]:
    """Generate ``prompts`` (as the model reads them); the infotext shows ``shown`` (as the user wrote them)."""
    images = generate(model, list(prompts), list(seeds), settings)
    texts = [infotext(model, p, s, settings, None, model_name) for p, s in zip(shown, seeds, strict=True)]
    paths = save_images(images, texts, out_dir)
    return paths, save_png(grid(images), out_dir / "grid.png")


def on_gpu() -> bool:
    """Whether ``auto`` preview settings pick the GPU values (CUDA or Apple MPS present) or the smaller CPU ones."""
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps is not None and mps.is_available())


def preview_steps(preview: PreviewConfig, gpu: bool | None = None) -> int:
    """``preview.steps``; ``auto`` = 20 on a GPU, 8 on a CPU."""
    if preview.steps != "auto":
        return preview.steps
    return 20 if (on_gpu() if gpu is None else gpu) else 8


def preview_count(preview: PreviewConfig, gpu: bool | None = None) -> int:
    """How many training captions are previewed when no prompts are set; ``auto`` = 4 on a GPU, 2 on a CPU."""
    if preview.num_prompts != "auto":
        return preview.num_prompts
    return 4 if (on_gpu() if gpu is None else gpu) else 2


def preview_settings(preview: PreviewConfig, resolution: int) -> GenerationSettings:
    """How a run samples its previews (and class images): the ``preview`` block at the training resolution."""
    return GenerationSettings(
        steps=preview_steps(preview),
        cfg_scale=preview.cfg_scale,
        sampler=preview.sampler,
        width=resolution,
        height=resolution,
        negative_prompt=preview.negative_prompt,
    )


def class_image_settings(preview: PreviewConfig, resolution: int) -> GenerationSettings:
    """DreamBooth class images: the ``preview`` block's settings, but ``auto`` steps are 20 on every device (class
    images are training data, rendered once and reused, so their quality does not follow the device)."""
    return replace(preview_settings(preview, resolution), steps=preview_steps(preview, gpu=True))


def preview_prompts(
    preview: PreviewConfig, templates: Templates, captions: Sequence[str], name: str | None
) -> list[str]:
    """The configured preview prompts, ``[name]`` written as ``name`` (left as it is where ``name`` is ``None``);
    none configured: the first training captions (:func:`preview_count` of them) through the run's templates, drawn
    with ``preview.seed`` so every preview of a run shows the same prompts."""
    if preview.prompts:
        return [p if name is None else p.replace("[name]", name) for p in preview.prompts]
    rng = random.Random(preview.seed)
    return [templates.render(name or "", caption, rng) for caption in captions[: preview_count(preview)]]


@contextmanager
def eval_mode(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """The trained ``modules`` in eval mode while previews sample (no dropout), back in train mode afterwards."""
    modules = list(modules)
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module in modules:
            module.train()
