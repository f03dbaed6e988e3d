"""Evaluation: a fixed, seeded set of images from a model, scored for what it learned and what it kept.

One :class:`Evaluation` serves training (every ``eval.every_n_steps``) and ``sdtune eval`` (a finished file), so a
run's figures and a re-evaluation of its exported files are the same computation. Figures are in points (0-100):

- ``fidelity``: the concept appears (world: the concept's own attributes read right, e.g. the shape of a new shape;
  clip: DINO likeness to the reference images, CLIP-I without a DINO model);
- ``adherence``: the prompt is followed (world: the whole concept prompt read right, background included, on
  backgrounds the dataset never showed; clip: CLIP-T, the image against its prompt without the concept's word);
- ``prior`` (world): the prior prompts read right;
- ``drift``: how far the prior prompts' images moved from the reference (the base model's images, same seeds,
  made once at the start): world: the share whose reading (shape, colours) changed; clip: 100 x (1 - cosine) of
  their DINO (else CLIP) embeddings. Lower is better;
- ``score = fidelity - drift_weight x drift`` (``fidelity`` alone without prior prompts): the default selection.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sdtune.core.atomic import atomic_path
from sdtune.inference.generate import GenerationSettings, generate, grid
from sdtune.models.components import SDComponents
from sdtune.world import COLOURS, SHAPES, Expectation, Reading, matches, score_image
from sdtune.world.concepts import replace_word

REFERENCE_FILE = "reference.safetensors"


@dataclass
class EvalImages:
    concept: list[Image.Image]
    prior: list[Image.Image]


class Scorer(Protocol):
    name: str

    def reference(self, prior: list[Image.Image]) -> dict[str, torch.Tensor]:
        """What drift is measured against, from the reference model's prior images."""

    def figures(self, images: EvalImages, reference: dict[str, torch.Tensor] | None) -> dict[str, float]: ...


def _points(value: float) -> float:
    return round(100.0 * float(value), 2)


# -- the shapes world (the built-in model) ---------------------------------------------------------------------------


def _code(reading: Reading) -> list[int]:
    """A reading as three indices (-1: nothing read), for the reference file."""
    return [
        SHAPES.index(reading.shape) if reading.shape in SHAPES else -1,
        COLOURS.index(reading.fg) if reading.fg in COLOURS else -1,
        COLOURS.index(reading.bg) if reading.bg in COLOURS else -1,
    ]


@dataclass
class WorldScorer:
    """The world's scorer reads every image back; ``concept_attrs`` are what makes the concept (``("shape",)`` for a
    new shape, ``("shape", "fg")`` for a pairing, ``("bg",)`` for a background style)."""

    concept: list[Expectation]
    prior: list[Expectation]
    concept_attrs: tuple[str, ...] = ("shape", "fg", "bg")
    name: str = "world"

    def reference(self, prior: list[Image.Image]) -> dict[str, torch.Tensor]:
        return {"readings": torch.tensor([_code(score_image(img)) for img in prior], dtype=torch.int64).reshape(-1, 3)}

    def figures(self, images: EvalImages, reference: dict[str, torch.Tensor] | None) -> dict[str, float]:
        read = [score_image(img) for img in images.concept]
        expect = _repeat(self.concept, len(read))

        def concept_ok(r: Reading, e: Expectation) -> bool:
            return all(getattr(e, a) is None or getattr(r, a) == getattr(e, a) for a in self.concept_attrs)

        out = {
            "fidelity": _points(_mean([concept_ok(r, e) for r, e in zip(read, expect, strict=True)])),
            "adherence": _points(_mean([matches(r, e) for r, e in zip(read, expect, strict=True)])),
        }
        if images.prior:
            prior_read = [score_image(img) for img in images.prior]
            prior_expect = _repeat(self.prior, len(prior_read))
            out["prior"] = _points(_mean([matches(r, e) for r, e in zip(prior_read, prior_expect, strict=True)]))
            if reference is not None:
                now = torch.tensor([_code(r) for r in prior_read], dtype=torch.int64).reshape(-1, 3)
                out["drift"] = _points((now != reference["readings"]).any(dim=1).float().mean())
        return out


# -- CLIP / DINOv2 (real models) -------------------------------------------------------------------------------------


