"""Training examples loaded once: decoded images, caption text and cached VAE latents.

``data.path`` may be a folder, kohya ``N_name`` folders, a kohya ``.toml`` or a ``.jsonl`` manifest (see
:mod:`sdtune.data.sources`). Each image is decoded once; broken ones are reported by name and left out. An
entry with ``repeats = r`` becomes r examples that share one cached latent; examples are ordered in rounds
(every entry once, then every entry with repeats >= 2 again, ...) so the first examples are distinct images.

Also here: the train / validation / test partition (:mod:`sdtune.data.splits`), per-pixel loss weights from masks
(:mod:`sdtune.data.masks`, mirrored with their latents) and the disk cache of latents (``data.cache_dir``,
:mod:`sdtune.data.disk_cache`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sdtune.config.blocks import DataConfig
from sdtune.core.errors import DataError
from sdtune.data.buckets import BucketOptions, assign_buckets
from sdtune.data.captions import caption_for
from sdtune.data.disk_cache import DiskCache
from sdtune.data.images import IMAGE_SUFFIXES, Skipped, decode_all, load_image
from sdtune.data.latents import ImageFiles, LatentCache, Progress
from sdtune.data.masks import loss_weights
from sdtune.data.sources import Entry, Sources, load_sources
from sdtune.data.splits import Split, split_entries

# kohya TOML key -> the data.* field that sdtune applies once per run
_CONFIG_FIELD = {
    "batch_size": "batch_size",
    "keep_tokens": "keep_tags",
    "shuffle_caption": "shuffle_tags",
    "flip_aug": "flip",
    "caption_dropout_rate": "caption_dropout",
    "caption_tag_dropout_rate": "tag_dropout",
    "enable_bucket": "buckets",
    "bucket_reso_steps": "bucket_step",
    "min_bucket_reso": "min_bucket_side",
    "max_bucket_reso": "max_bucket_side",
    "bucket_no_upscale": "bucket_no_upscale",
}


def check_source_settings(sources: Sources, cfg: DataConfig, resolution: int) -> None:
    """Training options a kohya TOML sets must equal the run's: sdtune applies one value per run, and an option
    silently ignored would train something other than the TOML says. Raises :class:`DataError` naming both."""
    for s in sources.settings:
        if s.key == "resolution":
            sides = s.value if isinstance(s.value, list) else [s.value, s.value]
            if sides[0] != sides[1]:
                raise DataError(
                    f"{cfg.path}: {s.where} sets resolution = {s.value}; sdtune's resolution is one side (with "
                    f"data.buckets, of the target area {resolution}²); remove it from the TOML or make it square"
                )
            if sides[0] != resolution:
                raise DataError(
                    f"{cfg.path}: {s.where} sets resolution = {s.value}, but this run trains at {resolution} px; "
                    f"set data.resolution: {sides[0]} or remove resolution from the TOML"
                )
            continue
        name = _CONFIG_FIELD[s.key]
        ours = getattr(cfg, name)
        if s.value != ours:
            value, ours = (str(v).lower() if isinstance(v, bool) else v for v in (s.value, ours))
            raise DataError(
                f"{cfg.path}: {s.where} sets {s.key} = {value}, but data.{name} is {ours} and sdtune applies one "
                f"value per run; set data.{name}: {value} or remove {s.key} from the TOML"
            )


def has_validation(cfg: DataConfig) -> bool:
    """Whether ``cfg`` sets validation images aside (``data.validation_split`` or ``data.validation_path``)."""
    return bool(cfg.validation_split or cfg.validation_path)


def keep_decodable(entries: Sequence[Entry]) -> tuple[list[Entry], list[Skipped]]:
    """Decode every distinct image of ``entries`` once; the entries whose image decodes, and the others."""
    unique = list(dict.fromkeys(e.image for e in entries))
    good, skipped = decode_all(unique)
    ok = set(good)
    return [e for e in entries if e.image in ok], skipped


def _example_order(repeats: Sequence[int]) -> list[int]:
    """Entry index of each example: round r lists, in order, every entry with more than r repeats."""
    return [i for r in range(max(repeats, default=0)) for i, n in enumerate(repeats) if n > r]


@dataclass
class LatentGroup:
    """The images of one training size: the square resolution, or one aspect-ratio bucket (``data.buckets``)."""

    size: tuple[int, int]  # (width, height) in pixels
    cache: LatentCache
    images: torch.Tensor | None  # kept only when latents are not cached (encoded on every use)
    weights: torch.Tensor | None  # per-pixel loss weights [images, 1, h, w] on the latent grid; None: unmasked


@dataclass
class Batch:
    """What a training step needs from the data for some examples: latents ``[B, C, h, w]``, per-pixel loss weights
    ``[B, 1, h, w]`` (mirrored where the latent is) or ``None``, and per-sample loss weights ``[B]`` or ``None``
    (regularisation images at ``data.reg_weight``)."""

    latents: torch.Tensor
    mask: torch.Tensor | None
    weights: torch.Tensor | None


@dataclass
class ImageCaptionSet:
    """Training examples: ``captions[i]`` describes example i; :meth:`batch` gives latents and loss weights.

    Examples are entries times their repeats; ``image_index[i]`` is example i's image, and ``image_rows[j]`` is
    image j's ``(group, row)``: its :class:`LatentGroup` (one per training size) and row in that group's cache.
    """

    paths: list[Path]
    captions: list[str]
    groups: list[LatentGroup]
    vae: Any
    image_index: list[int] = field(default_factory=list)
    image_rows: list[tuple[int, int]] = field(default_factory=list)
    masks: list[Path | None] = field(default_factory=list)  # mask files named by the source (JSONL "mask")
    is_reg: list[bool] = field(default_factory=list)  # regularisation images: loss weighted by reg_weight
    sources: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    reg_weight: float = 1.0

    def __post_init__(self) -> None:
        n = len(self.paths)
        self.image_index = self.image_index or list(range(n))
        self.image_rows = self.image_rows or [(0, r) for r in range(len(self.groups[0].cache))]
        self.masks = self.masks or [None] * n
        self.is_reg = self.is_reg or [False] * n
        self.sources = self.sources or [""] * n

    @property
    def encodes_per_step(self) -> bool:
        """Whether :meth:`batch` runs the VAE (``latent_sampling: random`` keeps images, not latents)."""
        return any(g.images is not None for g in self.groups)

    # -- one-size views (the common case: no buckets) -----------------------------------------------------------
    def _only_group(self, what: str) -> LatentGroup:
        if len(self.groups) != 1:
            raise ValueError(f"{what}: this set has {len(self.groups)} bucket sizes; use .groups")
        return self.groups[0]

    @property
    def cache(self) -> LatentCache:
        """The latent cache (sets of one size only)."""
        return self._only_group("cache").cache

    @property
    def images(self) -> torch.Tensor | None:
        """The decoded images kept when latents are not cached (sets of one size only)."""
        return self._only_group("images").images

    @property
    def weights(self) -> torch.Tensor | None:
        """Per-pixel loss weights of every image (sets of one size only)."""
        return self._only_group("weights").weights

    @property
    def encoded_count(self) -> int:
        """How many VAE encodes loading this set took (0 when every latent came from the disk cache)."""
        return sum(g.cache.encoded_count for g in self.groups)

    def bucket_histogram(self) -> dict[tuple[int, int], int]:
        """Images per training size ``(width, height)``, each image once."""
        counts = [0] * len(self.groups)
        for group, _ in self.image_rows:
            counts[group] += 1
        return {g.size: c for g, c in zip(self.groups, counts, strict=True)}

    def example_groups(self) -> list[int]:
        """The size group of each example: a batch must take its examples from one group."""
        return [self.image_rows[j][0] for j in self.image_index]

    @classmethod
    def load(
        cls,
        cfg: DataConfig,
        vae: Any,
        resolution: int,
        seed: int,
        report: Callable[[Skipped], None] = lambda item: None,
        split: Split = "train",
        progress: EncodeProgress | None = None,
    ) -> ImageCaptionSet:
        """Read ``cfg.path`` (folder, kohya folders, kohya ``.toml`` or ``.jsonl``), decode and caption the images,
        report every left-out file by name through ``report``, and encode latents once (unless
        ``cfg.cache_latents`` is off).

        ``split`` picks the part of the partition set by ``data.validation_split`` / ``data.test_split`` (all
        images train when both are 0); ``"validation"`` with ``data.validation_path`` reads that path instead.
        Validation and test examples are each image once (no repeats). Files the source itself left out are
        reported with the training split only. ``progress(size, done, total)`` follows the latent encoding of each
        training size (``"512x512"``).
        """
        if split == "validation" and cfg.validation_path:
            sources = load_sources(cfg.validation_path, cfg.caption_extension)
            check_source_settings(sources, cfg, resolution)
            entries = [replace(e, repeats=1) for e in sources.entries]
            return cls.from_entries(entries, cfg, vae, resolution, seed, report, sources.skipped, progress)
        sources = load_sources(cfg.path, cfg.caption_extension)
        check_source_settings(sources, cfg, resolution)
        entries, skipped = sources.entries, sources.skipped
        if cfg.validation_split or cfg.test_split:
            parts = split_entries(entries, cfg.split_seed, cfg.validation_split, cfg.test_split)
            entries = parts[split] if split == "train" else [replace(e, repeats=1) for e in parts[split]]
            if split == "train" and sources.entries and not entries:
                raise DataError(
                    f"data.validation_split: {cfg.validation_split} and test_split {cfg.test_split} leave none of "
                    f"the {len(sources.entries)} images for training; lower them"
                )
            if split != "train":
                skipped = []
                if not entries:
                    field_name = "validation_split" if split == "validation" else "test_split"
                    raise DataError(
                        f"data.{field_name}: {getattr(cfg, field_name)} of {len(sources.entries)} images puts none "
                        f"in the {split} set; raise it or set data.validation_path"
                    )
        elif split != "train":
            raise DataError(f"{cfg.path}: no {split} images; set data.validation_split (e.g. 0.1) or validation_path")
        return cls.from_entries(entries, cfg, vae, resolution, seed, report, skipped, progress)

    @classmethod
    def from_entries(
        cls,
        entries: Sequence[Entry],
        cfg: DataConfig,
        vae: Any,
        resolution: int,
        seed: int,
        report: Callable[[Skipped], None] = lambda item: None,
        skipped: Sequence[Skipped] = (),
        progress: EncodeProgress | None = None,
    ) -> ImageCaptionSet:
        """Examples from normalized entries (see :mod:`sdtune.data.sources`); ``skipped`` are files the source
        already left out. A caption of ``None`` follows the ``data.*`` sidecar / file-name rules."""
        if not entries and not skipped:
            kinds = ", ".join(IMAGE_SUFFIXES)
            raise DataError(f"{cfg.path}: no images found ({kinds}); put training images there")
        kept, broken = keep_decodable(entries)
        left_out = sorted([*skipped, *broken], key=lambda s: str(s.path))
        for item in left_out:
            report(item)
        if not kept:
            first = left_out[0]
            raise DataError(
                f"{cfg.path}: none of the {len(left_out)} image files can be used, e.g. {first.path.name}: "
                f"{first.reason}"
            )
        unique = list(dict.fromkeys(e.image for e in kept))
        rows = {p: i for i, p in enumerate(unique)}
        first_entry = {e.image: e for e in reversed(kept)}  # the first entry of each image decides its mask
        captions = [
            caption_for(e.image, cfg.caption_extension, cfg.filename_word_regex, cfg.filename_join)
            if e.caption is None
            else e.caption
            for e in kept
        ]
        order = _example_order([e.repeats for e in kept])
        sizes = training_sizes(unique, cfg, resolution)
        group_of = {size: g for g, size in enumerate(sorted(set(sizes), key=lambda wh: (wh[0] / wh[1], wh)))}
        members: list[list[Path]] = [[] for _ in group_of]
        image_rows: list[tuple[int, int]] = []
        for path, size in zip(unique, sizes, strict=True):
            group = group_of[size]
            image_rows.append((group, len(members[group])))
            members[group].append(path)
        groups = [
            _encode_group(
                size, members[g], [first_entry[p] for p in members[g]], cfg, vae, seed, _sized(progress, size)
            )
            for size, g in group_of.items()
        ]
        return cls(
            paths=[kept[i].image for i in order],
            captions=[captions[i] for i in order],
            groups=groups,
            vae=vae,
            image_index=[rows[kept[i].image] for i in order],
            image_rows=image_rows,
            masks=[kept[i].mask for i in order],
            is_reg=[kept[i].is_reg for i in order],
            sources=[kept[i].source for i in order],
            skipped=left_out,
            reg_weight=cfg.reg_weight,
        )

    def __len__(self) -> int:
        return len(self.paths)

    def latents(self, indices: Sequence[int], generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Latents of the examples: from the cache, or (uncached) through the VAE now, one generator per sample."""
        return self.batch(indices, generators).latents

    def latents_and_weights(
        self, indices: Sequence[int], generators: Sequence[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`batch`'s latents and per-pixel loss weights."""
        b = self.batch(indices, generators)
        return b.latents, b.mask

    def batch(self, indices: Sequence[int], generators: Sequence[torch.Generator]) -> Batch:
        """Latents of the examples (all of one size group), their per-pixel loss weights (``None`` when the set
        has no masks) and per-sample weights (``None`` unless a regularisation image with ``reg_weight != 1`` is
        among them). Sample i draws only from ``generators[i]``."""
        placed = [self.image_rows[self.image_index[i]] for i in indices]
        group_ids = {g for g, _ in placed}
        if len(group_ids) != 1:
            sizes = sorted("x".join(map(str, self.groups[g].size)) for g in group_ids)
            raise ValueError(f"a batch must come from one bucket, got examples of sizes {', '.join(sizes)}")
        group = self.groups[group_ids.pop()]
        rows = [r for _, r in placed]
        if group.images is None:
            picked = [group.cache.get_with_flips([r], g) for r, g in zip(rows, generators, strict=True)]
            latents = torch.cat([lat for lat, _ in picked])
            mirrored = torch.cat([m for _, m in picked])
        else:
            with torch.no_grad():
                dist = self.vae.encode(group.images[rows]).latent_dist
                noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators]).to(dist.mean)
                latents = (dist.mean + dist.std * noise) * self.vae.config.scaling_factor
            mirrored = torch.zeros(len(rows), dtype=torch.bool)
        mask = None
        if group.weights is not None:
            mask = group.weights[rows]
            mask = torch.where(mirrored[:, None, None, None], torch.flip(mask, dims=[3]), mask)
        weights = None
        if self.reg_weight != 1.0 and any(self.is_reg[i] for i in indices):
            weights = torch.tensor([self.reg_weight if self.is_reg[i] else 1.0 for i in indices])
        return Batch(latents, mask, weights)


