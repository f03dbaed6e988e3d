"""Automatic captions written as sidecar files: BLIP captioners and WD14-style taggers, from local files only.

- :class:`BlipCaptioner`: a BLIP captioning model (``BlipForConditionalGeneration`` + ``BlipProcessor``) from a
  folder the user downloaded once (e.g. ``Salesforce/blip-image-captioning-base``); nothing is fetched.
- :class:`WD14Tagger`: a SmilingWolf-style ONNX tagger (``model.onnx`` + ``selected_tags.csv``) run with
  onnxruntime. The taggers' convention (their reference app): RGB with transparency over white, padded with white
  to a centred square, bicubic-resized to the model's input side (448), float32 in 0..255, **BGR**, NHWC; the
  outputs are already probabilities. The CSV's ``name``/``category`` columns give the tags: category 0 general,
  4 character, 9 rating. A tag is kept when its probability is above its threshold (general / character); rating
  tags are never written. Underscores become spaces except in kaomoji (``^_^``). Order: character tags, then
  general tags, each by falling probability (ties in CSV order).
- :func:`caption_folder` captions every image of a folder (or kohya ``N_name`` sub-folders) with any captioner
  (a callable image -> text), writing ``<stem>.txt`` atomically next to each image; images are only read.

A captioner that cannot say anything about an image returns ``None``; the image is reported and no file written.
This module imports transformers / onnxruntime only inside the classes that use them.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from PIL import Image

from sdtune.core.atomic import write_text
from sdtune.core.errors import DataError
from sdtune.data.images import Skipped, decode_failure, upright_rgb
from sdtune.data.sources import read_folder

Existing = Literal["error", "skip", "overwrite"]


class Captioner(Protocol):
    """Anything that turns an RGB image into a caption (``None``: nothing readable)."""

    def __call__(self, image: Image.Image) -> str | None: ...


# -- writing sidecars ------------------------------------------------------------------------------------------


@dataclass
class CaptionReport:
    """What :func:`caption_folder` did: sidecars written, images left alone and why."""

    written: list[Path] = field(default_factory=list)  # the caption files
    kept: list[Path] = field(default_factory=list)  # images whose existing caption was kept (skip)
    uncaptioned: list[Path] = field(default_factory=list)  # images the captioner could not describe
    unreadable: list[Skipped] = field(default_factory=list)  # images that do not decode


def with_prefix(caption: str, prefix: str) -> str:
    """``prefix, caption`` (e.g. a trigger word in front of every caption); the caption alone for an empty prefix."""
    prefix = prefix.strip().rstrip(",").strip()
    return f"{prefix}, {caption}" if prefix else caption


def caption_folder(
    folder: str | Path,
    captioner: Captioner,
    *,
    extension: str = ".txt",
    prefix: str = "",
    existing: Existing = "error",
    progress: Callable[[Path, str | None], None] | None = None,
) -> CaptionReport:
    """Caption every image in ``folder`` (or in its kohya ``N_name`` sub-folders) into ``<stem><extension>``.

    ``existing`` says what to do where a sidecar exists: ``"error"`` (the default: raise before writing anything,
    so hand-written captions are never replaced by accident), ``"skip"`` or ``"overwrite"``. Images are never
    written; each sidecar is written atomically. ``progress(image, caption)`` is called after each image.
    """
    if not extension.startswith("."):
        extension = "." + extension
    sources = read_folder(folder, extension)
    images = list(dict.fromkeys(e.image for e in sources.entries))
    if not images:
        raise DataError(f"{folder}: no images to caption; point it at a folder of images")
    sidecars = {image: image.with_name(image.stem + extension) for image in images}
    present = [image for image in images if sidecars[image].exists()]
    if present and existing == "error":
        raise DataError(
            f"{folder}: {len(present)} images already have captions (e.g. {sidecars[present[0]].name}); "
            "pass --skip-existing to keep them or --overwrite to replace them"
        )
    report = CaptionReport()
    for image in images:
        if existing == "skip" and image in present:
            report.kept.append(image)
            continue
        try:
            with Image.open(image) as opened:
                rgb = upright_rgb(opened)
                rgb.load()
        except Exception as exc:  # noqa: BLE001 - every decode failure is reported by name, as training does
            report.unreadable.append(Skipped(image, decode_failure(exc)))
            continue
        text = captioner(rgb)
        text = text.strip() if text else None
        if text:
            write_text(sidecars[image], with_prefix(text, prefix))
            report.written.append(sidecars[image])
        else:
            report.uncaptioned.append(image)
        if progress is not None:
            progress(image, text)
    return report


# -- BLIP ------------------------------------------------------------------------------------------------------


def _model_folder(path: str | Path, what: str, needs: Sequence[str], example: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"--model: {folder} is not a folder; download {what} once (e.g. {example}) and pass its folder")
    missing = [name for name in needs if not (folder / name).is_file()]
    if missing:
        raise DataError(f"--model: {folder} has no {missing[0]}; pass the folder of a {what} (e.g. {example})")
    return folder


class BlipCaptioner:
    """Captions from a local BLIP captioning model (``BlipForConditionalGeneration`` + ``BlipProcessor``).

    Decoding is deterministic: greedy (``num_beams=1``) or beam search, at most ``max_new_tokens`` tokens.
    """

    def __init__(self, model_dir: str | Path, max_new_tokens: int = 40, num_beams: int = 1, device: str = "cpu"):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        folder = _model_folder(
            model_dir, "BLIP captioning model", ["config.json"], "Salesforce/blip-image-captioning-base"
        )
        try:
            self.processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
            self.model = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"--model: {folder} is not a BLIP captioning model ({first}); check the folder") from None
        self.model.to(device).eval()
        self.device, self.max_new_tokens, self.num_beams = device, max_new_tokens, num_beams

    def __call__(self, image: Image.Image) -> str | None:
        import torch

        with torch.no_grad():
            inputs = self.processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)
        text = self.processor.decode(out[0], skip_special_tokens=True).strip()
        return text or None


# -- WD14-style ONNX taggers -------------------------------------------------------------------------------------

GENERAL, CHARACTER, RATING = 0, 4, 9  # selected_tags.csv categories
DEFAULT_SIDE = 448
# Tags whose underscores are part of the face (kept as written), as the taggers' reference app lists them.
KAOMOJI = frozenset(
    ["0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@", "^_^"]
    + ["o_o", "u_u", "x_x", "|_|", "||_||"]
)


@dataclass(frozen=True)
class Tag:
    """One row of ``selected_tags.csv``: the tag as written in captions and its category."""

    name: str
    category: int


def tag_text(raw: str) -> str:
    """A tagger's tag as caption text: underscores become spaces, except in kaomoji."""
    return raw if raw in KAOMOJI else raw.replace("_", " ")


