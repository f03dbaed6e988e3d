"""``sdtune inspect``: a model's family, components and hashes, or a non-model file's metadata."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from sdtune.core.errors import ModelError


def show(path: str, console: Console) -> None:
    from sdtune.formats.hashes import a1111_legacy_hash, a1111_short_hash, addnet_hash
    from sdtune.models.checkpoint_io import SAFETENSORS_SUFFIXES, read_metadata, read_shapes
    from sdtune.models.loading import resolve_path
    from sdtune.models.summary import summarize

    resolved = resolve_path(path)
    try:
        summary = summarize(resolved)
    except ModelError as exc:
        if not (resolved.is_file() and resolved.suffix.lower() in SAFETENSORS_SUFFIXES):
            raise
        # Not a full model: a LoRA, an embedding, a VAE... show what it holds.
        shapes = read_shapes(resolved)
        what = escape(f"not a model checkpoint ({exc})")
        console.print(f"[bold]{escape(str(resolved))}[/bold]: {what}", highlight=False)
        console.print(
            f"tensors: {len(shapes)}  addnet hash: {addnet_hash(resolved)[:12]}  sha256: {a1111_short_hash(resolved)}"
        )
        _metadata_table(read_metadata(resolved), console)
        return
    family = summary.detection.family
    console.print(f"[bold]{escape(str(summary.path))}[/bold]", highlight=False)
    console.print(
        f"family: [cyan]{family.name}[/cyan] ({family.arch}, {family.prediction_type}, "
        f"{'inpainting, ' if family.inpainting else ''}native {family.resolution}px)  "
        f"layout: {summary.detection.layout}"
    )
    for note in summary.detection.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)
    table = Table("component", "parameters", "dtypes")
    for name, comp in summary.components.items():
        table.add_row(name, f"{comp.parameters:,}", ", ".join(f"{d} x{n}" for d, n in comp.dtypes.most_common()))
    console.print(table)
    if Path(summary.path).is_file():
        console.print(
            f"A1111 hash: [bold]{a1111_short_hash(summary.path)}[/bold]  legacy hash: {a1111_legacy_hash(summary.path)}"
        )
    shown = {k: v for k, v in summary.metadata.items() if k != "sdtune.configs"}
    _metadata_table(shown, console)


def _metadata_table(metadata: dict[str, str], console: Console) -> None:
    if not metadata:
        return
    table = Table("metadata key", "value")
    for key in sorted(metadata):
        value = metadata[key]
        table.add_row(Text(key), Text(value if len(value) < 120 else value[:117] + "..."))  # metadata as written
    console.print(table)
