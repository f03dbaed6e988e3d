"""Where training images come from, as one normalized list of :class:`Entry`.

Four sources, chosen by what ``data.path`` names:

- a folder of images with caption sidecars (A1111's layout; captions resolved later by the ``data.*`` rules);
- a folder of kohya-ss ``N_name`` sub-folders (``10_teal heart``: 10 repeats, caption "teal heart" for images
  without a sidecar), used when the folder itself holds no images;
- a kohya-ss dataset config ``.toml`` (``[general]`` / ``[[datasets]]`` / ``[[datasets.subsets]]``);
- a ``.jsonl`` manifest, one ``{"image": ..., "caption": ..., "mask": ...}`` object per line.

Nothing here decodes an image: the dataset decodes each entry once and skips the broken ones. Paths inside a
TOML or JSONL file are relative to that file's folder (kohya resolves them against the working directory;
absolute paths mean the same in both).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from sdtune.core.errors import DataError
from sdtune.data.captions import caption_for
from sdtune.data.images import IMAGE_SUFFIXES, Skipped, list_candidates

SourceKind = Literal["folder", "kohya_folders", "kohya_toml", "jsonl"]


@dataclass(frozen=True)
class Entry:
    """One training image: its caption (``None``: the ``data.*`` sidecar / file-name rules), an optional loss
    mask, how many times an epoch sees it, whether it is a class (regularisation) image, where it came from,
    and the sidecar file its caption was read from (``None`` when the caption came from elsewhere)."""

    image: Path
    caption: str | None = None
    mask: Path | None = None
    repeats: int = 1
    is_reg: bool = False
    source: str = ""
    caption_file: Path | None = None


@dataclass(frozen=True)
class SourceSetting:
    """A training option a kohya TOML sets (``key`` = value at ``where``); the config must agree with it."""

    where: str
    key: str
    value: Any


@dataclass
class Sources:
    """What :func:`load_sources` found: entries in order, files left out and the folders they were listed from."""

    kind: SourceKind
    entries: list[Entry]
    skipped: list[Skipped] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    settings: list[SourceSetting] = field(default_factory=list)


def load_sources(path: str | Path, caption_extension: str = ".txt") -> Sources:
    """Read ``path``: a ``.toml`` (kohya dataset config), a ``.jsonl`` manifest, or a folder (plain or kohya
    ``N_name`` sub-folders). ``caption_extension`` is the sidecar suffix for folders (``data.caption_extension``).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".toml", ".jsonl"):
        if not path.is_file():
            raise DataError(f"{path}: no such file; set data.path to a folder, a kohya .toml or a .jsonl manifest")
        return read_kohya_toml(path) if suffix == ".toml" else read_jsonl(path)
    return read_folder(path, caption_extension)


# -- folders ------------------------------------------------------------------------------------------------

_KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


def sidecar_of(image: Path, extension: str) -> Path | None:
    """The caption sidecar ``<stem><extension>`` of ``image`` if it exists (``extension`` with or without a dot)."""
    if extension and not extension.startswith("."):
        extension = "." + extension
    sidecar = image.with_name(image.stem + extension)
    return sidecar if extension and sidecar != image and sidecar.is_file() else None


def _with_sidecar(image: Path, extension: str, fallback: str | None, **fields: Any) -> Entry:
    """An entry captioned by its sidecar (read by the A1111 rules of :func:`caption_for`), else by ``fallback``."""
    sidecar = sidecar_of(image, extension)
    if sidecar is None:
        return Entry(image, fallback, **fields)
    return Entry(image, caption_for(image, extension), caption_file=sidecar, **fields)


def kohya_folders(folder: Path) -> list[tuple[Path, int, str]]:
    """The ``N_name`` sub-folders of ``folder`` as (path, repeats, class words), sorted by name."""
    found = []
    for sub in sorted(folder.iterdir(), key=lambda p: p.name):
        match = _KOHYA_FOLDER.match(sub.name)
        if match and sub.is_dir() and not sub.name.startswith("."):
            found.append((sub, int(match.group(1)), match.group(2).strip()))
    return found


