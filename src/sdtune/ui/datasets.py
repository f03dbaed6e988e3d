"""The Datasets page's work: list a dataset as training reads it, edit captions, bulk tags, check, caption, masks.

The dataset is read with :func:`sdtune.data.sources.load_sources` (folders, kohya ``N_name`` folders, kohya
``.toml``, ``.jsonl`` manifests), so the page shows what training will see. Captions are edited in their
sidecar files (written atomically, a UTF-8 byte-order mark kept); bulk tag edits, tag counts and the dataset
check are :mod:`sdtune.data.tags` and :mod:`sdtune.data.check`. Every path comes through :class:`Roots`.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sdtune.core.atomic import write_bytes
from sdtune.core.errors import DataError
from sdtune.data.check import CheckOptions, CheckReport, check_dataset
from sdtune.data.sources import load_sources
from sdtune.data.tags import TagEdit, TagReport, edit_folder, parse_replace, read_utf8, tag_frequencies
from sdtune.ui.paths import Roots


@dataclass(frozen=True)
class Item:
    """One image of the dataset as training reads it."""

    image: Path
    caption: str  # what the sidecar (or manifest / folder name) says; "" if none
    sidecar: Path  # where an edited caption is written
    editable: bool  # False when the caption lives in a manifest line, not a sidecar
    mask: Path | None = None


def sidecar_path(image: Path, extension: str) -> Path:
    extension = extension if extension.startswith(".") else "." + extension
    return image.with_name(image.stem + extension)


def read_caption(path: Path) -> str:
    decoded = read_utf8(path) if path.is_file() else None
    return decoded[0] if decoded else ""


def open_dataset(roots: Roots, path: str, extension: str = ".txt") -> list[Item]:
    """The images of the dataset at ``path`` (inside the roots), each with its caption, sidecar and mask."""
    folder = roots.resolve(path, what="dataset", must_exist=True)
    sources = load_sources(folder, extension)
    items: list[Item] = []
    for entry in sources.entries:
        if not roots.contains(entry.image):  # a manifest line or a link pointing out of the roots
            continue
        sidecar = entry.caption_file or sidecar_path(entry.image, extension)
        from_manifest = sources.kind == "jsonl" and entry.caption is not None
        caption = entry.caption if from_manifest else read_caption(sidecar)
        mask = entry.mask if entry.mask is not None and roots.contains(entry.mask) else None
        items.append(Item(entry.image, (caption or "").rstrip("\r\n"), sidecar, not from_manifest, mask))
    return items


def save_caption(roots: Roots, image: str | Path, text: str, extension: str = ".txt") -> Path:
    """Write ``text`` to the caption sidecar of ``image`` atomically; return the sidecar's path.

    The file keeps its UTF-8 byte-order mark and its final newline (a new file gets one); Windows line
    endings stay Windows line endings.
    """
    image_path = roots.resolve(image, what="image", must_exist=True)
    sidecar = roots.resolve(sidecar_path(image_path, extension), what="caption file")
    bom, newline, ending = False, "\n", True
    if sidecar.is_file():
        decoded = read_utf8(sidecar)
        if decoded is None:
            raise DataError(f"{sidecar.name}: not UTF-8; convert it to UTF-8 before editing it here")
        old, bom = decoded
        newline = "\r\n" if "\r\n" in old else "\n"
        ending = old.endswith(("\n", "\r"))
    body = newline.join(text.replace("\r\n", "\n").rstrip("\n").split("\n"))
    data = body + (newline if ending else "")
    write_bytes(sidecar, (codecs.BOM_UTF8 if bom else b"") + data.encode("utf-8"))
    return sidecar


def bulk_tags(
    roots: Roots,
    folder: str,
    add: str = "",
    remove: str = "",
    replace: str = "",
    position: str = "front",
    extension: str = ".txt",
    dry_run: bool = False,
) -> TagReport:
    """Add / remove / replace comma-separated tags in every sidecar of ``folder`` (``replace``: OLD=NEW lines)."""
    path = roots.resolve(folder, what="dataset", must_exist=True)
    edit = TagEdit(
        add=tuple(_tags(add)),
        position=position,
        remove=tuple(_tags(remove)),
        replace=tuple(parse_replace(line) for line in replace.splitlines() if line.strip()),
    )
    return edit_folder(path, edit, extension, dry_run=dry_run)


def _tags(text: str) -> list[str]:
    return [t.strip() for t in text.replace("\n", ",").split(",") if t.strip()]


def frequencies(roots: Roots, folder: str, extension: str = ".txt") -> list[list]:
    """Rows ``[tag, files]``, most frequent first."""
    path = roots.resolve(folder, what="dataset", must_exist=True)
    counts, _, _ = tag_frequencies(path, extension)
    return [[tag, n] for tag, n in counts.most_common()]


def check(roots: Roots, folder: str, extension: str = ".txt", count_tokens: bool = True) -> CheckReport:
    """The dataset check (:func:`sdtune.data.check.check_dataset`), caption tokens counted with CLIP's tokenizer."""
    path = roots.resolve(folder, what="dataset", must_exist=True)
    options = CheckOptions(caption_extension=extension, count_tokens=clip_token_counter() if count_tokens else None)
    return check_dataset(path, options)


