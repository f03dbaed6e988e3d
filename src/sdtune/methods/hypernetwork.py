"""Hypernetworks (AUTOMATIC1111): small residual MLPs rewrite the attention context before k and v; the model is frozen.

Recipe:
1. load the base model and freeze all of it;
2. read the images and captions, encode the images to latents once; the text encoder is frozen, so fixed captions
   are encoded once too (A1111 pre-encodes them the same way);
3. build one (k, v) module pair per context width (default: the model's cross-attention width) with A1111's
   structure and initialisation, seeded by ``train.seed``, and hook it in front of every matching attention
   layer's ``to_k``/``to_v``; its parameters are the only trainable ones;
4. loss: the caption (through the template), noise at a random timestep, the hooked UNet's prediction against
   the noise (or velocity), Min-SNR weighting if configured; the multiplier is 1 while training (A1111);
5. export: ``<name>.pt`` in A1111's layout (models/hypernetworks/), readable with ``torch.load(weights_only=True)``.
Previews render with the hypernetwork in eval mode (no dropout) at ``multiplier``.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console

from sdtune.adapters.hypernetwork import (
    Hypernetwork,
    HypernetworkSpec,
    context_widths,
    install,
    legacy_dropout_structure,
)
from sdtune.config.methods import HypernetworkConfig
from sdtune.core.errors import ConfigError
from sdtune.data import process_caption
from sdtune.data.dataset import ImageCaptionSet
from sdtune.formats.hashes import a1111_short_hash
from sdtune.formats.hypernetwork_file import HypernetworkFile, save_hypernetwork
from sdtune.inference.previews import preview_prompts, preview_settings, render_previews
from sdtune.models.text_encoding import encode_prompts
from sdtune.train.loop import sample_rng
from sdtune.train.recipe import (
    ConsoleReport,
    captioning,
    checkpoint_activations,
    frozen_base,
    held_out_loss,
    recipe_loss,
    text_cache,
    training_images,
)


def spec_of(cfg: HypernetworkConfig) -> HypernetworkSpec:
    """The module structure a config asks for (A1111's legacy dropout rule when no structure is given)."""
    dropout = None
    if cfg.dropout:
        dropout = cfg.dropout_structure or legacy_dropout_structure(cfg.layer_structure, True, cfg.last_layer_dropout)
    return HypernetworkSpec(
        layer_structure=tuple(cfg.layer_structure),
        activation=cfg.activation,
        layer_norm=cfg.layer_norm,
        dropout_structure=tuple(dropout) if dropout else None,
        activate_output=cfg.activate_output,
        weight_init=cfg.weight_init,
    )


class HypernetworkJob:
    """The loop's view of a hypernetwork run (see :class:`sdtune.train.loop.Job`)."""

    initial_step = 0

    def __init__(self, cfg: HypernetworkConfig, accelerator: Accelerator, console: Console | None = None) -> None:
        self.cfg, self.console = cfg, console or Console()
        self.report = ConsoleReport(self.console)

        # 1. the base model, frozen
        self.base_path, self.model = frozen_base(cfg, accelerator, report=self.report)
        self.scheduler = self.model.noise_scheduler()

        # 2. data: latents once; captions through the template (default: the captions as they are)
        self.resolution, self.data, self.validation = training_images(cfg, self.model, self.report)
        self.templates, self.caption_options, fixed = captioning(cfg.data)
        self.text_cache = text_cache(self.model, cfg.data) if fixed else None

        # 3. the hypernetwork: A1111's structure and init (seeded), hooked before every matching to_k / to_v
        unet = self.model.unet
        sizes = cfg.sizes or [int(unet.config.cross_attention_dim)]
        available = context_widths(unet)
        if missing := [s for s in sizes if s not in available]:
            raise ConfigError(
                f"sizes: no attention layer of this model takes a context of width {missing[0]}; "
                f"choose from {available} (or leave sizes empty for the cross-attention width)"
            )
        self.hypernetwork = Hypernetwork(sizes, spec_of(cfg))
        self.hypernetwork.reset_parameters(torch.Generator().manual_seed(cfg.train.seed))
        self.hypernetwork.to(accelerator.device).train()
        self.installed = install(unet, self.hypernetwork)
        if cfg.train.gradient_checkpointing:  # the hypernetwork's gradient comes back through the UNet
            checkpoint_activations({"unet": unet})

    # -- what the loop calls -------------------------------------------------------------------------
    def trainable_parameters(self) -> list[dict]:
        rate = self.cfg.optimizer.lr if isinstance(self.cfg.optimizer.lr, float) else 1.0  # string: set per step
        return [{"params": list(self.hypernetwork.parameters()), "lr": rate}]

    def num_examples(self) -> int:
        return len(self.data)

    def prompt(self, index: int, rng: random.Random, captions: list[str] | None = None) -> str:
        filewords = process_caption((captions or self.data.captions)[index], self.caption_options, rng)
        return self.templates.render(self.cfg.name, filewords, rng)

    def loss(self, indices: list[int], generators: list[torch.Generator]) -> torch.Tensor:
        return self._loss(self.data, indices, generators)

    def validation_loss(self) -> float | None:
        """The loss on the validation images at fixed noise and timesteps (``None`` without validation images)."""
        if self.validation is None:
            return None
        self.hypernetwork.eval()  # no dropout: the same weights must give the same value
        try:
            return held_out_loss(self.cfg, self.scheduler, self.validation, self._loss)
        finally:
            self.hypernetwork.train()

    def _loss(self, data: ImageCaptionSet, indices, generators, timesteps=None) -> torch.Tensor:
        batch = data.batch(indices, generators)  # latents, per-pixel (masks) and per-sample (reg images) weights
        latents = batch.latents.to(self.model.unet.device)
        prompts = [self.prompt(i, sample_rng(g), data.captions) for i, g in zip(indices, generators, strict=True)]
        cond = self.text_cache(prompts) if self.text_cache else encode_prompts(self.model, prompts)
        return recipe_loss(self, latents, cond, generators, mask=batch.mask, weights=batch.weights, timesteps=timesteps)

    def after_step(self, step: int) -> None:
        pass  # nothing step-dependent: the UNet and text encoder are frozen, the hypernetwork always trains

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.hypernetwork.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.hypernetwork.load_state_dict(state)

    # -- outputs -------------------------------------------------------------------------------------
    def hypernetwork_file(self, step: int) -> HypernetworkFile:
        return HypernetworkFile(
            self.hypernetwork,
            name=self.cfg.name,
            step=step,
            sd_checkpoint=a1111_short_hash(self.base_path) if self.base_path.is_file() else None,
            sd_checkpoint_name=self.base_path.stem,
        )

    def export(self, out_dir: Path, step: int) -> list[Path]:
        path = Path(out_dir) / f"{self.cfg.name}.pt"  # A1111 lists the file under its name
        return [save_hypernetwork(self.hypernetwork_file(step), path, self.cfg.save.dtype)]

    def preview(self, out_dir: Path, step: int) -> tuple[list[Path], Path | None]:
        p = self.cfg.preview
        prompts = preview_prompts(p, self.templates, self.data.captions, name=self.cfg.name)
        seeds = [p.seed + i for i in range(len(prompts))]
        settings = preview_settings(p, self.resolution)
        with self.users_model() as model:
            return render_previews(model, prompts, prompts, seeds, settings, out_dir, self.base_path.stem)

    # -- evaluation (sdtune.methods.evaluation) ---------------------------------------------------------
    @contextlib.contextmanager
    def users_model(self):
        """No dropout, and the preview multiplier applies (A1111 ignores it while training)."""
        self.hypernetwork.eval()
        self.hypernetwork.multiplier = self.cfg.multiplier
        try:
            yield self.model
        finally:
            self.hypernetwork.train()

    def model_prompts(self, prompts: list[str]) -> list[str]:
        return list(prompts)


def setup(cfg: HypernetworkConfig, accelerator: Accelerator, console: Console | None = None) -> HypernetworkJob:
    """Build the job for ``cfg`` (loads model and data, hooks the hypernetwork in; one-line errors for bad input)."""
    return HypernetworkJob(cfg, accelerator, console)
