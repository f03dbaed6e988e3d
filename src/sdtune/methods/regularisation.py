"""Prior-prediction regularisation wired into a method's job (concept model, DreamBooth, fine-tune): which base
model predicts the targets, the rendering of regularisation images, the training prompts the trigger is checked
against (:mod:`sdtune.train.preservation` does the rest)."""

from __future__ import annotations

import contextlib
import random

from accelerate import Accelerator

from sdtune.inference.generate import generate
from sdtune.inference.previews import class_image_settings
from sdtune.train.preservation import BasePrediction, Preservation, adapters_off, frozen_copies, preservation_folder
from sdtune.train.recipe import STORAGE_DTYPES


def adapter_preservation(job, accelerator: Accelerator) -> Preservation:
    """For a concept model: the base model is the job's own model with its adapters switched off (no extra
    memory). Call it before the adapters are added: regularisation images are rendered by the base model."""
    base = BasePrediction(
        job.model.unet, job.model, lambda: adapters_off(list(job.components.values())), job.text_cache
    )
    return _prepare(job, accelerator, base)


def frozen_copy_preservation(job, accelerator: Accelerator, trained: list[str]) -> Preservation:
    """For a full-weight method: frozen copies of the components in ``trained`` (in the run's compute precision:
    bf16/fp16 under mixed precision, else fp32) predict the targets. Call it before anything trains."""
    dtype = STORAGE_DTYPES.get(accelerator.mixed_precision, next(job.model.unet.parameters()).dtype)
    unet, view = frozen_copies(job.model, trained, dtype)
    base = BasePrediction(unet, view, contextlib.nullcontext, job.text_cache)
    return _prepare(job, accelerator, base)


def _prepare(job, accelerator: Accelerator, base: BasePrediction) -> Preservation:
    cfg = job.cfg
    settings = class_image_settings(cfg.preview, job.resolution)
    rng = random.Random(0)
    return Preservation.prepare(
        cfg.preservation,
        base=base,
        folder=preservation_folder(cfg.preservation, cfg.output_dir, cfg.name),
        training_prompts=[job.prompt(i, rng) for i in range(len(job.data))],
        data=cfg.data,
        vae=job.model.vae,
        resolution=job.resolution,
        seed=cfg.train.seed,
        render=lambda prompts, seeds: generate(job.model, prompts, seeds, settings),
        accelerator=accelerator,
        log=job.report.log,
        report=job.report.skipped,
    )