EncodeProgress = Callable[[str, int, int], None]
"""``progress(size, done, total)``: latent encoding of one training size (``"512x512"``), after each chunk."""


def _sized(progress: EncodeProgress | None, size: tuple[int, int]) -> Progress | None:
    if progress is None:
        return None
    label = f"{size[0]}x{size[1]}"
    return lambda done, total: progress(label, done, total)


def training_sizes(images: Sequence[Path], cfg: DataConfig, resolution: int) -> list[tuple[int, int]]:
    """The ``(width, height)`` each image trains at: the square ``resolution``, or with ``data.buckets`` its
    aspect-ratio bucket (:mod:`sdtune.data.buckets`, sizes read from the file headers)."""
    if not cfg.buckets:
        return [(resolution, resolution)] * len(images)
    from sdtune.data.prep import image_size  # header read, EXIF-aware

    options = bucket_options(cfg, resolution)
    return [(b.width, b.height) for b in assign_buckets([image_size(p) for p in images], options)]


def bucket_options(cfg: DataConfig, resolution: int) -> BucketOptions:
    """The bucket grid ``data.*`` asks for at ``resolution`` (the side of the target area)."""
    return BucketOptions(
        resolution=resolution,
        step=cfg.bucket_step,
        min_side=cfg.min_bucket_side,
        max_side=cfg.max_bucket_side,
        no_upscale=cfg.bucket_no_upscale,
    )


