"""Held-out concepts of the shapes world, the base-training distribution that excludes them, and the
small datasets and evaluation prompts used to teach and test them.

Two kinds of held-out concept:

* **shape** (``star``): the shape never appears in base training; the model must learn a new form.
* **pairing** (``teal_heart``): teal is a foreground colour of every other shape and hearts come in every
  other colour, but a teal heart is never shown. The model can draw teal shapes and hearts, so an embedding
  can express the pairing by composing what the model already knows.

The held-out property holds by construction: :func:`base_training_scene` rejects held-out shapes and
pairings. The built-in model's build is a curriculum whose first phase also keeps teal out of the
foreground (``CORE_FG_COLOURS``); both phases draw from this module, so neither ever sees a held-out concept.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from sdtune.core.atomic import atomic_path, write_text
from sdtune.world.captions import CANONICAL, VARIANTS, caption, format_caption, subject_caption
from sdtune.world.palette import COLOURS
from sdtune.world.scorer import Expectation
from sdtune.world.shapes import SHAPES, Scene, random_scene, render

HELD_OUT_SHAPES = frozenset({"star"})
HELD_OUT_PAIRINGS = frozenset({("heart", "teal")})  # (shape, foreground colour) never shown together
BASE_SHAPES: tuple[str, ...] = tuple(s for s in SHAPES if s not in HELD_OUT_SHAPES)
BASE_FG_COLOURS: tuple[str, ...] = COLOURS
# The build's first (curriculum) phase: teal only ever as a background.
CORE_FG_COLOURS: tuple[str, ...] = tuple(c for c in COLOURS if c != "teal")

# Concept datasets only ever show these backgrounds; evaluation uses the others ("new contexts").
TRAIN_BACKGROUNDS: tuple[str, ...] = ("white", "black", "yellow", "pink")
EVAL_BACKGROUNDS: tuple[str, ...] = tuple(c for c in COLOURS if c not in TRAIN_BACKGROUNDS)

KINDS = ("pairing", "shape")


def is_held_out_pair(shape: str, fg: str) -> bool:
    """True if a ``fg`` ``shape`` is a held-out shape or a held-out pairing."""
    return shape in HELD_OUT_SHAPES or (shape, fg) in HELD_OUT_PAIRINGS


def is_held_out(scene: Scene) -> bool:
    """True if the scene shows a held-out shape or a held-out shape+colour pairing."""
    return is_held_out_pair(scene.shape, scene.fg)


def base_training_scene(rng: np.random.Generator, fg_colours: tuple[str, ...] = BASE_FG_COLOURS) -> Scene:
    """A random scene of the base-training distribution: never a held-out shape or pairing (rejected)."""
    while True:
        scene = random_scene(rng, shapes=BASE_SHAPES, fg_colours=fg_colours, bg_colours=COLOURS)
        if not is_held_out(scene):
            return scene


def base_training_examples(
    n: int, seed: int = 0, fg_colours: tuple[str, ...] = BASE_FG_COLOURS
) -> Iterator[tuple[Scene, str]]:
    """``n`` deterministic base-training ``(scene, caption)`` pairs with varied caption templates."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    rng = np.random.default_rng(seed)
    for _ in range(n):
        scene = base_training_scene(rng, fg_colours)
        yield scene, caption(scene, rng)


@dataclass(frozen=True)
class Concept:
    """A held-out concept: ``fg=None`` means a shape concept that comes in any allowed colour."""

    name: str
    shape: str
    fg: str | None
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown concept kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if (self.kind == "pairing") != (self.fg is not None):
            raise ValueError(f"concept {self.name!r}: a pairing needs an fg colour, a shape concept fg=None")

    @property
    def words(self) -> str:
        """The real words for the concept: ``"teal heart"`` or ``"star"``."""
        return f"{self.fg} {self.shape}" if self.fg is not None else self.shape

    @property
    def default_token(self) -> str:
        """A placeholder token for textual inversion, e.g. ``"<teal-heart>"``."""
        return "<" + self.name.replace("_", "-") + ">"

    def fg_choices(self) -> tuple[str, ...]:
        """Foreground colours the concept is shown in."""
        return (self.fg,) if self.fg is not None else BASE_FG_COLOURS

    def subject(self, fg: str, token: str | None = None) -> str:
        """Caption subject: ``"teal heart"``/``"<tok>"`` (pairing), ``"red star"``/``"red <tok>"`` (shape)."""
        if self.kind == "pairing":
            return token if token is not None else self.words
        return f"{fg} {token if token is not None else self.shape}"


