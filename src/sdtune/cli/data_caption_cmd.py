"""``sdtune data caption DIR``: write a caption sidecar for every image with BLIP, a WD14 tagger or the shapes world.

Models are local folders only (nothing is downloaded). Images are never written; existing captions are kept or
replaced only when asked (``--skip-existing`` / ``--overwrite``).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

console = Console(soft_wrap=True)  # paths and messages stay whole lines (copyable); tables still fit the width


def register(app: typer.Typer) -> None:
    """Add this module's command to ``sdtune data``."""

    @app.command("caption")
    def caption(
        folder: Path = typer.Argument(..., help="Folder of images (or of kohya N_name folders)."),
        captioner: str = typer.Option(..., help="blip, wd14 or shapes (the built-in shapes-world captioner)."),
        model: Path | None = typer.Option(None, help="Local model folder: BLIP, or a WD14 tagger's model.onnx + csv."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing captions."),
        skip_existing: bool = typer.Option(False, "--skip-existing", help="Keep existing captions; caption the rest."),
        prefix: str = typer.Option("", help="Text put in front of every caption (e.g. a trigger word), then ', '."),
        threshold: float = typer.Option(0.35, help="wd14: probability above which a general tag is written."),
        character_threshold: float = typer.Option(0.85, help="wd14: the same for character tags."),
        max_new_tokens: int = typer.Option(40, min=1, help="blip: longest caption in tokens."),
        num_beams: int = typer.Option(1, min=1, help="blip: beam-search width (1 = greedy)."),
        caption_ext: str = typer.Option(".txt", help="Caption sidecar extension."),
    ) -> None:
        """Caption every image into <stem>.txt (BLIP sentences, WD14 tags, or shapes-world captions)."""
        from sdtune.core.errors import DataError
        from sdtune.data.captioners import caption_folder
        from sdtune.tools.captioning import make_captioner

        if overwrite and skip_existing:
            raise DataError("--overwrite: choose either --overwrite or --skip-existing, not both")
        existing = "overwrite" if overwrite else "skip" if skip_existing else "error"
        engine = make_captioner(
            captioner,
            model,
            threshold=threshold,
            character_threshold=character_threshold,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
        )
        report = caption_folder(folder, engine, extension=caption_ext, prefix=prefix, existing=existing)
        for item in report.unreadable:
            console.print(f"[yellow]skipped[/yellow] {escape(f'{item.path.name}: {item.reason}')}", highlight=False)
        for image in report.uncaptioned:
            console.print(
                f"[yellow]no caption[/yellow] {escape(f'{image.name}: the {captioner} captioner read nothing')}",
                highlight=False,
            )
        console.print(
            f"{len(report.written)} captions written, {len(report.kept)} kept, {len(report.uncaptioned)} uncaptioned, "
            f"{len(report.unreadable)} unreadable",
            highlight=False,
        )
