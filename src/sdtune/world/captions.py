"""Natural-language captions for shapes-world scenes.

The vocabulary is tiny and fixed: palette colour names, shape names, and a handful of templates. Colour
and shape words always appear exactly as named so that a text encoder sees one token sequence per
concept, and held-out concepts can be checked for by plain string search.
"""

from __future__ import annotations

import numpy as np

from sdtune.world.palette import check_colour
from sdtune.world.shapes import LARGE_ABOVE, SMALL_BELOW, Scene

# "{subject}" is "<fg> <shape>" (or a placeholder token), "{bg}" the background colour name; "{a}" and
# "{a_bg}" are the articles in front of them ("an orange ...").
CANONICAL = "{a} {subject} on {a_bg} {bg} background"
VARIANTS: tuple[str, ...] = (
    CANONICAL,
    "{a} {subject} over {a_bg} {bg} background",
    "{subject}, {bg} background",
    "a picture of {a} {subject} on {bg}",
    "{a} {subject} in front of {a_bg} {bg} background",
)
SIZE_WORDS = ("small", "large")


def article(word: str) -> str:
    """``"an"`` before a vowel (``"an orange"``), else ``"a"`` (also before placeholder tokens)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def format_caption(template: str, subject: str, bg: str) -> str:
    """Fill one of ``VARIANTS`` with a subject phrase and a background colour, with matching articles."""
    return template.format(a=article(subject), subject=subject, a_bg=article(bg), bg=bg)


def size_word(size: float) -> str | None:
    """``"small"``, ``"large"`` or ``None`` for a scene radius in canvas pixels."""
    if size < SMALL_BELOW:
        return "small"
    if size > LARGE_ABOVE:
        return "large"
    return None


def subject_caption(subject: str, bg: str, rng: np.random.Generator | None = None, size: float | None = None) -> str:
    """Caption for any ``subject`` phrase on a ``bg`` background.

    Without ``rng`` the canonical form is returned. With one, a template is drawn and, for a clearly
    small or large ``size``, a size word is sometimes prefixed to the subject.
    """
    check_colour(bg)
    if not subject.strip():
        raise ValueError(f"subject {subject!r} is empty; pass e.g. 'red circle' or a placeholder token")
    if rng is None:
        return format_caption(CANONICAL, subject, bg)
    template = VARIANTS[int(rng.integers(len(VARIANTS)))]
    # Always draw, so the number of draws (and every later caption) does not depend on the size.
    use_size = bool(rng.random() < 0.5)
    word = size_word(size) if size is not None else None
    if use_size and word is not None:
        subject = f"{word} {subject}"
    return format_caption(template, subject, bg)


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Caption a scene: ``"a red circle on a blue background"``, or a random variant when ``rng`` is given.

    Articles follow English (``"an orange heart on a white background"``).
    """
    return subject_caption(f"{scene.fg} {scene.shape}", scene.bg, rng, scene.size)


def concept_caption(token: str, bg: str, rng: np.random.Generator | None = None, size: float | None = None) -> str:
    """Caption with ``token`` in place of ``"<fg> <shape>"``, e.g. ``"a <tok> on a blue background"``.

    Used for textual-inversion data, where the token's embedding must carry the whole concept.
    """
    return subject_caption(token, bg, rng, size)
