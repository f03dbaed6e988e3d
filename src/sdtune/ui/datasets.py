"""The Datasets page's work: list a dataset as training reads it, edit captions, bulk tags, check, caption, masks.

The dataset is read with :func:`sdtune.data.sources.load_sources` (folders, kohya ``N_name`` folders, kohya
``.toml``, ``.jsonl`` manifests), so the page shows what training will see; each image's mask is the one
:func:`sdtune.data.masks.mask_for` says training uses (manifest ``mask``, ``masks/<stem>.png``, PNG alpha).
Captions are edited in their sidecar files (written atomically, a UTF-8 byte-order mark kept); bulk tag edits,
tag counts and the dataset check are :mod:`sdtune.data.tags` and :mod:`sdtune.data.check`; the captioners are
:func:`sdtune.tools.captioning.make_captioner`'s (BLIP, WD14 taggers, the shapes world) and a file-name one.
Every path, a captioner's model folder included, comes through :class:`Roots`.
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
from sdtune.data.captioners import with_prefix
from sdtune.data.check import CheckOptions, CheckReport, check_dataset
from sdtune.data.images import upright_rgb
from sdtune.data.masks import MaskSource, mask_for, mask_image
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
    mask: Path | None = None  # the file training reads the loss mask from (the image itself for its alpha)
    mask_alpha: bool = False  # True: the mask is the alpha channel of ``mask`` (data.alpha_mask)


def sidecar_path(image: Path, extension: str) -> Path:
    extension = extension if extension.startswith(".") else "." + extension
    return image.with_name(image.stem + extension)


def read_caption(path: Path) -> str:
    decoded = read_utf8(path) if path.is_file() else None
    return decoded[0] if decoded else ""


def open_dataset(roots: Roots, path: str, extension: str = ".txt", alpha_mask: bool = False) -> list[Item]:
    """The images of the dataset at ``path`` (inside the roots), each with its caption, sidecar and the mask
    training uses (:func:`sdtune.data.masks.mask_for`; ``alpha_mask`` as ``data.alpha_mask``)."""
    folder = roots.resolve(path, what="dataset", must_exist=True)
    sources = load_sources(folder, extension)
    items: list[Item] = []
    for entry in sources.entries:
        if not roots.contains(entry.image):  # a manifest line or a link pointing out of the roots
            continue
        sidecar = entry.caption_file or sidecar_path(entry.image, extension)
        from_manifest = sources.kind == "jsonl" and entry.caption is not None
        caption = entry.caption if from_manifest else read_caption(sidecar)
        source = mask_for(entry, alpha_mask)
        if source is not None and not roots.contains(source.path):
            source = None
        mask, alpha = (source.path, source.alpha) if source is not None else (None, False)
        items.append(Item(entry.image, (caption or "").rstrip("\r\n"), sidecar, not from_manifest, mask, alpha))
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
    from sdtune.models.tokenizers import clip_token_counter

    path = roots.resolve(folder, what="dataset", must_exist=True)
    options = CheckOptions(caption_extension=extension, count_tokens=clip_token_counter() if count_tokens else None)
    return check_dataset(path, options)


# -- captioners -------------------------------------------------------------------------------------------------


def filename_caption(image: Path) -> str | None:
    """A1111's file-name captions: the words of the file name (digits-only names give nothing)."""
    words = " ".join(image.stem.replace("_", " ").replace("-", " ").split())
    return None if not words or words.replace(" ", "").isdigit() else words


# label shown in the UI -> captioner kind (``sdtune data caption --captioner`` names, and ``filename``)
CAPTIONERS: dict[str, str] = {
    "shapes-world scorer (built-in)": "shapes",
    "BLIP (local model folder)": "blip",
    "WD14 tagger (local model folder)": "wd14",
    "file name words": "filename",
}
NEEDS_MODEL = ("blip", "wd14")