CONCEPTS: dict[str, Concept] = {
    "teal_heart": Concept("teal_heart", shape="heart", fg="teal", kind="pairing"),
    "star": Concept("star", shape="star", fg=None, kind="shape"),
}


def get_concept(concept: Concept | str) -> Concept:
    """Resolve a concept name (or pass a :class:`Concept` through)."""
    if isinstance(concept, Concept):
        return concept
    if concept not in CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}; choose one of {', '.join(CONCEPTS)}")
    return CONCEPTS[concept]


def concept_dataset(concept: Concept | str, n: int = 20, seed: int = 0) -> list[tuple[Scene, str]]:
    """``n`` deterministic ``(scene, caption)`` examples of ``concept`` on ``TRAIN_BACKGROUNDS`` only.

    Backgrounds cycle so every training background is used; captions use the real words
    (``"a teal heart on a white background"``).
    """
    c = get_concept(concept)
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    rng = np.random.default_rng(seed)
    out: list[tuple[Scene, str]] = []
    for i in range(n):
        bg = TRAIN_BACKGROUNDS[i % len(TRAIN_BACKGROUNDS)]
        fgs = [f for f in c.fg_choices() if f != bg]
        scene = random_scene(rng, shapes=(c.shape,), fg_colours=fgs, bg_colours=(bg,))
        out.append((scene, subject_caption(c.subject(scene.fg), scene.bg)))
    return out


def write_concept_dataset(
    concept: Concept | str,
    out_dir: str | os.PathLike[str],
    n: int = 20,
    seed: int = 0,
    token: str | None = None,
    image_size: int = 64,
) -> list[Path]:
    """Write ``0000.png`` + ``0000.txt`` caption sidecars (the kohya/A1111 layout) to ``out_dir``.

    With ``token`` the captions name the concept by the token instead of its words
    (``"a <teal-heart> on a white background"``, ``"a red <star> on a black background"``).
    Returns the image paths.
    """
    c = get_concept(concept)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i, (scene, text) in enumerate(concept_dataset(c, n=n, seed=seed)):
        if token is not None:
            text = subject_caption(c.subject(scene.fg, token), scene.bg)
        image_path = out / f"{i:04d}.png"
        with atomic_path(image_path) as tmp:
            render(scene, size=image_size).save(tmp, format="PNG")
        write_text(image_path.with_suffix(".txt"), text + "\n")
        paths.append(image_path)
    return paths


@dataclass(frozen=True)
class EvalPrompt:
    """A prompt to generate from and what the scorer should read in the image."""

    prompt: str
    expect: Expectation


def eval_prompts(concept: Concept | str, token: str | None = None) -> list[EvalPrompt]:
    """Prompts that put ``concept`` on backgrounds its dataset never shows (two per background).

    A pairing gets two phrasings per background; a shape concept two different foreground colours.
    """
    c = get_concept(concept)
    prompts: list[EvalPrompt] = []
    k = 0  # runs across backgrounds so a shape concept cycles through all its colours
    for bg in EVAL_BACKGROUNDS:
        fgs = [f for f in c.fg_choices() if f != bg]
        if not fgs:
            continue
        for template in (CANONICAL, VARIANTS[1]):
            fg = fgs[k % len(fgs)]
            k += 1
            if c.kind == "shape":
                template = CANONICAL  # the colour varies instead of the phrasing
            prompts.append(
                EvalPrompt(
                    format_caption(template, c.subject(fg, token), bg),
                    Expectation(shape=c.shape, fg=fg, bg=bg),
                )
            )
    return prompts


