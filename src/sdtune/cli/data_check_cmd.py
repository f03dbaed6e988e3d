"""``sdtune data check DIR``: every file of a dataset, what is wrong with it, and what training will do."""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer


def _default_sheet(path: Path) -> Path:
    # Never inside the dataset: the temp folder, named after the dataset.
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.resolve().name) or "dataset"
    return Path(tempfile.gettempdir()) / f"sdtune-check-{name}.png"


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``sdtune data``."""

    @app.command("check")
    def check(
        path: Path = typer.Argument(..., help="A dataset folder, kohya N_name folders, a kohya .toml or a .jsonl."),
        sheet: Path | None = typer.Option(
            None, "--sheet", help="Contact sheet PNG of the flagged images (default: in the temp folder)."
        ),
        json_out: Path | None = typer.Option(None, "--json", help="Also write the findings as JSON here."),
        strict: bool = typer.Option(False, "--strict", help="Fail on warnings too, not only on errors."),
        min_side: int = typer.Option(64, min=1, help="Flag images whose shorter side is smaller (pixels)."),
        max_aspect: float = typer.Option(4.0, min=1.0, help="Flag images longer than this ratio (4 = 4:1)."),
        near: int = typer.Option(10, min=0, max=63, help="Near duplicates: pHash distance at most this (bits of 63)."),
        caption_extension: str = typer.Option(".txt", help="Caption sidecar extension (data.caption_extension)."),
        tokens: bool = typer.Option(True, help="Count caption tokens with the CLIP tokenizer (75-token window)."),
    ) -> None:
        """Decode every image and caption; report per file what training will skip or convert (exit 1 on errors)."""
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
        from rich.text import Text

        from sdtune.core.atomic import write_text
        from sdtune.data.check import KINDS, CheckOptions, check_dataset, write_contact_sheet
        from sdtune.models.tokenizers import clip_token_counter

        console = Console(soft_wrap=True)
        options = CheckOptions(
            min_side=min_side,
            max_aspect=max_aspect,
            near_duplicate_distance=near,
            caption_extension=caption_extension,
            count_tokens=clip_token_counter() if tokens else None,
        )
        report = check_dataset(path, options)

        counts = Table(title=escape(f"{path}: {report.images_checked} images read, {report.images_used} usable"))
        for column in ("kind", "severity", "files", "meaning"):
            counts.add_column(column, justify="right" if column == "files" else "left")
        style = {"error": "red", "warning": "yellow", "info": "dim"}
        for kind, n in report.counts().items():
            severity, meaning = KINDS[kind]
            counts.add_row(kind, f"[{style[severity]}]{severity}[/]", str(n), meaning)
        if report.findings:
            console.print(counts)
            files = Table(title="flagged files", show_lines=False)
            for column in ("file", "kind", "found", "training will"):
                files.add_column(column, overflow="fold")
            for f in report.findings:
                name = str(f.path.relative_to(path)) if f.path.is_relative_to(path) else str(f.path)
                files.add_row(Text(name), f"[{style[f.severity]}]{f.kind}[/]", Text(f.message), Text(f.action))
            console.print(files)
        else:
            console.print(
                f"{path}: {report.images_checked} images read, all usable as they are; nothing to report",
                highlight=False,
                markup=False,
            )
        console.print(
            f"near duplicates: pHash distance <= {options.near_duplicate_distance} of 63 bits; "
            f"caption tokens {'counted with the CLIP tokenizer' if tokens else 'not counted'}",
            highlight=False,
        )

        written = write_contact_sheet(report, sheet or _default_sheet(path))
        if written:
            console.print(f"contact sheet: {written}", highlight=False, markup=False)
        if json_out:
            import json

            write_text(json_out, json.dumps(report.to_dict(strict), indent=2, ensure_ascii=False) + "\n")
            console.print(f"json: {json_out}", highlight=False, markup=False)

        errors, warns = len(report.errors), len(report.warnings)
        if report.passed(strict):
            console.print(f"[green]pass[/green]: {errors} errors, {warns} warnings")
            return
        why = f"{errors} errors" if errors else f"{warns} warnings (--strict)"
        console.print(f"[red]fail[/red]: {why}; training skips files with errors")
        raise typer.Exit(1)
