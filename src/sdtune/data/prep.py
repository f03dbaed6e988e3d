"""Dataset preparation: a folder of images in, a new folder of training-ready images out.

Each decodable image (:func:`sdtune.data.images.scan_images`) is turned upright (EXIF), converted to RGB, optionally
split into tiles when it is far larger than the training resolution, then resized and cropped to a square
``resolution`` or to its aspect-ratio bucket (:mod:`sdtune.data.buckets`). Crops are centred, random (seeded) or
put on the most detailed part of the image (a focal point found by local entropy or edge density, with
numpy only). Flipped and colour-jittered copies can be added; caption sidecars travel with every output.

Safety: the source folder is only read. Output goes to a new folder; a non-empty one is refused unless
``overwrite``, and even then only files listed in the folder's manifest (``.sdtune-prep.json``, the files an
earlier prep wrote, with their hashes) are replaced or removed; a file sdtune did not write, or one edited since,
stops the run before anything is written. Every file is written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from sdtune.core.atomic import write_bytes, write_text
from sdtune.core.errors import DataError
from sdtune.data.buckets import Bucket, BucketOptions, assign_bucket, crop_box, make_buckets, random_center
from sdtune.data.captions import caption_for
from sdtune.data.images import Skipped, scan_images, upright_rgb

CROP_MODES = ("center", "random", "entropy", "edges")
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
MANIFEST = ".sdtune-prep.json"
# Downscaled size (long side) at which focal points are searched, and the side of a detail cell there.
_FOCAL_SIDE = 256
_FOCAL_CELL = 8


@dataclass(frozen=True)
class ColorJitter:
    """Seeded colour augmentation: each factor is drawn uniformly from ``[1 - x, 1 + x]``, the hue shift from
    ``[-hue, hue]`` of a full turn (torchvision's ``ColorJitter`` convention)."""

    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise DataError(f"{name}: jitter must be in [0, 1) (got {value}); e.g. 0.2")
        if not 0.0 <= self.hue <= 0.5:
            raise DataError(f"hue: jitter must be in [0, 0.5] turns (got {self.hue}); e.g. 0.05")

    def apply(self, im: Image.Image, rng: random.Random) -> Image.Image:
        """A jittered copy of the RGB image ``im``; always draws four numbers from ``rng``."""
        draws = [rng.uniform(-1.0, 1.0) for _ in range(4)]
        im = ImageEnhance.Brightness(im).enhance(1.0 + self.brightness * draws[0])
        im = ImageEnhance.Contrast(im).enhance(1.0 + self.contrast * draws[1])
        im = ImageEnhance.Color(im).enhance(1.0 + self.saturation * draws[2])
        shift = round(self.hue * draws[3] * 256)
        if shift:
            hsv = np.array(im.convert("HSV"))
            hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
            im = Image.fromarray(hsv, mode="HSV").convert("RGB")
        return im


@dataclass(frozen=True)
class PrepOptions:
    """What ``sdtune data prep`` does to each image (see the module docstring).

    ``size.resolution`` is the square side, or with ``buckets`` the target area's side. ``split_factor`` > 0
    splits an image whose sides both exceed ``split_factor * resolution`` into a grid of tiles, each side at most
    ``split_factor * resolution`` (and above half that). ``color_copies`` writes that many jittered copies.
    """

    size: BucketOptions = field(default_factory=BucketOptions)
    buckets: bool = False
    crop: str = "center"
    seed: int = 0
    split_factor: float = 0.0
    flip: bool = False
    color_copies: int = 0
    jitter: ColorJitter = field(default_factory=ColorJitter)
    image_format: str = "png"
    caption_extension: str = ".txt"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.crop not in CROP_MODES:
            raise DataError(f"crop: unknown mode '{self.crop}'; choose one of {', '.join(CROP_MODES)}")
        if self.image_format not in IMAGE_FORMATS:
            raise DataError(f"format: unknown '{self.image_format}'; choose one of {', '.join(IMAGE_FORMATS)}")
        if self.size.no_upscale and not self.buckets:
            raise DataError("no_upscale: only applies to buckets; add --buckets or drop --no-upscale")
        if self.split_factor and self.split_factor < 1.0:
            raise DataError(f"split_factor: must be 0 (off) or at least 1 (got {self.split_factor}); e.g. 2")
        if self.color_copies < 0:
            raise DataError(f"color_copies: must be 0 or more (got {self.color_copies}); e.g. 2")


@dataclass
class PrepReport:
    """What a prep run did. ``buckets`` counts written images (copies included) per output size."""

    out: Path
    sources: int = 0
    images: int = 0
    tiles: int = 0
    flipped: int = 0
    colored: int = 0
    captions: int = 0
    removed: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    buckets: dict[Bucket, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Plan:
    """One source image: its tile grid (columns, rows) and the output stem of each tile, row by row."""

    source: Path
    grid: tuple[int, int]
    stems: tuple[str, ...]


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image as it will be shown (EXIF orientation applied), from its header only."""
    with Image.open(path) as im:
        width, height = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - malformed EXIF: load_image also leaves such images as stored
            orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def open_rgb(path: Path) -> Image.Image:
    """Decode ``path`` upright (EXIF orientation) as 8-bit RGB, transparency over white."""
    try:
        with Image.open(path) as opened:
            im = upright_rgb(opened)
            im.load()
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise DataError(f"{path}: cannot load the image ({exc}); remove it or re-save it as PNG") from None
    return im


def tile_grid(width: int, height: int, resolution: int, factor: float) -> tuple[int, int]:
    """(columns, rows) to split an image into; (1, 1) unless both sides exceed ``factor * resolution``."""
    limit = factor * resolution
    if factor <= 0 or min(width, height) <= limit:
        return 1, 1
    return math.ceil(width / limit), math.ceil(height / limit)


def tiles(im: Image.Image, grid: tuple[int, int]) -> list[Image.Image]:
    """``im`` cut into a ``grid`` of (columns, rows) near-equal tiles, row by row."""
    cols, rows = grid
    if (cols, rows) == (1, 1):
        return [im]
    w, h = im.size
    xs = [round(i * w / cols) for i in range(cols + 1)]
    ys = [round(j * h / rows) for j in range(rows + 1)]
    return [im.crop((xs[i], ys[j], xs[i + 1], ys[j + 1])) for j in range(rows) for i in range(cols)]


def detail_map(im: Image.Image, mode: str) -> np.ndarray:
    """A coarse map (one value per ``_FOCAL_CELL`` px cell of a ~256 px copy) of where ``im`` has detail.

    ``entropy``: Shannon entropy of each cell's 32-level grey histogram (textures, text, faces score high,
    flat sky and walls zero). ``edges``: mean gradient magnitude of each cell (outlines and fine structure).
    """
    grey = im.convert("L")
    scale = min(1.0, _FOCAL_SIDE / max(grey.size))
    if scale < 1.0:
        grey = grey.resize(
            (max(1, round(grey.width * scale)), max(1, round(grey.height * scale))), Image.Resampling.BILINEAR
        )
    arr = np.asarray(grey, dtype=np.float32)
    c = _FOCAL_CELL
    gh, gw = math.ceil(arr.shape[0] / c), math.ceil(arr.shape[1] / c)
    if mode == "edges":
        gx = np.abs(np.diff(arr, axis=1, append=arr[:, -1:]))
        gy = np.abs(np.diff(arr, axis=0, append=arr[-1:, :]))
        values = np.hypot(gx, gy)
    elif mode == "entropy":
        values = np.floor(arr / 8.0)  # 32 grey levels
    else:
        raise ValueError(f"unknown focal mode {mode!r}")
    # Pad to whole cells with edge values so every pixel lands in a cell.
    values = np.pad(values, ((0, gh * c - values.shape[0]), (0, gw * c - values.shape[1])), "edge")
    cells = values.reshape(gh, c, gw, c).transpose(0, 2, 1, 3).reshape(gh, gw, c * c)
    if mode == "edges":
        return cells.mean(axis=-1)
    counts = np.stack([(cells == level).sum(axis=-1) for level in range(32)], axis=-1) / (c * c)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(counts > 0, counts * np.log2(counts), 0.0).sum(axis=-1)


def focal_center(im: Image.Image, bucket: Bucket, mode: str) -> tuple[float, float]:
    """The crop centre (fractions of width, height) whose bucket-shaped crop holds the most detail.

    Slides a window of the crop's size over :func:`detail_map` (summed-area table) and takes the best one; ties
    go to the window nearest the centre, so an image with uniform detail gets a centre crop.
    """
    detail = detail_map(im, mode)
    gh, gw = detail.shape
    left, top, right, bottom = crop_box(im.width, im.height, bucket)
    ww = min(gw, max(1, round((right - left) / im.width * gw)))
    wh = min(gh, max(1, round((bottom - top) / im.height * gh)))
    sat = np.pad(detail, ((1, 0), (1, 0))).cumsum(axis=0).cumsum(axis=1)
    sums = sat[wh:, ww:] - sat[:-wh, ww:] - sat[wh:, :-ww] + sat[:-wh, :-ww]
    ys, xs = np.nonzero(sums >= sums.max() - 1e-6 * max(1.0, abs(float(sums.max()))))
    cx, cy = (xs + ww / 2) / gw, (ys + wh / 2) / gh
    best = int(np.argmin((cx - 0.5) ** 2 + (cy - 0.5) ** 2))
    return float(cx[best]), float(cy[best])


def fit_to_bucket(im: Image.Image, bucket: Bucket, center: tuple[float, float] = (0.5, 0.5)) -> Image.Image:
    """Scale and crop ``im`` to exactly ``bucket`` (see :func:`crop_box`); Lanczos down, bicubic up."""
    box = crop_box(im.width, im.height, bucket, center)
    box_w = box[2] - box[0]
    if box_w == bucket.width and all(float(v).is_integer() for v in box):
        return im.crop(tuple(int(v) for v in box))  # no scaling: crop whole pixels instead of resampling
    resample = Image.Resampling.LANCZOS if box_w > bucket.width else Image.Resampling.BICUBIC
    return im.resize((bucket.width, bucket.height), resample=resample, box=box)


def _crop_center(im: Image.Image, bucket: Bucket, mode: str, rng: random.Random) -> tuple[float, float]:
    if mode == "random":
        return random_center(im.width, im.height, bucket, rng)
    if mode in ("entropy", "edges"):
        return focal_center(im, bucket, mode)
    return 0.5, 0.5


def _check_folders(src: Path, out: Path) -> None:
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r:
        raise DataError(f"{out}: is the source folder; prep never writes into its source, choose a new folder")
    if src_r in out_r.parents:
        raise DataError(f"{out}: is inside the source folder {src}; choose an output folder outside it")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file; choose a folder for the prepared images")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_manifest(out: Path) -> dict[str, str | None]:
    path = out / MANIFEST
    if not path.exists():
        return {}
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{path}: unreadable prep manifest; delete the folder's contents or choose a new one") from None
    return files


def _owned_files(out: Path, overwrite: bool) -> dict[str, str | None]:
    """The files an earlier prep wrote in ``out`` (name -> sha256, ``None`` while pending), after the safety checks."""
    if not out.exists():
        return {}
    present = [p for p in out.iterdir() if p.name != MANIFEST]
    if not present and not (out / MANIFEST).exists():
        return {}
    if not overwrite:
        raise DataError(
            f"{out}: is not empty; choose a new output folder, or add --overwrite to replace what an earlier "
            "sdtune prep wrote there"
        )
    owned = _read_manifest(out)
    for name, digest in owned.items():
        path = out / name
        if digest and path.is_file() and _sha256(path.read_bytes()) != digest:
            raise DataError(f"{path}: was changed after sdtune wrote it; move it out of {out} or choose a new folder")
    return owned


def _plan(paths: list[Path], options: PrepOptions) -> list[_Plan]:
    """Output stems for every source, decided before anything is written (so name clashes stop the run early)."""
    stem_count: dict[str, int] = {}
    for path in paths:
        stem_count[path.stem] = stem_count.get(path.stem, 0) + 1
    plans = []
    for path in paths:
        # a.jpg and a.png would both become a.png: keep their original suffix in the name.
        stem = path.stem if stem_count[path.stem] == 1 else f"{path.stem}-{path.suffix[1:].lower()}"
        grid = tile_grid(*image_size(path), options.size.resolution, options.split_factor)
        if grid == (1, 1):
            stems: tuple[str, ...] = (stem,)
        else:
            stems = tuple(f"{stem}-r{j}c{i}" for j in range(grid[1]) for i in range(grid[0]))
        plans.append(_Plan(path, grid, stems))
    return plans


def _variants(stem: str, options: PrepOptions) -> list[str]:
    names = [stem]
    if options.flip:
        names.append(f"{stem}-flip")
    names += [f"{stem}-color{k}" for k in range(1, options.color_copies + 1)]
    return names


def _planned_names(plans: list[_Plan], options: PrepOptions) -> dict[str, Path]:
    """Every output file name -> the source it comes from; a name two sources would write is an error."""
    ext = "." + options.image_format
    names: dict[str, Path] = {}
    for plan in plans:
        caption = _caption_sidecar(plan.source, options.caption_extension)
        for stem in plan.stems:
            for variant in _variants(stem, options):
                files = [variant + ext]
                if caption is not None or variant != plan.source.stem:
                    files.append(variant + options.caption_extension)
                for name in files:
                    if name in names and names[name] != plan.source:
                        raise DataError(
                            f"{name}: both {names[name].name} and {plan.source.name} would write it; rename one"
                        )
                    names[name] = plan.source
    return names


def _caption_sidecar(image: Path, extension: str) -> Path | None:
    sidecar = image.with_name(image.stem + extension)
    return sidecar if extension and sidecar != image and sidecar.is_file() else None


def _encode(im: Image.Image, image_format: str) -> bytes:
    buf = io.BytesIO()
    kind = IMAGE_FORMATS[image_format]
    # PNG level 1 encodes ~4x faster than Pillow's default 6 for files ~10 % larger (measured on 576x448 photos).
    im.save(buf, format=kind, **({"quality": 95} if kind in ("JPEG", "WEBP") else {"compress_level": 1}))
    return buf.getvalue()


class _Writer:
    """Writes output files atomically, with the permissions a plain write would give, and records their hashes."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.written: dict[str, str] = {}
        umask = os.umask(0)
        os.umask(umask)
        self.mode = 0o666 & ~umask

    def write(self, name: str, data: bytes) -> None:
        write_bytes(self.out / name, data)
        os.chmod(self.out / name, self.mode)  # mkstemp creates 0600 files
        self.written[name] = _sha256(data)

    def manifest(self, files: dict[str, str | None]) -> None:
        """Record ``files`` (name -> sha256, ``None`` while not yet written) as sdtune's in the folder."""
        body = {"tool": "sdtune data prep", "files": dict(sorted(files.items()))}
        write_text(self.out / MANIFEST, json.dumps(body, indent=1) + "\n")
        os.chmod(self.out / MANIFEST, self.mode)


def prep_folder(
    src: str | Path,
    out: str | Path,
    options: PrepOptions,
    progress: Callable[[Path], None] = lambda path: None,
) -> PrepReport:
    """Prepare every decodable image in ``src`` into ``out`` (see the module docstring); ``src`` is only read.

    Raises :class:`DataError` (before writing anything) for ``out`` equal to or inside ``src``, a non-empty
    ``out`` without ``overwrite``, or a file in ``out`` that sdtune did not write and an output would replace.
    ``progress`` is called with each source before it is processed.
    """
    src, out = Path(src), Path(out)
    _check_folders(src, out)
    paths, skipped = scan_images(src)
    owned = _owned_files(out, options.overwrite)
    plans = _plan(paths, options)
    planned = _planned_names(plans, options)
    for name in planned:
        if (out / name).exists() and name not in owned:
            raise DataError(
                f"{out / name}: exists and was not written by sdtune prep; move it away or choose a new folder"
            )

    out.mkdir(parents=True, exist_ok=True)
    writer = _Writer(out)
    # Recorded before writing, so a crash leaves files the next --overwrite run knows are sdtune's.
    writer.manifest({**owned, **dict.fromkeys(planned)})
    report = PrepReport(out=out, sources=len(paths), skipped=skipped)
    grid_buckets = make_buckets(options.size) if options.buckets else []
    counts: dict[Bucket, int] = {}
    for plan in plans:
        progress(plan.source)
        _prep_one(plan, options, grid_buckets, writer, report, counts)

    stale = [name for name in owned if name not in planned]
    for name in stale:
        path = out / name
        if path.is_file():
            path.unlink()
            report.removed += 1
    writer.manifest(dict(writer.written))
    report.buckets = {b: counts[b] for b in sorted(counts, key=lambda b: (b.aspect, b.area))}
    return report


def _prep_one(
    plan: _Plan,
    options: PrepOptions,
    grid_buckets: list[Bucket],
    writer: _Writer,
    report: PrepReport,
    counts: dict[Bucket, int],
) -> None:
    # One generator per source, seeded by its name: results do not depend on which other images are present.
    rng = random.Random(f"{options.seed}/{plan.source.name}")
    sidecar = _caption_sidecar(plan.source, options.caption_extension)
    caption_bytes = sidecar.read_bytes() if sidecar else None
    filename_caption = None if sidecar else caption_for(plan.source, options.caption_extension)
    ext = "." + options.image_format
    parts = tiles(open_rgb(plan.source), plan.grid)
    report.tiles += len(parts) if len(parts) > 1 else 0
    for stem, part in zip(plan.stems, parts, strict=True):
        if options.buckets:
            bucket = assign_bucket(part.width, part.height, grid_buckets, options.size)
        else:
            bucket = Bucket(options.size.resolution, options.size.resolution)
        base = fit_to_bucket(part, bucket, _crop_center(part, bucket, options.crop, rng))
        outputs = [(stem, base)]
        if options.flip:
            outputs.append((f"{stem}-flip", ImageOps.mirror(base)))
            report.flipped += 1
        for k in range(1, options.color_copies + 1):
            outputs.append((f"{stem}-color{k}", options.jitter.apply(base, rng)))
            report.colored += 1
        for name, im in outputs:
            writer.write(name + ext, _encode(im, options.image_format))
            report.images += 1
            counts[bucket] = counts.get(bucket, 0) + 1
            # The caption follows every output; a file-name caption is written out once the name changes.
            if caption_bytes is not None:
                writer.write(name + options.caption_extension, caption_bytes)
                report.captions += 1
            elif name != plan.source.stem:
                writer.write(name + options.caption_extension, (filename_caption or "").encode("utf-8"))
                report.captions += 1
