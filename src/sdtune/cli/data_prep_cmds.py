"""``sdtune data prep | buckets | tags``: prepare images into a new folder, preview buckets, count and edit tags.

Thin layers over :mod:`sdtune.data.prep`, :mod:`sdtune.data.buckets` and :mod:`sdtune.data.tags`, imported inside
the commands so ``sdtune --help`` stays fast. Errors are :class:`~sdtune.core.errors.SdtuneError`\\ s, printed by
``sdtune.cli.main`` as one line (exit code 2).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

console = Console(soft_wrap=True)  # paths and messages stay whole lines (copyable); tables still fit the width


def _bucket_options(resolution: int, step: int, min_side: int | None, max_side: int | None, no_upscale: bool):
    from sdtune.data.buckets import BucketOptions

    return BucketOptions(resolution, step, min_side, max_side, no_upscale)


def print_histogram(histogram: dict, title: str) -> None:
    """A rich table of bucket -> count (with aspect ratio and share)."""
    total = sum(histogram.values()) or 1
    table = Table(title=title)
    table.add_column("bucket")
    table.add_column("aspect", justify="right")
    table.add_column("images", justify="right")
    table.add_column("share", justify="right")
    for bucket, count in histogram.items():
        table.add_row(str(bucket), f"{bucket.aspect:.2f}", str(count), f"{count / total:.0%}")
    console.print(table)


def _print_skipped(skipped) -> None:
    for item in skipped:
        console.print(f"[yellow]skipped[/yellow] {escape(f'{item.path.name}: {item.reason}')}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``sdtune data``."""

    @app.command("prep")
    def prep(
        src: Path = typer.Argument(..., help="Folder of source images (+ caption sidecars); it is only read."),
        out: Path = typer.Argument(..., help="New folder for the prepared images; never inside SRC."),
        resolution: int = typer.Option(512, help="Square side, or with --buckets the side of the target area."),
        buckets: bool = typer.Option(False, "--buckets", help="Resize to aspect-ratio buckets instead of squares."),
        step: int = typer.Option(64, help="Bucket sides are multiples of this (kohya's bucket_reso_steps)."),
        min_side: int | None = typer.Option(None, help="Smallest bucket side (default resolution/2)."),
        max_side: int | None = typer.Option(None, help="Largest bucket side (default 2*resolution)."),
        no_upscale: bool = typer.Option(False, "--no-upscale", help="Buckets: never enlarge an image."),
        crop: str = typer.Option("center", help="Crop: center, random (seeded), entropy or edges (focal point)."),
        seed: int = typer.Option(0, help="Seed for random crops and colour jitter."),
        split: float = typer.Option(0.0, help="Split images whose sides both exceed SPLIT x resolution into tiles."),
        flip: bool = typer.Option(False, "--flip", help="Also write a mirrored copy of each image."),
        color_copies: int = typer.Option(0, min=0, help="Also write this many colour-jittered copies of each image."),
        brightness: float = typer.Option(0.2, help="Colour jitter: brightness factor range 1 +- this."),
        contrast: float = typer.Option(0.2, help="Colour jitter: contrast factor range 1 +- this."),
        saturation: float = typer.Option(0.2, help="Colour jitter: saturation factor range 1 +- this."),
        hue: float = typer.Option(0.05, help="Colour jitter: hue shift range +- this (turns)."),
        image_format: str = typer.Option("png", "--format", help="Output format: png, jpg or webp."),
        caption_ext: str = typer.Option(".txt", help="Caption sidecar extension."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace what an earlier prep wrote into OUT."),
    ) -> None:
        """Resize/crop images into a new folder (squares or buckets; tiles, flips, colour copies; captions kept)."""
        from sdtune.data.prep import ColorJitter, PrepOptions, prep_folder

        options = PrepOptions(
            size=_bucket_options(resolution, step, min_side, max_side, no_upscale),
            buckets=buckets,
            crop=crop,
            seed=seed,
            split_factor=split,
            flip=flip,
            color_copies=color_copies,
            jitter=ColorJitter(brightness, contrast, saturation, hue),
            image_format=image_format,
            caption_extension=caption_ext if caption_ext.startswith(".") else "." + caption_ext,
            overwrite=overwrite,
        )
        report = prep_folder(src, out, options)
        _print_skipped(report.skipped)
        console.print(
            f"{report.sources} source images -> {report.images} images in {report.out} "
            f"({report.tiles} tiles, {report.flipped} flipped, {report.colored} colour copies), "
            f"{report.captions} captions, {len(report.skipped)} skipped"
            + (f", {report.removed} stale files removed" if report.removed else ""),
            highlight=False,
            markup=False,
        )
        if buckets:
            print_histogram(report.buckets, "images per bucket")

    @app.command("buckets")
    def buckets_cmd(
        folder: Path = typer.Argument(..., help="Folder of images."),
        resolution: int = typer.Option(512, help="Side of the target area (512 -> 262144 px)."),
        step: int = typer.Option(64, help="Bucket sides are multiples of this."),
        min_side: int | None = typer.Option(None, help="Smallest bucket side (default resolution/2)."),
        max_side: int | None = typer.Option(None, help="Largest bucket side (default 2*resolution)."),
        no_upscale: bool = typer.Option(False, "--no-upscale", help="Never enlarge an image."),
    ) -> None:
        """Show which aspect-ratio bucket each image would train in (a histogram); writes nothing."""
        from sdtune.data.buckets import assign_buckets, bucket_histogram, grid_aspect_error, make_buckets
        from sdtune.data.images import scan_images
        from sdtune.data.prep import image_size

        options = _bucket_options(resolution, step, min_side, max_side, no_upscale)
        paths, skipped = scan_images(folder)
        _print_skipped(skipped)
        histogram = bucket_histogram(assign_buckets([image_size(p) for p in paths], options))
        print_histogram(histogram, f"{len(paths)} images, {len(histogram)} buckets")
        if not no_upscale:
            grid = make_buckets(options)
            console.print(f"grid of {len(grid)} buckets; worst aspect error {grid_aspect_error(grid):.3f} (log ratio)")

    @app.command("tags")
    def tags_cmd(
        folder: Path = typer.Argument(..., help="Folder of images with caption sidecars."),
        top: int = typer.Option(30, min=1, help="How many of the most frequent tags to show."),
        add: list[str] = typer.Option([], "--add", help="Add this tag where missing (repeatable)."),
        position: str = typer.Option("front", help="Where --add puts tags: front or back."),
        remove: list[str] = typer.Option([], "--remove", help="Remove this tag (repeatable)."),
        replace: list[str] = typer.Option([], "--replace", help="Rename a tag: OLD=NEW (repeatable)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Show the changes per file; write nothing."),
        caption_ext: str = typer.Option(".txt", help="Caption sidecar extension."),
    ) -> None:
        """Tag frequencies across caption sidecars, or bulk --add / --remove / --replace (with --dry-run)."""
        from sdtune.data.tags import TagEdit, edit_folder, parse_replace, tag_frequencies

        edit = TagEdit(tuple(add), position, tuple(remove), tuple(parse_replace(r) for r in replace))
        if edit.empty:
            counts, read, bad = tag_frequencies(folder, caption_ext)
            for path in bad:
                console.print(f"[yellow]not UTF-8, skipped[/yellow] {escape(path.name)}", highlight=False)
            table = Table(title=f"{len(counts)} tags in {read} caption files (top {min(top, len(counts))})")
            table.add_column("#", justify="right")
            table.add_column("tag")
            table.add_column("files", justify="right")
            table.add_column("share", justify="right")
            for rank, (tag, n) in enumerate(counts.most_common(top), 1):
                table.add_row(str(rank), Text(tag), str(n), f"{n / max(read, 1):.0%}")  # a tag as written
            console.print(table)
            return
        report = edit_folder(folder, edit, caption_ext, dry_run=dry_run)
        for path in report.not_utf8:
            console.print(f"[yellow]not UTF-8, left untouched[/yellow] {escape(path.name)}", highlight=False)
        if dry_run:
            for change in report.changes:
                for line in change.diff():
                    style = "red" if line[:1] == "-" and not line.startswith("---") else None
                    style = "green" if line[:1] == "+" and not line.startswith("+++") else style
                    console.print(line, style=style, highlight=False, markup=False)
        verb = "would change" if dry_run else "changed"
        console.print(f"{verb} {len(report.changes)} of {report.files} caption files", highlight=False, markup=False)
