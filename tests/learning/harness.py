"""Train a method on the built-in model through the real `run()` and score what it learned with the world's scorer.

The learning tests and the measurements behind their thresholds (BENCHMARKS.md) both go through `learn()`, so a
threshold always refers to exactly what the test runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from sdtune.config import parse_config
from sdtune.config.methods import METHOD_SCHEMAS
from sdtune.evaluate.world_eval import BUILTIN_EVAL, WorldScore, score_prompts
from sdtune.methods.run import run
from sdtune.models.components import SDComponents
from sdtune.models.loading import load_model
from sdtune.tools.apply_outputs import load_with_output, run_output
from sdtune.world import COLOURS, EvalPrompt, base_prompts
from sdtune.world.captions import subject_caption
from sdtune.world.scorer import Expectation

BASE_PROMPTS = 32


@dataclass
class Learned:
    concept_before: WorldScore
    concept_after: WorldScore
    base_before: WorldScore
    base_after: WorldScore
    train_seconds: float
    outputs: list[Path]

    def summary(self) -> str:
        return (
            f"concept {self.concept_before.full:.1%} -> {self.concept_after.full:.1%} ({self.concept_after.n} images), "
            f"base {self.base_before.full:.1%} -> {self.base_after.full:.1%}, trained in {self.train_seconds:.0f}s"
        )


def _model_with(outputs: list[Path], last: bool = False) -> SDComponents:
    """The built-in model with what the run wrote applied as the web UI's "Generate with this" applies it (with
    ``last``: the last step's files, where an evaluation kept another step in output/)."""
    model, _ = load_with_output(run_output(outputs[0].parent.parent, last))  # <run>/output/<file>
    return model


_BASE_SCORES: dict[tuple, WorldScore] = {}


def class_prompts(shape: str) -> list[EvalPrompt]:
    """Base prompts of one shape in every colour the base model was trained on (DreamBooth's class drift)."""
    return [p for p in base_prompts(98, seed=0) if p.expect.shape == shape]


def leak_prompts(shape: str, fg: str) -> list[EvalPrompt]:
    """The class asked in plain words ("a heart on a blue background") on every other background, each expecting
    the trained subject's colour: the fraction read "fully right" is how often the class now comes out as the
    subject (DreamBooth's language drift). The base model never draws a teal heart unasked (measured: 0 %)."""
    return [
        EvalPrompt(subject_caption(shape, bg), Expectation(shape=shape, fg=fg, bg=bg)) for bg in COLOURS if bg != fg
    ]


def base_score(prompts: list[EvalPrompt], seed: int, images_per_prompt: int = 1) -> WorldScore:
    """The unchanged built-in model's score on ``prompts``: computed once per test session (it never changes)."""
    key = (tuple(prompts), seed, images_per_prompt)
    if key not in _BASE_SCORES:
        _BASE_SCORES[key] = score_prompts(load_model("builtin"), prompts, BUILTIN_EVAL, seed, images_per_prompt)
    return _BASE_SCORES[key]


def diffusers_applied(lora_file: Path, prompts: list[EvalPrompt], seed: int = 1000, images_per_prompt: int = 1):
    """The score of the built-in model with ``lora_file`` applied by diffusers' own ``load_lora_weights`` (its kohya
    converter and peft layers; nothing of sdtune's reader), sampled and scored as :func:`learn` does."""
    from sdtune.inference.generate import make_pipeline

    model = load_model("builtin")
    make_pipeline(model).load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    return score_prompts(model, prompts, BUILTIN_EVAL, seed=seed, images_per_prompt=images_per_prompt)


def learn(
    config: dict[str, Any],
    concept_prompts: list[EvalPrompt],
    before_prompts: list[EvalPrompt] | None = None,
    seed: int = 1000,
    drift_prompts: list[EvalPrompt] | None = None,
    drift_images: int = 1,
    last: bool = False,
) -> Learned:
    """Score the base model, train ``config`` (a dict as in a YAML file), score again with its outputs applied.

    ``before_prompts`` (default: ``concept_prompts``) are what the base model is asked before training, e.g. the
    class word instead of a token it does not know yet. ``drift_prompts`` (default: 32 base prompts over every
    shape and colour) measure what the base model keeps, ``drift_images`` images each. ``last``: score the last
    step's files (``output/last/`` when the run's evaluation kept an earlier step in ``output/``).
    """
    basics = drift_prompts or base_prompts(BASE_PROMPTS, seed=0)
    asked = before_prompts or concept_prompts
    concept_before = base_score(asked, seed, images_per_prompt=2)
    base_before = base_score(basics, seed, drift_images)
    cfg = parse_config(config, METHOD_SCHEMAS[config["method"]])
    start = time.perf_counter()
    outputs = run(cfg, console=Console(quiet=True), progress=False)
    seconds = time.perf_counter() - start
    model = _model_with(outputs, last)
    concept_after = score_prompts(model, concept_prompts, BUILTIN_EVAL, seed=seed, images_per_prompt=2)
    base_after = score_prompts(model, basics, BUILTIN_EVAL, seed=seed, images_per_prompt=drift_images)
    return Learned(concept_before, concept_after, base_before, base_after, seconds, outputs)