def make_captioner(
    roots: Roots,
    captioner: str,
    model: str = "",
    threshold: float = 0.35,
    character_threshold: float = 0.85,
    max_new_tokens: int = 40,
    num_beams: int = 1,
) -> Callable[[Path], str | None]:
    """The captioner ``captioner`` (a label of :data:`CAPTIONERS` or its kind) as image file -> caption (``None``:
    nothing readable). BLIP and WD14 load the local model folder ``model``, which must lie inside the roots;
    ``threshold`` / ``character_threshold`` are WD14's, ``max_new_tokens`` / ``num_beams`` BLIP's."""
    from sdtune.tools.captioning import make_captioner as make_engine

    kind = CAPTIONERS.get(captioner, captioner)
    if kind not in CAPTIONERS.values():
        raise DataError(f"captioner: unknown {captioner!r}; choose one of {', '.join(CAPTIONERS)}")
    if kind == "filename":
        return filename_caption
    folder = None
    if kind in NEEDS_MODEL:
        if not str(model).strip():
            example = "models/blip-image-captioning-base" if kind == "blip" else "models/wd-vit-tagger-v3"
            raise DataError(
                f"captioner model: {kind} needs a local model folder inside {roots.shown()}; e.g. {example}"
            )
        folder = roots.resolve(model, what="captioner model", must_exist=True)
    engine = make_engine(
        kind,
        folder,
        threshold=float(threshold),
        character_threshold=float(character_threshold),
        max_new_tokens=int(max_new_tokens),
        num_beams=int(num_beams),
    )

    def caption_of(image: Path) -> str | None:
        try:
            with Image.open(image) as opened:
                rgb = upright_rgb(opened)  # the decode training and `sdtune data caption` use
                rgb.load()
        except (OSError, ValueError, SyntaxError, EOFError):  # not decodable: training skips it too
            return None
        return engine(rgb)

    return caption_of


def caption_dataset(
    roots: Roots,
    folder: str,
    captioner: str,
    overwrite: bool = False,
    prefix: str = "",
    extension: str = ".txt",
    model: str = "",
    threshold: float = 0.35,
    character_threshold: float = 0.85,
    max_new_tokens: int = 40,
    num_beams: int = 1,
) -> tuple[int, int]:
    """Caption every image of ``folder`` with a captioner of :data:`CAPTIONERS` into its sidecar.

    Images that already have a caption are left alone unless ``overwrite``. ``prefix`` is put in front (e.g. a
    trigger word). ``model`` and the rest are :func:`make_captioner`'s. Returns (written, not readable by the
    captioner).
    """
    caption_of = make_captioner(roots, captioner, model, threshold, character_threshold, max_new_tokens, num_beams)
    written = unreadable = 0
    for item in open_dataset(roots, folder, extension):
        if not item.editable or (item.caption.strip() and not overwrite):
            continue
        text = caption_of(item.image)
        text = text.strip() if text else None
        if not text:
            unreadable += 1
            continue
        save_caption(roots, item.image, with_prefix(text, prefix), extension)
        written += 1
    return written, unreadable


# -- masks ------------------------------------------------------------------------------------------------------


def mask_overlay(
    image: Path, mask: Path, colour: tuple[int, int, int] = (255, 0, 64), *, alpha: bool = False
) -> Image.Image:
    """The image with the masked-out (black) areas of ``mask`` tinted, as training weights the loss; with ``alpha``
    the mask is the alpha channel of the file ``mask`` (read by :func:`sdtune.data.masks.mask_image`)."""
    with Image.open(image) as im:
        rgb = np.asarray(upright_rgb(im), dtype=np.float32)
    grey = mask_image(MaskSource(Path(mask), alpha)).convert("L").resize((rgb.shape[1], rgb.shape[0]))
    weight = np.asarray(grey, dtype=np.float32)[..., None] / 255
    tint = np.array(colour, dtype=np.float32)
    out = rgb * (0.35 + 0.65 * weight) + tint * 0.45 * (1 - weight)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
