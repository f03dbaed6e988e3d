"""Dataset-tool throughput: bucket assignment and ``sdtune data prep``, in images per second.

    python benchmarks/data_throughput.py [--n 1000] [--resolution 512] [--keep DIR]

Builds a folder of ``n`` procedural JPEGs (gradients with a shape and light noise; long side 384-768 px,
aspect ratios 1:3 to 3:1) with caption sidecars in a temporary folder (``--keep DIR``: in DIR, kept; use a new
DIR each time), then times each stage on it.

Structure: one ``stage_*`` function per stage, ``(data folder, work folder, resolution) -> Row``, listed in
``STAGES`` and picked with ``--stages``. ``check`` is ``sdtune data check`` (full decode, hashes, pHash, captions);
``cache`` fills the disk latent cache (``data.cache_dir``: decode, crop, encode, write) and ``cache-warm`` loads the
same folder again (hash the files, read the cache; nothing encoded). The VAE is a narrow one built here (8-16
channels, SD's 8x downsampling and 4 latent channels): the cache rows measure sdtune's own work, not a real VAE's
encode. Run it alone: on 2 cores anything else running skews the numbers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sdtune.data.buckets import BucketOptions, assign_buckets, bucket_histogram
from sdtune.data.images import scan_images
from sdtune.data.prep import PrepOptions, image_size, prep_folder


@dataclass
class Row:
    """One timed stage: ``images`` handled in ``seconds``; ``note`` says what was measured."""

    stage: str
    images: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


def build_dataset(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEGs of mixed aspect ratios (long side 384-768 px) with a ``.txt`` caption each."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = ("circle", "square", "triangle")
    for i in range(n):
        aspect = float(np.exp(rng.uniform(np.log(1 / 3), np.log(3))))
        long_side = int(rng.integers(384, 769))
        w, h = (
            (long_side, max(128, round(long_side / aspect)))
            if aspect >= 1
            else (max(128, round(long_side * aspect)), long_side)
        )
        x = np.linspace(0.0, 1.0, w)[None, :, None]
        y = np.linspace(0.0, 1.0, h)[:, None, None]
        c0, c1, c2 = rng.uniform(0, 255, size=(3, 3))
        arr = c0 * (1 - x) + c1 * x * (1 - y) + c2 * y * 0.5 + rng.normal(0, 6, size=(h, w, 1))
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        shape = shapes[i % 3]
        cx, cy, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(20, min(w, h) // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        im.save(folder / f"{i:05d}.jpg", quality=90)
        (folder / f"{i:05d}.txt").write_text(f"a {shape}, gradient background, photo {i % 7}\n", encoding="utf-8")
    return folder


def stage_bucket_assignment(data: Path, work: Path, resolution: int) -> Row:
    """Header reads (EXIF-aware sizes) + vectorised nearest-aspect assignment; no decoding."""
    paths = sorted(data.glob("*.jpg"))
    start = time.perf_counter()
    sizes = [image_size(p) for p in paths]
    assigned = assign_buckets(sizes, BucketOptions(resolution))
    seconds = time.perf_counter() - start
    hist = bucket_histogram(assigned)
    return Row("bucket assignment", len(paths), seconds, f"{len(hist)} buckets used")


def stage_bucket_assignment_only(data: Path, work: Path, resolution: int) -> Row:
    """The assignment arithmetic alone, on sizes already read (1000 sizes repeated to 100k)."""
    sizes = [image_size(p) for p in sorted(data.glob("*.jpg"))]
    many = sizes * max(1, 100_000 // len(sizes))
    start = time.perf_counter()
    assign_buckets(many, BucketOptions(resolution))
    return Row("bucket math only", len(many), time.perf_counter() - start, "sizes in memory")


def stage_scan(data: Path, work: Path, resolution: int) -> Row:
    """``scan_images``: every image fully decoded once (prep does this before its own pass)."""
    start = time.perf_counter()
    good, _ = scan_images(data)
    return Row("scan (decode check)", len(good), time.perf_counter() - start)


def stage_prep(data: Path, work: Path, resolution: int) -> Row:
    """``prep_folder`` with buckets and centre crops, PNG output, captions copied (scan included)."""
    options = PrepOptions(size=BucketOptions(resolution), buckets=True)
    start = time.perf_counter()
    report = prep_folder(data, work / "prep-buckets", options)
    return Row("prep buckets (png)", report.sources, time.perf_counter() - start, f"{report.images} written")


def stage_prep_focal_flip(data: Path, work: Path, resolution: int) -> Row:
    """``prep_folder`` with entropy focal crops and flipped copies, JPEG output."""
    options = PrepOptions(size=BucketOptions(resolution), buckets=True, crop="entropy", flip=True, image_format="jpg")
    start = time.perf_counter()
    report = prep_folder(data, work / "prep-focal", options)
    return Row("prep focal+flip (jpg)", report.sources, time.perf_counter() - start, f"{report.images} written")


def stage_check(data: Path, work: Path, resolution: int) -> Row:
    """``check_dataset``: every image decoded, SHA-256 and pHash duplicates, caption checks (no contact sheet)."""
    from sdtune.data.check import check_dataset

    start = time.perf_counter()
    report = check_dataset(data)
    seconds = time.perf_counter() - start
    return Row("data check", len(sorted(data.glob("*.jpg"))), seconds, f"{len(report.findings)} findings")


def _cache_load(data: Path, work: Path, resolution: int):
    import torch
    from diffusers import AutoencoderKL

    from sdtune.config.blocks import DataConfig
    from sdtune.data.dataset import ImageCaptionSet

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    ).eval()
    cfg = DataConfig(path=str(data), cache_dir=str(work / "latent-cache"), latent_sampling="deterministic")
    start = time.perf_counter()
    with torch.no_grad():
        loaded = ImageCaptionSet.load(cfg, vae, resolution, seed=0)
    return loaded, time.perf_counter() - start


def stage_cache(data: Path, work: Path, resolution: int) -> Row:
    """``ImageCaptionSet.load`` with ``data.cache_dir`` on an empty cache: decode, crop, encode, write each image."""
    loaded, seconds = _cache_load(data, work, resolution)
    return Row("latent cache cold", len(loaded), seconds, f"{loaded.cache.encoded_count} encoded (narrow VAE)")


def stage_cache_warm(data: Path, work: Path, resolution: int) -> Row:
    """The same load again: decode check + file hashes + cache reads; nothing is encoded."""
    _cache_load(data, work, resolution)  # fills the cache if the cold stage did not run
    loaded, seconds = _cache_load(data, work, resolution)
    return Row("latent cache warm", len(loaded), seconds, f"{loaded.cache.encoded_count} encoded")


Stage = Callable[[Path, Path, int], Row]
STAGES: dict[str, Stage] = {
    "buckets": stage_bucket_assignment,
    "bucket-math": stage_bucket_assignment_only,
    "scan": stage_scan,
    "prep": stage_prep,
    "prep-focal": stage_prep_focal_flip,
    "check": stage_check,
    "cache": stage_cache,
    "cache-warm": stage_cache_warm,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="number of images to build")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--stages", nargs="*", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--keep", type=Path, default=None, help="build the dataset here and keep it")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sdtune-data-bench-") as tmp:
        root = args.keep or Path(tmp)
        start = time.perf_counter()
        data = build_dataset(root / "images", args.n)
        print(f"built {args.n} images in {time.perf_counter() - start:.1f}s at {data}")
        print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, cpus={os.cpu_count()}")
        print("| stage | images | seconds | images/s | note |\n|---|---|---|---|---|")
        for name in args.stages:
            row = STAGES[name](data, root, args.resolution)
            print(f"| {row.stage} | {row.images} | {row.seconds:.2f} | {row.rate:,.0f} | {row.note} |", flush=True)


if __name__ == "__main__":
    main()
