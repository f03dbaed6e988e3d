"""Preview images during training: seeded generation saved as PNGs with infotext plus a grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
