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
) -> None:
    """Load, apply embeddings, generate with fixed seeds, save PNGs with infotext and a grid."""
    from sdtune.formats.hashes import a1111_short_hash
    from sdtune.inference.generate import (
        GenerationSettings,
        apply_hypernetwork,
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
    from sdtune.adapters.token_embedding import apply_embedding, expand_token
    from sdtune.formats.embeddings import check_width, load_embedding

    path = resolve_path(model)
    components = load_model(path)
    written = list(prompts)  # what the user typed: it goes into the infotext
    for file in embeddings:  # A1111 convention: the embedding's name is the trigger word
        emb = load_embedding(file)
        check_width(emb, tuple(e.get_input_embeddings().embedding_dim for e in components.text_encoders), file)
        keys = ("clip_l", "clip_g") if emb.is_sdxl else ("text_encoder",)
        try:
            apply_embedding(components.tokenizers, components.text_encoders, emb.name, [emb.vectors[k] for k in keys])
        except ValueError as exc:
            raise SdtuneError(f"{file}: {exc}; rename the file to use another trigger word") from None
        prompts = [expand_token(p, emb.name, emb.num_vectors) for p in prompts]
        console.print(f"embedding {file}: write '{emb.name}' in prompts ({emb.num_vectors} vectors)", highlight=False)
    for spec in hypernetworks:  # FILE or FILE:strength; several chain in order (A1111)
        file, strength = parse_hypernetwork_arg(spec)
        apply_hypernetwork(components, file, strength)
        console.print(f"hypernetwork {file} at strength {strength:g}", highlight=False)
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
        console.print(str(p), highlight=False)
    console.print(f"grid: {sheet}", highlight=False)


def parse_hypernetwork_arg(text: str) -> tuple[Path, float]:
    """``FILE`` or ``FILE:strength`` (``--hypernetwork style.pt:0.6``); a missing file is a one-line error."""
    path, _, tail = text.rpartition(":")
    try:
        file, strength = (Path(path), float(tail)) if path else (Path(text), 1.0)
    except ValueError:
        file, strength = Path(text), 1.0  # a ':' that is part of the path (C:\...)
    if not file.is_file():
        raise SdtuneError(f"--hypernetwork: no such file {str(file)!r}; give FILE or FILE:strength, e.g. style.pt:0.8")
    return file, strength
