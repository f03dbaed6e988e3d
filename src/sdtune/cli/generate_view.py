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
    embeddings: list[Path] = (),
    hypernetworks: list[str] = (),
    loras: list[str] = (),
) -> None:
    """Load, apply embeddings, hypernetworks and LoRAs (:mod:`sdtune.tools.apply_outputs`), generate with fixed
    seeds, save PNGs with infotext and a grid."""
    from sdtune.formats.hashes import a1111_short_hash
    from sdtune.inference.generate import (
        GenerationSettings,
        generate,
        grid,
        infotext,
        save_images,
    )
    from sdtune.inference.infotext import save_png
    from sdtune.inference.samplers import SAMPLERS
    from sdtune.models.loading import load_model, resolve_path

    if sampler not in SAMPLERS:
        raise SdtuneError(f"--sampler: unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}")
    for name, value in (("--width", width), ("--height", height)):
        if value is not None and value % 8:
            raise SdtuneError(f"{name}: must be a multiple of 8 (got {value}); e.g. 512")
    from sdtune.tools.apply_outputs import Addition, apply_additions, parse_file_strength

    additions = [Addition("embedding", Path(file)) for file in embeddings]
    for option, kind, specs in (("--hypernetwork", "hypernetwork", hypernetworks), ("--lora", "lora", loras)):
        for spec in specs:  # FILE or FILE:strength; several chain in order (A1111)
            additions.append(Addition(kind, *parse_file_strength(spec, option)))

    path = resolve_path(model)
    components = load_model(path)
    written = list(prompts)  # what the user typed: it goes into the infotext
    report = lambda text: console.print(text, highlight=False, markup=False)  # noqa: E731 - file names literally
    prompts = apply_additions(components, additions, prompts, report)
    settings = GenerationSettings(
        steps=steps, cfg_scale=cfg, sampler=sampler, width=width, height=height, negative_prompt=negative
    )
    texts = [p for p in prompts for _ in range(n)]
    shown = [p for p in written for _ in range(n)]
    seeds = [seed + i for i in range(len(texts))]
    with console.status(f"generating {len(texts)} images"):
        images = generate(components, texts, seeds, settings)
    model_hash = a1111_short_hash(path) if path.is_file() else None
    name = path.stem if model != "builtin" else "sdtune-builtin"
    infos = [infotext(components, t, s, settings, model_hash, name) for t, s in zip(shown, seeds, strict=True)]
    paths = save_images(images, infos, out)
    sheet = save_png(grid(images, columns=n if n > 1 else None), out / "grid.png")
    for p in paths:
        console.print(str(p), highlight=False, markup=False)
    console.print(f"grid: {sheet}", highlight=False, markup=False)
