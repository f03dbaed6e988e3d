"""``sdtune generate``: load, generate with fixed seeds, save PNGs with infotext and a grid."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from sdtune.core.errors import SdtuneError


def run_generate(
    prompts: list[str],
    model: str,
    n: int,
    seed: int,
    steps: int,
    cfg: float,
    sampler: str,
    negative: str,
    width: int | None,
    height: int | None,
    out: Path,
    console: Console,
) -> None:
    from sdtune.formats.hashes import a1111_short_hash
    from sdtune.inference.generate import GenerationSettings, generate, grid, infotext, save_images
    from sdtune.inference.infotext import save_png
    from sdtune.inference.samplers import SAMPLERS
    from sdtune.models.loading import load_model, resolve_path

    if sampler not in SAMPLERS:
        raise SdtuneError(f"--sampler: unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}")
    for name, value in (("--width", width), ("--height", height)):
        if value is not None and value % 8:
            raise SdtuneError(f"{name}: must be a multiple of 8 (got {value}); e.g. 512")
    path = resolve_path(model)
    components = load_model(path)
    settings = GenerationSettings(
        steps=steps, cfg_scale=cfg, sampler=sampler, width=width, height=height, negative_prompt=negative
    )
    texts = [p for p in prompts for _ in range(n)]
    seeds = [seed + i for i in range(len(texts))]
    with console.status(f"generating {len(texts)} images"):
        images = generate(components, texts, seeds, settings)
    model_hash = a1111_short_hash(path) if path.is_file() else None
    infos = [
        infotext(components, t, s, settings, model_hash, path.stem if model != "builtin" else "sdtune-builtin")
        for t, s in zip(texts, seeds, strict=True)
    ]
    paths = save_images(images, infos, out)
    sheet = save_png(grid(images, columns=n if n > 1 else None), out / "grid.png")
    for p in paths:
        console.print(str(p), highlight=False)
    console.print(f"grid: {sheet}", highlight=False)