def read_tag_table(path: str | Path) -> list[Tag]:
    """The tags of a ``selected_tags.csv`` (columns ``name`` and ``category``; others are ignored), in order."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            columns = set(reader.fieldnames or [])
            if not {"name", "category"} <= columns:
                raise DataError(f"{path}: needs the columns name and category (found {', '.join(sorted(columns))})")
            tags = []
            for line, row in enumerate(reader, start=2):
                try:
                    tags.append(Tag(tag_text(row["name"]), int(row["category"])))
                except (TypeError, ValueError):
                    raise DataError(
                        f"{path}:{line}: category {row['category']!r} is not a number; fix the row"
                    ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the tag table ({exc}); pass the tagger's selected_tags.csv") from None
    if not tags:
        raise DataError(f"{path}: no tags; pass the tagger's selected_tags.csv")
    return tags


def select_tags(
    probabilities: Sequence[float] | np.ndarray, tags: Sequence[Tag], threshold: float, character_threshold: float
) -> list[str]:
    """Tags above their threshold: character tags (``> character_threshold``), then general tags (``> threshold``),
    each by falling probability, ties in table order. Rating and other categories are never selected."""
    probs = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if probs.shape[0] != len(tags):
        raise DataError(f"the tagger gives {probs.shape[0]} scores but its tag table has {len(tags)} rows; pair them")

    def pick(category: int, limit: float) -> list[str]:
        chosen = [i for i, t in enumerate(tags) if t.category == category and probs[i] > limit]
        return [tags[i].name for i in sorted(chosen, key=lambda i: (-probs[i], i))]

    return pick(CHARACTER, character_threshold) + pick(GENERAL, threshold)


def wd14_input(image: Image.Image, side: int) -> np.ndarray:
    """``image`` as a WD14 tagger input ``[side, side, 3]`` float32 BGR in 0..255: transparency over white, padded
    with white to a centred square, bicubic-resized to ``side``."""
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(canvas, rgba).convert("RGB")
    longest = max(rgb.size)
    square = Image.new("RGB", (longest, longest), (255, 255, 255))
    square.paste(rgb, ((longest - rgb.width) // 2, (longest - rgb.height) // 2))
    if longest != side:
        square = square.resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1].copy()


class WD14Tagger:
    """Tags from a WD14-style ONNX tagger: a folder with ``model.onnx`` and ``selected_tags.csv``."""

    def __init__(self, model_dir: str | Path, threshold: float = 0.35, character_threshold: float = 0.85) -> None:
        import onnxruntime as ort

        folder = _model_folder(
            model_dir, "WD14 tagger", ["model.onnx", "selected_tags.csv"], "SmilingWolf/wd-vit-tagger-v3"
        )
        for name, value in (("--threshold", threshold), ("--character-threshold", character_threshold)):
            if not 0.0 <= value <= 1.0:
                raise DataError(f"{name}: must be a probability from 0 to 1 (got {value}); e.g. 0.35")
        self.tags = read_tag_table(folder / "selected_tags.csv")
        options = ort.SessionOptions()
        threads = os.environ.get("OMP_NUM_THREADS", "")
        options.intra_op_num_threads = int(threads) if threads.isdigit() else 0  # 0: onnxruntime's default
        try:
            self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types for bad files
            raise DataError(f"--model: {folder / 'model.onnx'} does not load ({exc}); pass a WD14 tagger") from None
        meta = self.session.get_inputs()[0]
        self.input_name = meta.name
        height = meta.shape[1] if len(meta.shape) == 4 else None
        self.side = height if isinstance(height, int) and height > 0 else DEFAULT_SIDE
        self.threshold, self.character_threshold = threshold, character_threshold

    def probabilities(self, image: Image.Image) -> np.ndarray:
        """The model's score per row of the tag table."""
        batch = wd14_input(image, self.side)[None]
        return np.asarray(self.session.run(None, {self.input_name: batch})[0][0])

    def __call__(self, image: Image.Image) -> str | None:
        chosen = select_tags(self.probabilities(image), self.tags, self.threshold, self.character_threshold)
        return ", ".join(chosen) or None