def read_folder(folder: str | Path, caption_extension: str = ".txt") -> Sources:
    """A folder of images (captions ``None``: resolved later), or kohya ``N_name`` folders if it has no images."""
    folder = Path(folder)
    images, hidden = list_candidates(folder)
    subfolders = kohya_folders(folder) if not images else []
    if not subfolders:
        return Sources("folder", [Entry(p, source=folder.name) for p in images], hidden, [folder])
    entries: list[Entry] = []
    skipped = list(hidden)
    for sub, repeats, words in subfolders:
        if repeats < 1:
            raise DataError(f"{sub}: a kohya folder with {repeats} repeats trains nothing; rename it to 1_{words}")
        sub_images, sub_hidden = list_candidates(sub)
        skipped += sub_hidden
        for image in sub_images:
            entries.append(_with_sidecar(image, caption_extension, words, repeats=repeats, source=sub.name))
    return Sources("kohya_folders", entries, skipped, [sub for sub, _, _ in subfolders])


# -- kohya dataset config (TOML) --------------------------------------------------------------------------------

# Keys sdtune reads, by the level kohya allows them at (kohya-ss sd-scripts library/config_util.py):
# "ascendable" keys may sit at a higher level as defaults; image_dir and is_reg belong to a subset.
_SUBSET_ONLY = {"image_dir", "is_reg"}
_SUBSET_ASCENDABLE = {
    "num_repeats",
    "caption_extension",
    "class_tokens",
    "keep_tokens",
    "shuffle_caption",
    "flip_aug",
    "caption_dropout_rate",
    "caption_tag_dropout_rate",
}
_BUCKET_KEYS = ("enable_bucket", "bucket_reso_steps", "min_bucket_reso", "max_bucket_reso", "bucket_no_upscale")
_DATASET_ASCENDABLE = {"resolution", "batch_size", *_BUCKET_KEYS}
# kohya keys sdtune accepts only with the value that matches what it does (no colour/crop aug).
_ONLY_VALUE = {"color_aug": False, "random_crop": False, "debug_dataset": False}
# Options that sdtune applies once per run from the data config; a TOML value must agree (see SourceSetting).
TRAINING_KEYS = (
    "resolution",
    "batch_size",
    "keep_tokens",
    "shuffle_caption",
    "flip_aug",
    "caption_dropout_rate",
    "caption_tag_dropout_rate",
    *_BUCKET_KEYS,
)
_KOHYA_CAPTION_EXTENSION = ".caption"  # kohya's default; most datasets use .txt and say so in the TOML


def _check_value(where: str, key: str, value: Any) -> Any:
    """Type and range of one kohya key; return the value (caption_extension gets its leading dot)."""

    def bad(expected: str, example: str) -> DataError:
        return DataError(f"{where}.{key}: {value!r} is not {expected}; e.g. {key} = {example}")

    is_int = isinstance(value, int) and not isinstance(value, bool)
    if key == "num_repeats" and not (is_int and value >= 1):
        raise bad("a whole number >= 1", "10")
    if key == "batch_size" and not (is_int and value >= 1):
        raise bad("a whole number >= 1", "4")
    if key in ("bucket_reso_steps", "min_bucket_reso", "max_bucket_reso") and not (is_int and value >= 8):
        raise bad("a size in pixels (a multiple of 8)", "64" if key == "bucket_reso_steps" else "256")
    if key == "keep_tokens" and not (is_int and value >= 0):
        raise bad("a whole number >= 0", "1")
    if key in ("shuffle_caption", "flip_aug", "is_reg", "enable_bucket", "bucket_no_upscale") and not isinstance(
        value, bool
    ):
        raise bad("true or false", "true")
    if key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise bad("a probability from 0 to 1", "0.05")
        return float(value)
    if key in ("image_dir", "class_tokens", "caption_extension") and not isinstance(value, str):
        raise bad("a string", '"teal heart"' if key == "class_tokens" else '".txt"')
    if key == "caption_extension" and value and not value.startswith("."):
        return "." + value
    if key == "resolution":
        sides = [value] if is_int else value if isinstance(value, list) and len(value) == 2 else None
        if not sides or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sides):
            raise bad("a size in pixels or [width, height]", "512")
    return value


