"""Full fine-tune: train the model's own weights (UNet and/or text encoders) on captioned images.

Recipe (diffusers' ``examples/text_to_image/train_text_to_image.py``, kohya's ``fine_tune.py``):
1. load the base model and freeze all of it;
2. read the images and captions, encode the images to latents once; when the text encoders are frozen and the
   captions never change, their conditioning is computed once too;
3. the chosen components train (UNet, text encoder(s); each at its own rate); the VAE stays frozen; gradient
   checkpointing with ``train.gradient_checkpointing``; any optimizer of ``optimizer.name``;
4. EMA (``ema: true``): an exponential moving average of the trained weights, updated after every optimizer step;
   previews show it, it is what is exported, and checkpoints hold it so a resumed run continues the same average;
5. loss: the caption (through the template), noise at a random timestep, the UNet's prediction against the noise
   (or velocity), Min-SNR weighting if configured;
6. export (``save.dtype``): the whole model as a diffusers folder ``<name>/`` and one ``<name>.safetensors``
   checkpoint (A1111, ComfyUI), or with ``export: trained`` only the trained components in both layouts.
"""

from __future__ import annotations

import contextlib
import random
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console

from sdtune.config.methods import FinetuneConfig
from sdtune.core.dtypes import torch_dtype
from sdtune.data import process_caption
from sdtune.data.dataset import ImageCaptionSet
from sdtune.inference.previews import eval_mode, preview_prompts, preview_settings, render_previews
from sdtune.methods.regularisation import frozen_copy_preservation
from sdtune.models.text_encoding import encode_prompts
from sdtune.train.ema import WeightAverage
from sdtune.train.full_weights import (
    export_model,
    load_weights_state,
    named_parameters,
    trained_modules,
    unfreeze,
    weights_state,
)
from sdtune.train.loop import sample_rng
from sdtune.train.recipe import (
    ConsoleReport,
    captioning,
    frozen_base,
    held_out_loss,
    recipe_loss,
    text_cache,
    training_images,
)


