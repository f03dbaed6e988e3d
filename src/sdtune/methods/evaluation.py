"""Which evaluation a run gets (``eval:``): the scorer, the prompts as this method names its concept, the settings;
and the step function the loop calls. Shared by every method and by ``sdtune eval`` (tools/evaluate_files.py).

- ``scorer: auto`` = the shapes-world scorer on the built-in model, CLIP (+ DINOv2) when ``eval.clip_model`` is
  set, otherwise none (said once before training: the run trains without evaluation).
- The concept prompts name the concept as the run does: a textual inversion's or pivotal LoRA's token, DreamBooth's
  ``instance_token`` + the class word (``sks heart``), a LoRA without a token the plain words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sdtune.config.blocks import EvalConfig
from sdtune.config.methods import RunBase
from sdtune.core.errors import ConfigError, DataError
from sdtune.evaluate.evaluation import ClipScorer, Evaluation, WorldScorer, without_word
from sdtune.inference.generate import GenerationSettings
from sdtune.train.loop import EvaluateFn
from sdtune.world import base_prompts, eval_prompts, get_concept, get_style, style_eval_prompts
from sdtune.world.concepts import STYLES, expectation_of

MAX_REFERENCE_IMAGES = 64


@dataclass
class Scorers:
    """What the scorer needs that can be checked before the model loads (CLIP / DINOv2 folders)."""

    kind: str | None  # "world", "clip" or None (no evaluation)
    notice: str | None = None
    clip: object | None = None
    dino: object | None = None


@dataclass(frozen=True)
class Target:
    """What an evaluation needs to know of the run (or of the file ``sdtune eval`` scores)."""

    method: str
    word: str | None  # how prompts name the concept: the token / trigger, or None (plain words)
    resolution: int
    negative_prompt: str = ""
    images: str | None = None  # the concept's images (CLIP-I / DINO references); eval.reference_images wins
    prompts: tuple[str, ...] = ()  # concept prompts when eval.prompts is empty (real models: the preview prompts)
    prior: tuple[str, ...] = ()  # prior prompts when eval.prior_prompts is empty
    trigger: bool = False  # the word is a trigger written before the class word (`sks heart`), not a new token


def concept_word(cfg: RunBase) -> tuple[str | None, bool]:
    """How a run's prompts name its concept, and whether the word is a trigger before the class word: the token
    (textual inversion, pivotal LoRA: the whole concept), DreamBooth's instance token or preservation's trigger
    (`sks heart`), or None (the plain words)."""
    if token := getattr(cfg, "token", None):
        return token, False
    preservation = getattr(cfg, "preservation", None)
    trigger = getattr(cfg, "instance_token", None) or (preservation.trigger if preservation is not None else None)
    return trigger, trigger is not None


def target_of(cfg: RunBase, resolution: int) -> Target:
    word, trigger = concept_word(cfg)
    return Target(
        cfg.method,
        word,
        resolution,
        cfg.preview.negative_prompt,
        cfg.data.path,
        tuple(cfg.preview.prompts),
        tuple(_prior_prompts(cfg)),
        trigger,
    )


def load_scorers(e: EvalConfig | None, base: str) -> Scorers:
    """Resolve ``eval.scorer`` and load the CLIP / DINOv2 models; a bad folder is a one-line error before training."""
    if e is None:
        return Scorers(None)
    builtin = base == "builtin"
    kind = e.scorer
    if kind == "auto":
        kind = "clip" if e.clip_model else "world" if builtin else None
    if kind is None:
        return Scorers(
            None,
            "eval: no scorer for this model (the shapes-world scorer reads only the built-in model); set "
            "eval.clip_model (and eval.dino_model) to local model folders to evaluate; training without evaluation",
        )
    if kind == "world" and not builtin:
        raise ConfigError(
            "eval.scorer: world reads the built-in model's shapes world only; use scorer: clip with eval.clip_model"
        )
    if kind == "clip":
        if not e.clip_model:
            raise ConfigError("eval.clip_model: scorer clip needs a local CLIP folder; set eval.clip_model")
        from sdtune.evaluate.embedders import ClipEmbedder, DinoEmbedder

        clip = ClipEmbedder.load(e.clip_model)
        dino = DinoEmbedder.load(e.dino_model) if e.dino_model else None
        return Scorers("clip", clip=clip, dino=dino)
    if e.dino_model or e.clip_model:
        raise ConfigError("eval.scorer: world does not use clip_model / dino_model; remove them or use scorer: clip")
    return Scorers("world")


def _named(prompts: list[str], word: str | None) -> list[str]:
    """``[name]`` written as the run's word (left out, as previews do, when the run has none)."""
    return [" ".join(p.replace("[name]", word or "").split()) for p in prompts]


def _world_subject(word: str | None, trigger: bool, concept) -> str | None:
    """How the run's prompts name the world concept: a trigger goes before the class word (`sks heart`)."""
    if word is None or concept is None:
        return word
    return f"{word} {concept.shape}" if trigger else word


