"""Check a dataset before training: every file, what is wrong or unusual with it, and what training will do.

:func:`check_dataset` reads the dataset exactly as training does (:mod:`sdtune.data.sources`, the decode rules
of :mod:`sdtune.data.images`), decodes every image once and returns a :class:`CheckReport` of
:class:`Finding` s. Severities:

- ``error``: training will skip the file (broken, unreadable, missing);
- ``warning``: training uses the file but converts it (CMYK, alpha, EXIF rotation, ...) or it is probably not
  what you want (tiny, extreme aspect ratio, duplicate, caption problems, a picture in a format that is not read);
- ``info``: not part of the dataset by design (hidden files, sub-folders, previews, orphan captions).

Nothing is written into the dataset; the check only reads.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sdtune.core.atomic import atomic_path
from sdtune.core.errors import DataError
from sdtune.data.captions import caption_for
from sdtune.data.images import IMAGE_SUFFIXES, decode_failure, is_hidden, upright_rgb
from sdtune.data.sources import Entry, Sources, load_sources, sidecar_of

Severity = Literal["error", "warning", "info"]

# kind -> (severity, what it means); the order is the order of the summary table.
KINDS: dict[str, tuple[Severity, str]] = {
    "zero_byte": ("error", "empty file (0 bytes)"),
    "not_an_image": ("error", "not an image (e.g. text named .png)"),
    "truncated": ("error", "truncated image data"),
    "corrupt": ("error", "corrupt image data"),
    "decompression_bomb": ("error", "more pixels than Pillow decodes safely"),
    "unreadable": ("error", "cannot be read (permissions, I/O)"),
    "symlink_loop": ("error", "symbolic link loop"),
    "broken_symlink": ("error", "symbolic link to nothing"),
    "missing": ("error", "listed in the manifest but not there"),
    "caption_unreadable": ("error", "caption file cannot be read: training stops"),
    "no_images": ("error", "nothing to train on: training stops"),
    "huge_image": ("warning", "past Pillow's decompression-bomb warning limit"),
    "too_small": ("warning", "shorter side under the minimum"),
    "extreme_aspect": ("warning", "extreme aspect ratio"),
    "exif_rotated": ("warning", "EXIF orientation set"),
    "cmyk": ("warning", "CMYK colours"),
    "high_bit_depth": ("warning", "16 bits per channel"),
    "palette": ("warning", "palette (indexed) colours"),
    "alpha": ("warning", "transparency"),
    "grayscale": ("warning", "grey image"),
    "animated": ("warning", "several frames"),
    "exact_duplicate": ("warning", "same bytes as another image"),
    "near_duplicate": ("warning", "looks like another image"),
    "missing_caption": ("warning", "no caption file"),
    "empty_caption": ("warning", "empty caption"),
    "caption_not_utf8": ("warning", "caption not UTF-8"),
    "caption_too_long": ("warning", "caption longer than the CLIP window"),
    "unsupported_format": ("warning", "a picture in a format training does not read"),
    "hidden": ("info", "hidden file"),
    "directory": ("info", "folder (not read)"),
    "preview": ("info", "training preview image (never trained on)"),
    "orphan_caption": ("info", "caption file without an image"),
}

# Picture formats people put in datasets that training does not read (IMAGE_SUFFIXES are the ones it does).
OTHER_PICTURE_SUFFIXES = frozenset(
    ".gif .tif .tiff .jfif .avif .heic .heif .jxl .jp2 .ico .tga .psd .ppm .pgm .pbm .pcx .dds .svg .dng".split()
)
_ORIENTATION = {  # EXIF orientation -> what ImageOps.exif_transpose (training's loader) does to the stored pixels
    2: "mirrored left-right",
    3: "turned 180°",
    4: "mirrored top-bottom",
    5: "transposed (mirrored across the diagonal)",
    6: "turned 90° clockwise",
    7: "transversed (mirrored across the other diagonal)",
    8: "turned 90° counter-clockwise",
}
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_HIGH_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


@dataclass(frozen=True)
class Finding:
    """One thing found about one file: ``kind`` (a key of :data:`KINDS`), what it is, and what training does."""

    path: Path
    kind: str
    message: str
    action: str

    @property
    def severity(self) -> Severity:
        return KINDS[self.kind][0]


@dataclass(frozen=True)
class CheckOptions:
    """Thresholds of :func:`check_dataset`.

    ``count_tokens`` counts a caption's CLIP tokens (without start/end tokens); the data layer does not load
    tokenizers, so the caller passes one (the CLI passes the shipped CLIP tokenizer). ``None`` skips that check.
    """

    min_side: int = 64
    max_aspect: float = 4.0
    near_duplicate_distance: int = 10  # of 63 pHash bits; unrelated images differ in ~32
    caption_extension: str = ".txt"
    filename_word_regex: str = ""
    filename_join: str = " "
    max_tokens: int = 75  # CLIP's 77-token window minus the start and end tokens
    count_tokens: Callable[[str], int] | None = None

    def __post_init__(self) -> None:
        if self.caption_extension and not self.caption_extension.startswith("."):
            object.__setattr__(self, "caption_extension", "." + self.caption_extension)  # as data.caption_extension
        if self.min_side < 1:
            raise DataError(f"min side: {self.min_side} must be >= 1; e.g. 64")
        if not self.max_aspect >= 1.0:
            raise DataError(f"max aspect: {self.max_aspect} must be >= 1; e.g. 4")
        if not 0 <= self.near_duplicate_distance <= 63:
            raise DataError(f"near-duplicate distance: {self.near_duplicate_distance} must be 0..63; e.g. 10")


@dataclass
class CheckReport:
    """The result of :func:`check_dataset`: findings sorted by file, and counts."""

    root: Path
    source_kind: str
    options: CheckOptions
    findings: list[Finding] = field(default_factory=list)
    images_checked: int = 0  # image files training would try to read
    images_used: int = 0  # of those, the ones it will train on

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def passed(self, strict: bool = False) -> bool:
        """No errors (and, if ``strict``, no warnings either); info findings never fail a check."""
        return not self.errors and not (strict and self.warnings)

    def counts(self) -> dict[str, int]:
        """Findings per kind, in :data:`KINDS` order, kinds with none left out."""
        out = {kind: 0 for kind in KINDS}
        for f in self.findings:
            out[f.kind] += 1
        return {k: n for k, n in out.items() if n}

    def by_file(self) -> dict[Path, list[Finding]]:
        out: dict[Path, list[Finding]] = {}
        for f in self.findings:
            out.setdefault(f.path, []).append(f)
        return out

    def to_dict(self, strict: bool = False) -> dict:
        """JSON-ready form (``sdtune data check --json``)."""
        opts = {k: v for k, v in asdict(self.options).items() if k != "count_tokens"}
        opts["tokens_counted"] = self.options.count_tokens is not None
        return {
            "path": str(self.root),
            "source": self.source_kind,
            "passed": self.passed(strict),
            "strict": strict,
            "images_checked": self.images_checked,
            "images_used": self.images_used,
            "options": opts,
            "counts": self.counts(),
            "files": [
                {
                    "path": str(path),
                    "findings": [
                        {"kind": f.kind, "severity": f.severity, "message": f.message, "action": f.action}
                        for f in found
                    ],
                }
                for path, found in self.by_file().items()
            ],
        }


# -- perceptual hash --------------------------------------------------------------------------------------------

_HASH_SIDE = 32
_k = np.arange(_HASH_SIDE)
_DCT = np.cos(np.pi * (2 * _k[None, :] + 1) * _k[:, None] / (2 * _HASH_SIDE))  # DCT-II basis, rows = frequencies


def perceptual_hash(image: Image.Image) -> int | None:
    """63-bit pHash (Zauner 2010): grey 32x32, 2-D DCT, the 8x8 lowest frequencies without the DC term, each bit
    = coefficient above their median. Robust to re-encoding, resizing and brightness. ``None`` for a flat image,
    whose bits would be noise."""
    grey = np.asarray(image.convert("L").resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.BOX), dtype=np.float64)
    if grey.std() < 1.0:
        return None
    low = (_DCT @ grey @ _DCT.T)[:8, :8].ravel()[1:]
    value = 0
    for bit in low > np.median(low):
        value = (value << 1) | int(bit)
    return value


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return (a ^ b).bit_count()


# -- one image --------------------------------------------------------------------------------------------------


@dataclass
class _Seen:
    sha256: str
    phash: int | None


def _failure_kind(exc: BaseException, path: Path) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno == errno.ELOOP:
            return "symlink_loop"
        if exc.errno == errno.ENOENT and path.is_symlink():
            return "broken_symlink"
        return "unreadable"
    reason = decode_failure(exc)
    if reason == "not an image":
        return "not_an_image"
    if reason == "truncated file":
        return "truncated"
    if reason.startswith("too many pixels"):
        return "decompression_bomb"
    return "corrupt"


def _is_png16(data: bytes) -> bool:
    # IHDR is the first chunk: 8-byte signature, length, "IHDR", width, height, then the bit depth at byte 24.
    return data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 24 and data[24] == 16


def _alpha_action(im: Image.Image) -> str:
    alpha = im.convert("RGBA").getchannel("A")
    lo, _ = alpha.getextrema()
    if lo == 255:
        return "alpha channel is fully opaque: dropped"
    return "transparent pixels flattened onto white"


def _inspect_image(path: Path, opts: CheckOptions) -> tuple[list[Finding], _Seen | None]:
    """Decode ``path`` as training would; findings, and its hashes if training will use it."""
    out: list[Finding] = []

    def add(kind: str, message: str, action: str) -> None:
        out.append(Finding(path, kind, message, action))

    try:
        if os.stat(path).st_size == 0:
            add("zero_byte", "0 bytes", "skipped: empty file")
            return out, None
        data = path.read_bytes()
    except OSError as exc:
        kind = _failure_kind(exc, path)
        add(kind, exc.strerror or str(exc), f"skipped: {decode_failure(exc)}")
        return out, None
    try:
        with warnings.catch_warnings():
            # Over the warning limit Pillow decodes anyway; the check reports it instead of spending the memory.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        limit = Image.MAX_IMAGE_PIXELS
        if limit and im.width * im.height > limit:
            mp = im.width * im.height / 1e6
            add(
                "huge_image",
                f"{im.width}x{im.height} ({mp:.0f} MP) is past Pillow's {limit / 1e6:.0f} MP bomb warning",
                "training decodes it (slowly, with a warning); not decoded by the check, so it may still be broken",
            )
            return out, _Seen(hashlib.sha256(data).hexdigest(), None)
        im.load()
    except Exception as exc:  # noqa: BLE001 - every decode failure is classified like training does
        kind = _failure_kind(exc, path)
        message = f"no image format starts with {data[:12]!r}" if kind == "not_an_image" else str(exc)
        add(kind, message or type(exc).__name__, f"skipped: {decode_failure(exc)}")
        return out, None

    mode = im.mode
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        add("animated", f"{frames} frames", "only the first frame is trained on")
    orientation = 1
    try:
        orientation = int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block: training leaves the image as stored too
        pass
    if orientation in _ORIENTATION:
        add("exif_rotated", f"EXIF orientation {orientation}", f"rotated upright: {_ORIENTATION[orientation]}")
    if mode == "CMYK":
        how = "through its ICC profile" if im.info.get("icc_profile") else "with Pillow's plain formula (no profile)"
        add("cmyk", "CMYK colours", f"converted to RGB {how}")
    if mode in _HIGH_BIT_MODES:
        add("high_bit_depth", f"mode {mode}", "scaled to 8-bit grey, then RGB")
    elif _is_png16(data):
        add("high_bit_depth", "16-bit colour PNG", "Pillow keeps the top 8 bits of each channel")
    if mode in ("P", "PA"):
        add("palette", f"mode {mode}", "palette colours converted to RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        what = f"mode {mode}" + (" with a transparent colour" if mode not in _ALPHA_MODES else "")
        add("alpha", what, _alpha_action(im))
    if mode in _GREY_MODES:
        add("grayscale", f"mode {mode}", "grey repeated into R, G and B")

    w, h = (im.height, im.width) if orientation in (5, 6, 7, 8) else (im.width, im.height)
    if min(w, h) < opts.min_side:
        add("too_small", f"{w}x{h} px, under {opts.min_side} px", "upscaled to the training resolution (blurry)")
    ratio = max(w, h) / min(w, h)
    if ratio > opts.max_aspect:
        add(
            "extreme_aspect",
            f"{w}x{h} px, aspect {ratio:.1f}:1 (limit {opts.max_aspect:g}:1)",
            f"the centre square crop keeps {100 / ratio:.0f}% of it",
        )
    try:
        phash = perceptual_hash(upright_rgb(im))
    except Exception:  # noqa: BLE001 - conversion problems surface in training's own load; no hash here
        phash = None
    return out, _Seen(hashlib.sha256(data).hexdigest(), phash)


# -- captions ---------------------------------------------------------------------------------------------------


def _caption_findings(entry: Entry, sources: Sources, opts: CheckOptions) -> list[Finding]:
    image = entry.image
    out: list[Finding] = []
    caption_file = entry.caption_file
    caption = entry.caption
    if caption is None:  # folder sources: the data.* sidecar / file-name rules
        caption_file = sidecar_of(image, opts.caption_extension)
        if caption_file is None:
            name = caption_for(image, "", opts.filename_word_regex, opts.filename_join)
            others = [s for s in (".txt", ".caption") if s != opts.caption_extension and sidecar_of(image, s)]
            hint = f" ({image.stem}{others[0]} exists: set the caption extension to {others[0]})" if others else ""
            return [
                Finding(
                    image,
                    "missing_caption",
                    f"no {image.stem}{opts.caption_extension}{hint}",
                    f"caption from the file name: {name!r}",
                )
            ]
    elif caption_file is None and sources.kind in ("kohya_folders", "kohya_toml"):
        out.append(Finding(image, "missing_caption", "no caption file", f"trained with the class words {caption!r}"))
    if caption_file is not None:
        try:
            raw = caption_file.read_bytes()
        except OSError as exc:
            return [Finding(image, "caption_unreadable", f"{caption_file.name}: {exc.strerror}", "training stops here")]
        try:
            raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            text = raw.decode("latin-1")
            out.append(
                Finding(
                    image,
                    "caption_not_utf8",
                    f"{caption_file.name}: byte 0x{raw[exc.start]:02x} at {exc.start} is not UTF-8",
                    f"read as Latin-1: {text.strip()[:60]!r}; re-save it as UTF-8 if that is wrong",
                )
            )
        if caption is None:
            caption = caption_for(image, opts.caption_extension)
    if not caption.strip():
        where = caption_file.name if caption_file else "the manifest"
        out.append(Finding(image, "empty_caption", f"{where} is empty", "trained with an empty caption"))
    elif opts.count_tokens is not None and len("".join(caption.split()).encode()) > opts.max_tokens:
        # Every CLIP BPE token covers at least one UTF-8 byte, so shorter captions cannot overflow: no tokenizer call.
        n = opts.count_tokens(caption)
        if n > opts.max_tokens:
            out.append(
                Finding(
                    image,
                    "caption_too_long",
                    f"{n} CLIP tokens, the window holds {opts.max_tokens}",
                    f"tokens past {opts.max_tokens} (fewer with template words) are cut off",
                )
            )
    return out


# -- folders ----------------------------------------------------------------------------------------------------


def _listing_findings(folder: Path, sources: Sources, read_folders: set[Path], opts: CheckOptions) -> list[Finding]:
    """Things in ``folder`` that are not dataset images: sub-folders, other picture formats, previews, captions."""
    out: list[Finding] = []
    try:
        items = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise DataError(f"{folder}: cannot list the folder ({exc.strerror}); check its permissions") from None
    stems = {p.stem for p in items if p.suffix.lower() in IMAGE_SUFFIXES}
    for item in items:
        suffix = item.suffix.lower()
        if is_hidden(item):
            continue  # hidden images come back from the sources as skipped; other dot files are not data
        if item.is_dir():
            if item in read_folders:
                continue
            named = suffix in IMAGE_SUFFIXES or suffix in OTHER_PICTURE_SUFFIXES
            what = "a folder named like an image" if named else "a sub-folder"
            if sources.kind == "kohya_folders":
                why = "not an N_name folder"
            elif sources.kind == "folder":
                why = "only the images directly in the folder are read"
            else:
                why = "not listed by the dataset config"
            out.append(Finding(item, "directory", what, f"not read ({why})"))
        elif suffix in OTHER_PICTURE_SUFFIXES:
            known = " ".join(IMAGE_SUFFIXES)
            out.append(Finding(item, "unsupported_format", f"{suffix} file", f"not read (training reads {known})"))
        elif item.name.lower().endswith(".preview.png"):
            out.append(Finding(item, "preview", "a training preview", "never trained on"))
        elif (
            sources.kind in ("folder", "kohya_folders") and suffix == opts.caption_extension and item.stem not in stems
        ):
            out.append(Finding(item, "orphan_caption", "no image with this name", "not used"))
    return out


def check_dataset(path: str | Path, options: CheckOptions | None = None) -> CheckReport:
    """Check the dataset at ``path`` (a folder, kohya ``N_name`` folders, a kohya ``.toml`` or a ``.jsonl``).

    Every image training would read is decoded once (Pillow's default pixel limit applies); every finding
    says what training will do with the file. Exact duplicates are found by SHA-256 of the bytes, near
    duplicates by :func:`perceptual_hash` within ``options.near_duplicate_distance`` bits; the later file of
    a pair (by path) is the one flagged. Raises :class:`DataError` only if ``path`` itself cannot be read.
    """
    opts = options or CheckOptions()
    root = Path(path)
    sources = load_sources(root, opts.caption_extension)
    report = CheckReport(root, sources.kind, opts)
    findings = report.findings

    for item in sources.skipped:
        if item.reason == "hidden file":
            findings.append(Finding(item.path, "hidden", "name starts with '.'", "not read"))
        elif item.reason.startswith("unsupported format"):
            findings.append(Finding(item.path, "unsupported_format", item.reason, "not read"))
        else:  # manifest lines whose image or mask file is not there
            findings.append(Finding(item.path, "missing", item.reason, "skipped"))
    folders = list(dict.fromkeys([*([root] if root.is_dir() else []), *sources.folders]))
    for folder in folders:
        findings += _listing_findings(folder, sources, set(sources.folders), opts)

    seen: dict[Path, _Seen] = {}
    broken: set[Path] = set()
    captions_done: set[tuple[Path, str]] = set()
    for entry in sources.entries:
        image = entry.image
        if image not in seen and image not in broken:
            report.images_checked += 1
            found, info = _inspect_image(image, opts)
            findings += found
            if info is None:
                broken.add(image)  # skipped by training: its caption does not matter
            else:
                seen[image] = info
                report.images_used += 1
        if image in seen and (image, entry.source) not in captions_done:
            captions_done.add((image, entry.source))
            findings += _caption_findings(entry, sources, opts)
    findings += _duplicate_findings(seen, opts)
    if not report.images_used:
        findings.append(Finding(root, "no_images", f"no usable {' '.join(IMAGE_SUFFIXES)} image", "training stops"))
    order = {kind: i for i, kind in enumerate(KINDS)}
    findings.sort(key=lambda f: (str(f.path), order[f.kind]))
    return report


def _duplicate_findings(seen: dict[Path, _Seen], opts: CheckOptions) -> list[Finding]:
    out: list[Finding] = []
    paths = sorted(seen, key=str)
    first_with: dict[str, Path] = {}
    for path in paths:
        sha = seen[path].sha256
        if sha in first_with:
            out.append(Finding(path, "exact_duplicate", f"same bytes as {first_with[sha].name}", "trained on twice"))
        else:
            first_with[sha] = path
    originals = [p for p in paths if first_with[seen[p].sha256] == p and seen[p].phash is not None]
    for i, path in enumerate(originals):
        for earlier in originals[:i]:
            d = hamming(seen[path].phash, seen[earlier].phash)  # type: ignore[arg-type]
            if d <= opts.near_duplicate_distance:
                out.append(
                    Finding(
                        path,
                        "near_duplicate",
                        f"looks like {earlier.name} (pHash distance {d} <= {opts.near_duplicate_distance})",
                        "trained on as a separate image",
                    )
                )
                break
    return out


# -- contact sheet ----------------------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _thumbnail(path: Path, side: int) -> Image.Image | None:
    """What training would see of ``path``, shrunk to fit ``side``; ``None`` if it cannot or should not decode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.draft("RGB", (side, side))  # JPEG: decode at a reduced scale
                rgb = upright_rgb(im)
                rgb.thumbnail((side, side))
                return rgb.copy()
    except Exception:  # noqa: BLE001 - broken files become grey tiles
        return None


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines += [word[i : i + width] for i in range(0, len(word), width)]
    return lines


def write_contact_sheet(report: CheckReport, dest: str | Path, tile: int = 160, max_tiles: int = 400) -> Path | None:
    """Write a PNG grid of the files with errors or warnings: a thumbnail of what training sees (a grey tile
    for files that do not decode) with the file name and its findings under it. Written atomically; returns
    ``dest``, or ``None`` when nothing is flagged. At most ``max_tiles`` files (the first by path)."""
    flagged = [
        (path, found)
        for path, found in report.by_file().items()
        if any(f.severity != "info" for f in found) and not path.is_dir() and found[0].kind != "no_images"
    ][:max_tiles]
    if not flagged:
        return None
    font = _font(11)
    chars = max(8, tile // 7)
    labels = []
    for path, found in flagged:
        kinds = ", ".join(f.kind for f in found if f.severity != "info")
        name_lines = [(line, (0, 0, 0)) for line in _wrap(path.name, chars)[:2]]
        labels.append(name_lines + [(line, (160, 0, 0)) for line in _wrap(kinds, chars)[:4]])
    line_h = 13
    label_h = line_h * max(len(lines) for lines in labels) + 6
    cols = min(8, len(flagged))
    rows = -(-len(flagged) // cols)
    pad = 6
    sheet = Image.new("RGB", (cols * (tile + pad) + pad, rows * (tile + label_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for n, ((path, found), lines) in enumerate(zip(flagged, labels, strict=True)):
        x = pad + (n % cols) * (tile + pad)
        y = pad + (n // cols) * (tile + label_h + pad)
        error = any(f.severity == "error" for f in found)
        thumb = None if error or "huge_image" in {f.kind for f in found} else _thumbnail(path, tile)
        if thumb is None:
            draw.rectangle((x, y, x + tile - 1, y + tile - 1), fill=(150, 150, 150))
            draw.text((x + 6, y + tile // 2 - 6), "not decoded", fill=(255, 255, 255), font=font)
        else:
            sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
        draw.rectangle((x, y, x + tile - 1, y + tile - 1), outline=(200, 0, 0) if error else (230, 150, 0), width=2)
        for i, (line, colour) in enumerate(lines):
            draw.text((x + 2, y + tile + 3 + i * line_h), line, fill=colour, font=font)
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        sheet.save(tmp, format="PNG")
    return dest