def _read_level(where: str, table: Any, allowed: set[str], skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Validate one TOML table against ``allowed`` keys; unknown keys are one-line errors naming the key."""
    if not isinstance(table, dict):
        raise DataError(f"{where}: expected a table, got {type(table).__name__}; see kohya's dataset config format")
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in skip:
            continue
        if key in _ONLY_VALUE:
            if value != _ONLY_VALUE[key]:
                raise DataError(
                    f"{where}.{key}: {value!r} is not supported by sdtune (centre crops, no colour augmentation); "
                    f"remove it or set {key} = {str(_ONLY_VALUE[key]).lower()}"
                )
            continue
        if key not in allowed:
            known = ", ".join(sorted(allowed))
            raise DataError(f"{where}: unknown or unsupported key {key!r}; remove it (supported here: {known})")
        out[key] = _check_value(where, key, value)
    return out


def read_kohya_toml(path: str | Path) -> Sources:
    """Entries of a kohya-ss dataset config: each subset's images with its repeats, caption sidecars
    (``caption_extension``, kohya's default ``.caption``), ``class_tokens`` as the caption of images without
    one, and ``is_reg``. Training options it sets are returned as :class:`SourceSetting` for the caller to
    compare with the run's config; keys sdtune does not support are errors, not silently ignored."""
    path = Path(path)
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise DataError(f"{path}: reading kohya .toml configs needs Python 3.11+ or `pip install tomli`") from None
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a valid TOML file ({exc}); fix the syntax") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the dataset config ({exc.strerror}); check the path") from None
    name = path.name
    for key in doc:
        if key not in ("general", "datasets"):
            raise DataError(f"{name}: unknown top-level key {key!r}; use [general] and [[datasets]] only")
    general = _read_level(f"{name}: [general]", doc.get("general", {}), _SUBSET_ASCENDABLE | _DATASET_ASCENDABLE)
    datasets = doc.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise DataError(f"{name}: no [[datasets]]; add one with a [[datasets.subsets]] image_dir = ...")

    sources = Sources("kohya_toml", [])
    settings: dict[tuple[str, str], Any] = {}
    for key in [k for k in TRAINING_KEYS if k in general]:
        settings[("[general]", key)] = general[key]
    for i, dataset in enumerate(datasets):
        where_d = f"{name}: datasets[{i}]"
        level = _read_level(where_d, dataset, _SUBSET_ASCENDABLE | _DATASET_ASCENDABLE, skip=frozenset({"subsets"}))
        for key in [k for k in TRAINING_KEYS if k in level]:
            settings[(f"datasets[{i}]", key)] = level[key]
        subsets = dataset.get("subsets")
        if not isinstance(subsets, list) or not subsets:
            raise DataError(f"{where_d}: no [[datasets.subsets]]; add one with image_dir = ...")
        seen_dirs: set[Path] = set()
        for j, subset in enumerate(subsets):
            where = f"{where_d}.subsets[{j}]"
            own = _read_level(where, subset, _SUBSET_ASCENDABLE | _SUBSET_ONLY)
            for key in [k for k in TRAINING_KEYS if k in own]:
                settings[(f"datasets[{i}].subsets[{j}]", key)] = own[key]
            opts = {**general, **level, **own}  # the lower level wins, as in kohya
            if "image_dir" not in opts:
                raise DataError(f'{where}: image_dir is missing; add image_dir = "path/to/images"')
            image_dir = Path(opts["image_dir"]).expanduser()
            image_dir = image_dir if image_dir.is_absolute() else path.parent / image_dir
            if not image_dir.is_dir():
                raise DataError(f"{where}.image_dir: {image_dir} is not a folder; fix the path")
            if image_dir.resolve() in seen_dirs:
                raise DataError(f"{where}.image_dir: {image_dir} is already a subset of datasets[{i}]; remove one")
            seen_dirs.add(image_dir.resolve())
            images, hidden = list_candidates(image_dir)
            extension = opts.get("caption_extension", _KOHYA_CAPTION_EXTENSION)
            class_tokens = opts.get("class_tokens")
            source = f"datasets[{i}].subsets[{j}]"
            repeats, is_reg = opts.get("num_repeats", 1), opts.get("is_reg", False)
            for image in images:
                entry = _with_sidecar(image, extension, class_tokens, repeats=repeats, is_reg=is_reg, source=source)
                sources.entries.append(entry)
            sources.skipped += hidden
            sources.folders.append(image_dir)
    sources.settings = [SourceSetting(where, key, value) for (where, key), value in settings.items()]
    return sources


# -- JSONL manifest ---------------------------------------------------------------------------------------------

_JSONL_KEYS = {"image", "caption", "mask", "repeats", "is_reg"}


def _jsonl_path(manifest: Path, where: str, key: str, value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise DataError(f'{where}: {key} must be a path string, got {value!r}; e.g. "{key}": "images/a.png"')
    p = Path(value).expanduser()
    return p if p.is_absolute() else manifest.parent / p


def read_jsonl(path: str | Path) -> Sources:
    """Entries of a JSONL manifest: per line ``image`` (required), ``caption`` (string, or absent/null for the
    sidecar / file-name rules), ``mask``, ``repeats`` (>= 1) and ``is_reg``. Paths are relative to the manifest.
    Malformed lines are errors naming the line; a missing image or mask file is skipped (and reported)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 ({exc.reason}); save the manifest as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the manifest ({exc.strerror}); check the path") from None
    sources = Sources("jsonl", [], folders=[])
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); fix the line") from None
        if not isinstance(item, dict):
            raise DataError(f'{where}: expected a JSON object like {{"image": "a.png"}}, got {line.strip()[:40]}')
        unknown = sorted(set(item) - _JSONL_KEYS)
        if unknown:
            raise DataError(f"{where}: unknown key {unknown[0]!r}; use {', '.join(sorted(_JSONL_KEYS))}")
        if "image" not in item:
            raise DataError(f'{where}: no "image" key; every line needs "image": "path/to/file.png"')
        image = _jsonl_path(path, where, "image", item["image"])
        caption = item.get("caption")
        if caption is not None and not isinstance(caption, str):
            raise DataError(f"{where}: caption must be a string or null, got {caption!r}")
        mask = None if item.get("mask") is None else _jsonl_path(path, where, "mask", item["mask"])
        repeats = item.get("repeats", 1)
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise DataError(f'{where}: repeats must be a whole number >= 1, got {repeats!r}; e.g. "repeats": 10')
        is_reg = item.get("is_reg", False)
        if not isinstance(is_reg, bool):
            raise DataError(f"{where}: is_reg must be true or false, got {is_reg!r}")
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            sources.skipped.append(Skipped(image, f"unsupported format {image.suffix or '(none)'} (line {number})"))
        elif not image.is_file():
            sources.skipped.append(Skipped(image, f"no such file (line {number})"))
        elif mask is not None and not mask.is_file():
            sources.skipped.append(Skipped(image, f"mask {mask.name}: no such file (line {number})"))
        else:
            sources.entries.append(Entry(image, caption, mask, repeats, is_reg, source=path.name))
    return sources


# -- mixing -----------------------------------------------------------------------------------------------------


def mix(parts: Sequence[tuple[Sequence[Entry], float]], max_multiplier: int = 100) -> list[Entry]:
    """Join several entry lists so that each one's share of an epoch follows its weight.

    Each part's entries keep their relative repeats and are multiplied by one whole number per part (weights
    become repeats, since the loop samples whole repeats); the smallest multipliers whose shares are within
    5% of the weights are chosen (up to ``max_multiplier``, else the closest found). Weight 0 drops a part.
    """
    sizes = [sum(e.repeats for e in entries) for entries, _ in parts]
    weights = [float(w) for _, w in parts]
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise DataError(f"mix: weights must be finite and >= 0, got {weights}")
    live = [i for i, (size, w) in enumerate(zip(sizes, weights, strict=True)) if size and w > 0]
    if not live:
        raise DataError("mix: no part has both images and a weight > 0; give at least one part a weight")
    per_repeat = {i: weights[i] / sizes[i] for i in live}  # wanted share per unit of repeats
    base = min(per_repeat.values())
    target = sum(weights[i] for i in live)
    best_error, best = math.inf, {i: 1 for i in live}
    for scale in range(1, max_multiplier + 1):
        mult = {i: min(max_multiplier, max(1, round(scale * per_repeat[i] / base))) for i in live}
        total = sum(mult[i] * sizes[i] for i in live)
        error = max(abs(mult[i] * sizes[i] / total - weights[i] / target) / (weights[i] / target) for i in live)
        if error < best_error:
            best_error, best = error, mult
        if error <= 0.05 or max(mult.values()) == max_multiplier:
            break
    return [replace(e, repeats=e.repeats * best[i]) for i in live for e in parts[i][0]]