@dataclass
class ClipScorer:
    """CLIP-I / DINO likeness of the concept images to ``references``, CLIP-T of each image against its text."""

    clip: object  # sdtune.evaluate.embedders.ClipEmbedder
    dino: object | None  # sdtune.evaluate.embedders.DinoEmbedder
    references: list[Image.Image]
    texts: list[str]  # per concept prompt: the prompt without the concept's word
    name: str = "clip"
    _refs: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def _reference_embeddings(self) -> dict[str, torch.Tensor]:
        if not self._refs:
            self._refs["clip"] = self.clip.images(self.references)
            if self.dino is not None:
                self._refs["dino"] = self.dino.images(self.references)
        return self._refs

    def _drift_embedder(self):
        return self.dino if self.dino is not None else self.clip

    def reference(self, prior: list[Image.Image]) -> dict[str, torch.Tensor]:
        return {"prior": self._drift_embedder().images(prior)}

    def figures(self, images: EvalImages, reference: dict[str, torch.Tensor] | None) -> dict[str, float]:
        refs = self._reference_embeddings()
        clip_images = self.clip.images(images.concept)
        texts = self.clip.texts(_repeat(self.texts, len(images.concept)))
        out = {
            "clip_i": _points((clip_images @ refs["clip"].T).mean()),
            "clip_t": _points((clip_images * texts).sum(dim=1).mean()),
        }
        if self.dino is not None:
            out["dino"] = _points((self.dino.images(images.concept) @ refs["dino"].T).mean())
        out["fidelity"] = out.get("dino", out["clip_i"])
        out["adherence"] = out["clip_t"]
        if images.prior and reference is not None:
            now = self._drift_embedder().images(images.prior)
            out["drift"] = _points(1.0 - (now * reference["prior"]).sum(dim=1).mean())
        return out


def without_word(prompt: str, word: str | None) -> str:
    """``prompt`` with ``word`` (a trigger or token) taken out: what CLIP-T compares an image with."""
    if not word:
        return prompt
    return " ".join(replace_word(prompt, word, " ").split())


# -- the evaluation --------------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Concept and prior prompts with their seeds and sampler, a scorer, and how the figures combine."""

    scorer: Scorer
    concept: list[str]  # as the user wrote them (the grid and the figures refer to these)
    prior: list[str]
    settings: GenerationSettings
    seed: int = 1000
    images_per_prompt: int = 1
    drift_weight: float = 0.5

    @property
    def seeds(self) -> tuple[list[int], list[int]]:
        n = len(self.concept) * self.images_per_prompt
        m = len(self.prior) * self.images_per_prompt
        return [self.seed + i for i in range(n)], [self.seed + n + j for j in range(m)]

    @property
    def key(self) -> str:
        """What the images depend on (prompts, seeds, sampler): a reference made for another set is not reused."""
        what = [self.concept, self.prior, self.seed, self.images_per_prompt, repr(self.settings)]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]

    def images(self, model: SDComponents, to_model: Callable[[list[str]], list[str]] = list) -> EvalImages:
        """The evaluation images from ``model``; ``to_model`` writes prompts as its tokenizer needs them."""
        k = self.images_per_prompt
        concept_seeds, prior_seeds = self.seeds
        texts = to_model([p for p in self.concept for _ in range(k)]) + [p for p in self.prior for _ in range(k)]
        made = generate(model, texts, concept_seeds + prior_seeds, self.settings)
        return EvalImages(made[: len(concept_seeds)], made[len(concept_seeds) :])

    def figures(self, images: EvalImages, reference: dict[str, torch.Tensor] | None) -> dict[str, float]:
        out = self.scorer.figures(images, reference)
        drift = out.get("drift")
        out["score"] = round(out["fidelity"] - self.drift_weight * drift, 2) if drift is not None else out["fidelity"]
        return out

    def save_grid(self, images: EvalImages, path: Path) -> Path:
        """Concept images first, then the prior prompts' (a row per prompt when there are several images each)."""
        every = images.concept + images.prior
        columns = self.images_per_prompt if self.images_per_prompt > 1 else min(len(every), 8)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            grid(every, columns=columns).save(tmp, format="PNG")
        return path

    # -- the reference (drift's baseline), kept in the run's eval/ folder so a resumed run measures the same drift --
    def load_reference(self, folder: Path) -> dict[str, torch.Tensor] | None:
        path = folder / REFERENCE_FILE
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("key") != self.key or meta.get("scorer") != self.scorer.name:
            return None
        return load_file(str(path))

    def save_reference(self, folder: Path, reference: dict[str, torch.Tensor], step: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / REFERENCE_FILE) as tmp:
            meta = {"key": self.key, "scorer": self.scorer.name, "step": str(step)}
            save_file({k: v.contiguous() for k, v in reference.items()}, str(tmp), metadata=meta)


def _mean(values: Sequence[bool]) -> float:
    return sum(values) / max(len(values), 1)


def _repeat(items: Sequence, n: int) -> list:
    """Each of ``items`` repeated for its images (``n`` = images in all, a multiple of ``len(items)``)."""
    if not items:
        return []
    k = n // len(items)
    return [item for item in items for _ in range(k)]