def clip_token_counter() -> Callable[[str], int]:
    """Count a caption's CLIP tokens (no start/end tokens) with the shipped tokenizer, loaded on first use."""
    tokenizer = None

    def count(text: str) -> int:
        nonlocal tokenizer
        if tokenizer is None:
            from sdtune.models.tokenizers import load_tokenizer

            tokenizer = load_tokenizer()
            tokenizer.model_max_length = 1 << 30  # long captions without transformers' length warning
        return len(tokenizer.tokenize(text))

    return count


# -- captioners -------------------------------------------------------------------------------------------------


def shapes_world_caption(image: Path) -> str | None:
    """The built-in captioner: the shapes-world scorer reads shape and colours ("a teal heart on a white
    background"); None when it cannot read the image (not a shapes-world picture)."""
    from sdtune.world import score_image
    from sdtune.world.captions import subject_caption

    with Image.open(image) as im:
        reading = score_image(im.convert("RGB"))
    if not (reading.shape and reading.fg and reading.bg):
        return None
    return subject_caption(f"{reading.fg} {reading.shape}", reading.bg)


def filename_caption(image: Path) -> str | None:
    """A1111's file-name captions: the words of the file name (digits-only names give nothing)."""
    words = " ".join(image.stem.replace("_", " ").replace("-", " ").split())
    return None if not words or words.replace(" ", "").isdigit() else words


CAPTIONERS: dict[str, Callable[[Path], str | None]] = {
    "shapes-world scorer (built-in)": shapes_world_caption,
    "file name words": filename_caption,
}


def caption_dataset(
    roots: Roots, folder: str, captioner: str, overwrite: bool = False, prefix: str = "", extension: str = ".txt"
) -> tuple[int, int]:
    """Caption every image of ``folder`` with a captioner of :data:`CAPTIONERS` into its sidecar.

    Images that already have a caption are left alone unless ``overwrite``. ``prefix`` is put in front (e.g. a
    trigger word). Returns (written, not readable by the captioner).
    """
    if captioner not in CAPTIONERS:
        raise DataError(f"captioner: unknown {captioner!r}; choose one of {', '.join(CAPTIONERS)}")
    caption_of = CAPTIONERS[captioner]
    written = unreadable = 0
    for item in open_dataset(roots, folder, extension):
        if not item.editable or (item.caption.strip() and not overwrite):
            continue
        text = caption_of(item.image)
        if text is None:
            unreadable += 1
            continue
        save_caption(roots, item.image, f"{prefix.strip()}, {text}" if prefix.strip() else text, extension)
        written += 1
    return written, unreadable


# -- masks ------------------------------------------------------------------------------------------------------


def mask_overlay(image: Path, mask: Path, colour: tuple[int, int, int] = (255, 0, 64)) -> Image.Image:
    """The image with the masked-out (black) areas of ``mask`` tinted, as training weights the loss."""
    with Image.open(image) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    with Image.open(mask) as m:
        weight = np.asarray(m.convert("L").resize((rgb.shape[1], rgb.shape[0])), dtype=np.float32)[..., None] / 255
    tint = np.array(colour, dtype=np.float32)
    out = rgb * (0.35 + 0.65 * weight) + tint * 0.45 * (1 - weight)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
