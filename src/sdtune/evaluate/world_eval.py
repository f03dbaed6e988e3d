"""Score a model on shapes-world prompts: generate with fixed seeds, read each image back with the scorer.

On the built-in model this is the ground truth for "did it learn the concept" (concept fidelity on the
concept's evaluation prompts) and "did it forget" (accuracy on base prompts, i.e. prior drift).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

from sdtune.inference.generate import GenerationSettings, generate
from sdtune.models.components import SDComponents
from sdtune.world import EvalPrompt, Reading, matches, score_image

# The built-in model's documented evaluation settings (BENCHMARKS.md): DDIM, 20 steps, CFG 7.
BUILTIN_EVAL = GenerationSettings(steps=20, cfg_scale=7.0, sampler="ddim")


@dataclass
class WorldScore:
    """Fractions of images read fully right (shape, fg and bg), and per attribute."""

    full: float
    shape: float
    fg: float
    bg: float
    n: int
    seconds_per_image: float
    readings: list[Reading] = field(repr=False, default_factory=list)
    images: list[Image.Image] = field(repr=False, default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.full:.1%} fully right (shape {self.shape:.1%}, fg {self.fg:.1%}, bg {self.bg:.1%}) "
            f"on {self.n} images"
        )


def score_prompts(
    components: SDComponents,
    prompts: Sequence[EvalPrompt],
    settings: GenerationSettings = BUILTIN_EVAL,
    seed: int = 0,
    images_per_prompt: int = 1,
) -> WorldScore:
    """Generate ``images_per_prompt`` images per prompt (seeds ``seed + k``) and score them."""
    texts = [p.prompt for p in prompts for _ in range(images_per_prompt)]
    expects = [p.expect for p in prompts for _ in range(images_per_prompt)]
    seeds = [seed + i for i in range(len(texts))]
    start = time.perf_counter()
    images = generate(components, texts, seeds, settings)
    elapsed = time.perf_counter() - start
    readings = [score_image(img) for img in images]
    n = len(readings)

    def frac(ok: Sequence[bool]) -> float:
        return sum(ok) / max(n, 1)

    return WorldScore(
        full=frac([matches(r, e) for r, e in zip(readings, expects, strict=True)]),
        shape=frac([r.shape == e.shape for r, e in zip(readings, expects, strict=True)]),
        fg=frac([e.fg is None or r.fg == e.fg for r, e in zip(readings, expects, strict=True)]),
        bg=frac([r.bg == e.bg for r, e in zip(readings, expects, strict=True)]),
        n=n,
        seconds_per_image=elapsed / max(n, 1),
        readings=readings,
        images=images,
    )
