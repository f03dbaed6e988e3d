"""The steps every training recipe starts with: the frozen base model, and the training and validation images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from accelerate import Accelerator

from sdtune.config.methods import RunBase
from sdtune.data.dataset import ImageCaptionSet, has_validation
from sdtune.models.components import SDComponents, native_size
from sdtune.models.loading import load_model, resolve_path


def frozen_base(cfg: RunBase, accelerator: Accelerator) -> tuple[Path, SDComponents]:
    """``cfg.model.base`` resolved and loaded onto the accelerator's device, every module frozen in eval mode."""
    base_path = resolve_path(cfg.model.base)
    model = load_model(base_path, prediction_type=cfg.model.prediction_type).to(accelerator.device)
    for module in model.modules().values():
        module.requires_grad_(False).eval()
    return base_path, model


def training_images(
    cfg: RunBase, model: SDComponents, report: Callable
) -> tuple[int, ImageCaptionSet, ImageCaptionSet | None]:
    """The resolution (configured, else the model's native one), the training set with its latents, and the
    held-out validation set (``data.validation_split`` / ``validation_path``) or ``None``."""
    resolution = cfg.data.resolution or native_size(model)
    data = ImageCaptionSet.load(cfg.data, model.vae, resolution, cfg.train.seed, report)
    validation = None
    if has_validation(cfg.data):
        validation = ImageCaptionSet.load(cfg.data, model.vae, resolution, cfg.train.seed, report, split="validation")
    return resolution, data, validation