def _world(e: EvalConfig, method: str, word: str | None, trigger: bool) -> tuple[WorldScorer, list[str], list[str]]:
    style = get_style(e.concept) if e.concept in STYLES else None
    concept = get_concept(e.concept) if e.concept and style is None else None
    subject = _world_subject(word, trigger, concept)
    if e.prompts:
        pairs = []
        for prompt in _named(e.prompts, subject):
            expect = expectation_of(prompt, subject, concept)
            if expect is None:
                raise ConfigError(
                    f"eval.prompts: {prompt!r} names no shape and background the world scorer can read; write e.g. "
                    "'a red star on a green background', or leave prompts empty and set eval.concept"
                )
            pairs.append((prompt, expect))
    elif style is not None:
        pairs = [(p.prompt, p.expect) for p in style_eval_prompts(style, n=e.num_prior_prompts)]
    elif concept is not None:
        pairs = [(p.prompt, p.expect) for p in eval_prompts(concept, token=subject)]
    else:
        raise ConfigError(
            "eval.concept: no concept prompts; set eval.concept (star, teal_heart or night) or eval.prompts"
        )
    if e.prior_prompts:
        prior = []
        for prompt in e.prior_prompts:
            expect = expectation_of(prompt)
            if expect is None:
                raise ConfigError(
                    f"eval.prior_prompts: {prompt!r} names no shape and background the world scorer can read; "
                    "write e.g. 'a red circle on a blue background'"
                )
            prior.append((prompt, expect))
    elif style is None and method != "textual_inversion":
        # a style changes every picture (drift is what it is asked for); a new word changes no prompt without it
        prior = [(p.prompt, p.expect) for p in base_prompts(e.num_prior_prompts, seed=0)]
    else:
        prior = []
    if style is not None:
        attrs = ("bg",)  # a style is its background
    elif concept is None:
        attrs = ("shape", "fg", "bg")  # prompts of the user's: everything they ask
    else:
        attrs = ("shape",) if concept.kind == "shape" else ("shape", "fg")
    scorer = WorldScorer([x for _, x in pairs], [x for _, x in prior], attrs)
    return scorer, [p for p, _ in pairs], [p for p, _ in prior]


def _prior_prompts(cfg: RunBase) -> list[str]:
    """Real models: what the run should keep drawing, when ``eval.prior_prompts`` is empty."""
    preservation = getattr(cfg, "preservation", None)
    if preservation is not None and preservation.prompts:
        return list(preservation.prompts)
    if getattr(cfg, "prior_preservation", False) and getattr(cfg, "class_prompt", None):
        return [cfg.class_prompt]
    dreambooth = getattr(cfg, "dreambooth", None)
    return [dreambooth.class_prompt] if dreambooth is not None else []


def reference_images(folder: str | Path) -> list[Image.Image]:
    """The concept's images (``eval.reference_images`` or ``data.path``): at most 64, regularisation images left
    out; unreadable files are skipped (the data check reports them)."""
    from sdtune.data.sources import load_sources

    images = []
    for entry in load_sources(folder).entries:
        if entry.is_reg:
            continue
        try:
            with Image.open(entry.image) as img:
                images.append(img.convert("RGB"))
        except OSError:
            continue
        if len(images) == MAX_REFERENCE_IMAGES:
            break
    if not images:
        raise DataError(f"eval.reference_images: no readable images in {folder}; set it to the concept's images")
    return images


def build_evaluation(e: EvalConfig, scorers: Scorers, target: Target) -> Evaluation:
    """The :class:`Evaluation` of ``target`` (a run, or a file ``sdtune eval`` scores)."""
    word = target.word
    settings = GenerationSettings(
        steps=e.steps,
        cfg_scale=e.cfg_scale,
        sampler=e.sampler,
        width=target.resolution,
        height=target.resolution,
        negative_prompt=target.negative_prompt,
    )
    if scorers.kind == "world":
        scorer, concept, prior = _world(e, target.method, word, target.trigger)
    else:
        concept = _named(list(e.prompts or target.prompts), word)
        if not concept:
            raise ConfigError("eval.prompts: no concept prompts; set eval.prompts (or preview.prompts), e.g. "
                              "['a photo of [name] on a beach']")  # fmt: skip
        prior = list(e.prior_prompts or target.prior)
        folder = e.reference_images or target.images
        if not folder:
            raise ConfigError("eval.reference_images: the concept's images are needed for CLIP-I / DINO; set it")
        references = reference_images(folder)
        texts = [without_word(p, word) for p in concept]
        scorer = ClipScorer(scorers.clip, scorers.dino, references, texts)
    return Evaluation(scorer, concept, prior, settings, e.seed, e.images_per_prompt, e.drift_weight)


def step_evaluator(evaluation: Evaluation, job, log: Callable[[str], None]) -> EvaluateFn:
    """What the loop calls every ``eval.every_n_steps``: the images from the job's model as users get it (EMA
    weights where it exports them), the grid in ``folder/step-<N>.png``, the figures. The first call makes the
    reference (drift's baseline) from its own prior images and keeps it in ``folder`` for resumes."""

    kept: dict[str, dict] = {}  # the reference, read (or made) once per process

    def evaluate(step: int, folder: Path) -> dict[str, float]:
        with job.users_model() as model:
            images = evaluation.images(model, job.model_prompts)
        if evaluation.prior and "reference" not in kept:
            reference = evaluation.load_reference(folder)
            if reference is None:
                reference = evaluation.scorer.reference(images.prior)
                evaluation.save_reference(folder, reference, step)
                if step > 0:
                    log(f"eval: no reference images of the base model; drift is measured against step {step}")
            kept["reference"] = reference
        evaluation.save_grid(images, folder / f"step-{step}.png")
        return evaluation.figures(images, kept.get("reference"))

    return evaluate


def make_evaluator(cfg: RunBase, scorers: Scorers, job, log: Callable[[str], None]) -> EvaluateFn | None:
    """The loop's evaluation step for ``job`` (None without ``eval:`` or without a scorer)."""
    if scorers.kind is None:
        return None
    evaluation = build_evaluation(cfg.eval, scorers, target_of(cfg, job.resolution))
    if not evaluation.prior:
        log("eval: no prior prompts, so no drift; score = fidelity (set eval.prior_prompts to measure drift)")
    return step_evaluator(evaluation, job, log)