def _encode_group(
    size: tuple[int, int],
    paths: list[Path],
    entries: list[Entry],
    cfg: DataConfig,
    vae: Any,
    seed: int,
    progress: Progress | None = None,
) -> LatentGroup:
    """Decode and encode the images of one training size (through the disk cache when ``data.cache_dir`` is set)
    and read their loss masks onto its latent grid."""
    square = size[0] == size[1]
    key_size: int | tuple[int, int] = size[0] if square and not cfg.buckets else size
    images = None
    if cfg.cache_latents and cfg.cache_dir:  # through the disk cache: only new or changed images are encoded
        cache = LatentCache.encode_files(
            vae,
            paths,
            lambda p: load_image(p, size),
            key_size,
            cfg.latent_sampling,
            seed,
            DiskCache(Path(cfg.cache_dir) / "latents"),
            flip=cfg.flip,
            progress=progress,
        )
    elif cfg.cache_latents:  # decoded and encoded a chunk at a time: the whole set is never stacked
        cache = LatentCache.encode(
            vae,
            ImageFiles(paths, lambda p: load_image(p, size), size),
            cfg.latent_sampling,
            torch.Generator().manual_seed(seed),
            flip=cfg.flip,
            progress=progress,
        )
    else:  # encoded on every use: the decoded images stay in memory
        images = torch.stack([load_image(p, size) for p in paths]).to(vae.device, vae.dtype)
        cache = LatentCache.encode(
            vae, images[:1], cfg.latent_sampling, torch.Generator().manual_seed(seed), flip=cfg.flip
        )
    grid = cache.latent_shape[1:]
    weights = loss_weights(entries, grid, cfg.alpha_mask, cfg.mask_floor)
    return LatentGroup(size, cache, None if cfg.cache_latents else images, weights)
