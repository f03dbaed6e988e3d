"""The procedural shapes world: one coloured shape on a flat background.

sdtune's tiny Stable Diffusion model is trained from scratch on this world, and :func:`score_image` is the
ground truth that says whether a generated image shows the concept it was asked for.
"""

from sdtune.world.captions import caption, concept_caption
from sdtune.world.concepts import (
    BASE_FG_COLOURS,
    BASE_SHAPES,
    CONCEPTS,
    EVAL_BACKGROUNDS,
    HELD_OUT_FG_COLOURS,
    HELD_OUT_SHAPES,
    TRAIN_BACKGROUNDS,
    Concept,
    EvalPrompt,
    base_prompts,
    base_training_examples,
    base_training_scene,
    concept_dataset,
    eval_prompts,
    get_concept,
    is_held_out,
    write_concept_dataset,
)
from sdtune.world.palette import COLOURS, PALETTE, nearest_colour, srgb_to_lab
from sdtune.world.scorer import Expectation, Reading, accuracy, matches, score_image
from sdtune.world.shapes import CANVAS, SHAPES, Scene, random_scene, render

__all__ = [
    "BASE_FG_COLOURS",
    "BASE_SHAPES",
    "CANVAS",
    "COLOURS",
    "CONCEPTS",
    "EVAL_BACKGROUNDS",
    "HELD_OUT_FG_COLOURS",
    "HELD_OUT_SHAPES",
    "PALETTE",
    "SHAPES",
    "TRAIN_BACKGROUNDS",
    "Concept",
    "EvalPrompt",
    "Expectation",
    "Reading",
    "Scene",
    "accuracy",
    "base_prompts",
    "base_training_examples",
    "base_training_scene",
    "caption",
    "concept_caption",
    "concept_dataset",
    "eval_prompts",
    "get_concept",
    "is_held_out",
    "matches",
    "nearest_colour",
    "random_scene",
    "render",
    "score_image",
    "srgb_to_lab",
    "write_concept_dataset",
]