class FinetuneJob:
    """The loop's view of a full fine-tune (see :class:`sdtune.train.loop.Job`)."""

    initial_step = 0

    def __init__(self, cfg: FinetuneConfig, accelerator: Accelerator, console: Console | None = None) -> None:
        self.cfg, self.console = cfg, console or Console()
        self.report = ConsoleReport(self.console)

        # 1. the base model, frozen until step 3 says what trains
        # in fp32 whatever the precision: exports write it all
        self.base_path, self.model = frozen_base(cfg, accelerator, reduced=False, report=self.report)
        self.scheduler = self.model.noise_scheduler()

        # 2. data: latents once; captions through the template (default: the captions as they are)
        self.resolution, self.data, self.validation = training_images(cfg, self.model, self.report)
        self.templates, self.caption_options, fixed = captioning(cfg.data)
        self.text_cache = text_cache(self.model, cfg.data) if fixed and not cfg.train_text_encoder else None

        # 3. what trains: the chosen components, whole; the VAE stays frozen
        self.trained = trained_modules(self.model, unet=cfg.train_unet, text_encoders=cfg.train_text_encoder)
        # regularisation against the base model's prediction: frozen copies of what trains, taken now
        self.preservation = None
        if cfg.preservation:
            self.preservation = frozen_copy_preservation(self, accelerator, list(self.trained))
        unfreeze(self.trained, cfg.train.gradient_checkpointing)

        # 4. the EMA of the trained weights (what previews show and export writes)
        self.ema = WeightAverage(named_parameters(self.trained), cfg.ema_decay) if cfg.ema else None

    def averaged(self) -> contextlib.AbstractContextManager:
        """Inside the block the live modules hold the weights users get: the EMA when it is on."""
        return self.ema.applied() if self.ema else contextlib.nullcontext()

    # -- what the loop calls -------------------------------------------------------------------------
    def trainable_parameters(self) -> list[dict]:
        cfg = self.cfg
        base = cfg.optimizer.lr if isinstance(cfg.optimizer.lr, float) else 1.0  # string: set per step
        return [
            {
                "params": list(module.parameters()),
                "lr": (cfg.unet_lr if name == "unet" else cfg.text_encoder_lr) or base,
            }
            for name, module in self.trained.items()
        ]

    def num_examples(self) -> int:
        return len(self.data)

    def prompt(self, index: int, rng: random.Random, captions: list[str] | None = None) -> str:
        caption = (captions or self.data.captions)[index]
        return self.templates.render("", process_caption(caption, self.caption_options, rng), rng)

    def loss(self, indices: list[int], generators: list[torch.Generator]) -> torch.Tensor:
        return self._loss(self.data, indices, generators)

    def validation_loss(self) -> float | None:
        """The loss on the validation images at fixed noise and timesteps, with the weights users get (the EMA when
        it is on); ``None`` without validation images."""
        with self.averaged():
            return held_out_loss(self.cfg, self.scheduler, self.validation, self._loss)

    def _loss(self, data: ImageCaptionSet, indices, generators, timesteps=None) -> torch.Tensor:
        batch = data.batch(indices, generators)  # latents, per-pixel (masks) and per-sample (reg images) weights
        latents = batch.latents.to(self.model.unet.device)
        prompts = [self.prompt(i, sample_rng(g), data.captions) for i, g in zip(indices, generators, strict=True)]
        training = data is self.data
        snapshot = self.preservation.snapshot(generators) if self.preservation and training else []
        encode = self.text_cache if self.text_cache is not None else partial(encode_prompts, self.model)
        if self.preservation and training:  # regularisation samples against the frozen copy's prediction
            return self.preservation.loss(
                partial(recipe_loss, self), encode, latents, prompts, generators,
                instances=len(indices), snapshot=snapshot, weights=batch.weights, mask=batch.mask,
            )  # fmt: skip
        cond = encode(prompts)
        return recipe_loss(self, latents, cond, generators, mask=batch.mask, weights=batch.weights, timesteps=timesteps)

    def after_step(self, step: int) -> None:
        if self.ema:  # once per optimizer step (a resumed run's first call repeats a step already averaged)
            self.ema.update(step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return weights_state(self.trained) | (self.ema.state_dict() if self.ema else {})

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_weights_state(self.trained, state)
        if self.ema:
            self.ema.load_state_dict(state)

    # -- outputs -------------------------------------------------------------------------------------
    def export(self, out_dir: Path, step: int) -> list[Path]:
        only = list(self.trained) if self.cfg.export == "trained" else None
        with self.averaged():
            return export_model(self.model, Path(out_dir), self.cfg.name, torch_dtype(self.cfg.save.dtype), only)

    def preview(self, out_dir: Path, step: int) -> tuple[list[Path], Path | None]:
        p = self.cfg.preview
        prompts = preview_prompts(p, self.templates, self.data.captions, name=None)
        seeds = [p.seed + i for i in range(len(prompts))]
        settings = preview_settings(p, self.resolution)
        with self.users_model() as model:
            return render_previews(model, prompts, prompts, seeds, settings, out_dir, self.base_path.stem)

    # -- evaluation (sdtune.methods.evaluation) ---------------------------------------------------------
    @contextlib.contextmanager
    def users_model(self):
        """The trained weights in eval mode, their EMA when the run keeps one."""
        with eval_mode(self.trained.values()), self.averaged():
            yield self.model

    def model_prompts(self, prompts: list[str]) -> list[str]:
        return list(prompts)


def setup(cfg: FinetuneConfig, accelerator: Accelerator, console: Console | None = None) -> FinetuneJob:
    """Build the job for ``cfg`` (loads model and data, unfreezes what trains; one-line errors for bad input)."""
    return FinetuneJob(cfg, accelerator, console)