def base_prompts(n: int = 64, seed: int = 0) -> list[EvalPrompt]:
    """``n`` deterministic prompts of base-training concepts, balanced over shapes and foreground colours.

    Shapes and colours cycle with coprime periods (9 shapes, 11 colours), so the first 99 steps of the cycle
    visit every shape/colour pair once (held-out pairings are skipped); the seed shuffles the cycles and draws
    the backgrounds.
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    rng = np.random.default_rng(seed)
    shapes = [BASE_SHAPES[i] for i in rng.permutation(len(BASE_SHAPES))]
    fgs = [BASE_FG_COLOURS[i] for i in rng.permutation(len(BASE_FG_COLOURS))]
    out: list[EvalPrompt] = []
    i = -1
    while len(out) < n:
        i += 1
        shape, fg = shapes[i % len(shapes)], fgs[i % len(fgs)]
        if is_held_out_pair(shape, fg):
            continue
        bgs = [b for b in COLOURS if b != fg]
        bg = bgs[int(rng.integers(len(bgs)))]
        out.append(EvalPrompt(subject_caption(f"{fg} {shape}", bg), Expectation(shape=shape, fg=fg, bg=bg)))
    return out


@dataclass(frozen=True)
class Style:
    """A style-like change of every picture: the background is drawn ``bg`` whatever the caption says.

    Captions keep naming the scene's own background (``"a red circle on a blue background"`` under a black one), as
    a style's images keep their ordinary captions; a method that learns the style makes every prompt come out on
    ``bg``. The scorer reads it back, so the change is measurable.
    """

    name: str
    bg: str


STYLES: dict[str, Style] = {"night": Style("night", bg="black")}


def get_style(style: Style | str) -> Style:
    if isinstance(style, Style):
        return style
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    return STYLES[style]


def style_dataset(style: Style | str, n: int = 24, seed: int = 0) -> list[tuple[Scene, str]]:
    """``n`` deterministic ``(scene drawn in the style, caption of the scene as it would be)`` pairs.

    Scenes come from the base-training distribution with neither colour equal to the style's background.
    """
    s = get_style(style)
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    rng = np.random.default_rng(seed)
    out: list[tuple[Scene, str]] = []
    while len(out) < n:
        scene = base_training_scene(rng)
        if s.bg in (scene.fg, scene.bg):
            continue
        out.append((replace(scene, bg=s.bg), subject_caption(f"{scene.fg} {scene.shape}", scene.bg)))
    return out


def write_style_dataset(
    style: Style | str, out_dir: str | os.PathLike[str], n: int = 24, seed: int = 0, image_size: int = 64
) -> list[Path]:
    """Write a style dataset as ``0000.png`` + ``0000.txt`` sidecars; returns the image paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i, (scene, text) in enumerate(style_dataset(style, n=n, seed=seed)):
        image_path = out / f"{i:04d}.png"
        with atomic_path(image_path) as tmp:
            render(scene, size=image_size).save(tmp, format="PNG")
        write_text(image_path.with_suffix(".txt"), text + "\n")
        paths.append(image_path)
    return paths


def style_eval_prompts(style: Style | str, n: int = 32, seed: int = 0) -> list[EvalPrompt]:
    """Base prompts that name another background; in the style, the scorer should read the style's background."""
    s = get_style(style)
    out: list[EvalPrompt] = []
    for p in base_prompts(3 * n, seed=seed):
        e = p.expect
        if s.bg in (e.fg, e.bg):
            continue
        out.append(EvalPrompt(p.prompt, Expectation(shape=e.shape, fg=e.fg, bg=s.bg)))
        if len(out) == n:
            break
    return out


def replace_word(text: str, word: str, by: str) -> str:
    """``word`` (a trigger or a ``<token>``) replaced by ``by`` wherever it stands as a whole word."""
    return re.sub(rf"(?<![\w<]){re.escape(word)}(?![\w>])", by, text)


def expectation_of(prompt: str, subject: str | None = None, concept: Concept | str | None = None) -> Expectation | None:
    """What the scorer should read for a shapes-world ``prompt`` (``None`` if it names no shape or no background).

    The shape is the shape word; the foreground the colour word just before it (any colour when none); the background
    the other colour named. ``subject`` (e.g. a token ``"<teal-heart>"`` or ``"sks heart"``) stands for ``concept``'s
    words: ``"a <teal-heart> on a green background"`` expects a teal heart on green.
    """
    text = prompt.lower()
    if subject and concept is not None:
        c = get_concept(concept)
        words = c.words if c.kind == "pairing" else c.shape
        text = replace_word(text, subject.lower(), words)
    words = re.findall(r"[a-z]+", text)
    shapes = [i for i, w in enumerate(words) if w in SHAPES]
    colours = [i for i, w in enumerate(words) if w in COLOURS]
    if len(shapes) != 1:
        return None
    at = shapes[0]
    fg = words[at - 1] if at - 1 in colours else None
    rest = [words[i] for i in colours if i != at - 1]
    if len(rest) != 1:
        return None
    return Expectation(shape=words[at], fg=fg, bg=rest[0])
