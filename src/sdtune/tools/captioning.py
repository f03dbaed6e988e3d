"""Captioners by name for ``sdtune data caption``: BLIP, WD14 taggers, and the shapes world's own captioner.

The shapes captioner reads an image back with the world's scorer (:func:`sdtune.world.scorer.score_image`) and
writes the world's canonical caption, ``"a red circle on a blue background"``: exact captions for shapes-world
datasets without a model. It lives here, above both ``data/`` (captioners, sidecars) and ``world/`` (the scorer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from PIL import Image

from sdtune.core.errors import DataError
from sdtune.data.captioners import BlipCaptioner, Captioner, WD14Tagger
from sdtune.world.captions import subject_caption
from sdtune.world.scorer import score_image

CaptionerKind = Literal["blip", "wd14", "shapes"]
CAPTIONERS: tuple[CaptionerKind, ...] = ("blip", "wd14", "shapes")


class ShapesCaptioner:
    """Shapes-world images -> their canonical caption; ``None`` when shape or a colour cannot be read."""

    def __call__(self, image: Image.Image) -> str | None:
        reading = score_image(image)
        if reading.shape is None or reading.fg is None or reading.bg is None:
            return None
        return subject_caption(f"{reading.fg} {reading.shape}", reading.bg)


def make_captioner(
    kind: str,
    model: str | Path | None = None,
    *,
    threshold: float = 0.35,
    character_threshold: float = 0.85,
    max_new_tokens: int = 40,
    num_beams: int = 1,
) -> Captioner:
    """The captioner called ``kind`` (``blip`` and ``wd14`` need ``model``: a local folder)."""
    if kind not in CAPTIONERS:
        raise DataError(f"--captioner: unknown captioner {kind!r}; use one of {', '.join(CAPTIONERS)}")
    if kind == "shapes":
        return ShapesCaptioner()
    if model is None:
        example = "models/blip-image-captioning-base" if kind == "blip" else "models/wd-vit-tagger-v3"
        raise DataError(f"--model: the {kind} captioner needs a local model folder; e.g. --model {example}")
    if kind == "blip":
        return BlipCaptioner(model, max_new_tokens=max_new_tokens, num_beams=num_beams)
    return WD14Tagger(model, threshold=threshold, character_threshold=character_threshold)
