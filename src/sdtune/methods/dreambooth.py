"""DreamBooth: teach the model one subject by fine-tuning its own weights on a few images named by a rare word.

Recipe (Ruiz et al. 2023, arXiv 2208.12242; diffusers' ``examples/dreambooth/train_dreambooth.py``):
1. load the base model and freeze all of it;
2. read the instance images, encode them to latents once; every one trains with ``instance_prompt``
   ("a sks heart"; ``[filewords]`` inserts the image's caption);
3. prior preservation: the *base* model renders class images of ``class_prompt`` into ``class_data_dir`` when
   fewer than ``num_class_images`` exist (reused by later runs); each instance sample is paired with a class sample
   (:mod:`sdtune.train.prior`, shared with LoRA-DreamBooth);
4. the UNet trains, and with ``train_text_encoder`` the text encoder(s) at their own rate; the VAE stays frozen;
   gradient checkpointing with ``train.gradient_checkpointing``;
5. loss: noise at a random timestep, the UNet's prediction against the noise (or velocity), Min-SNR if configured;
   ``loss = instance loss + prior_loss_weight x class loss`` through per-sample weights;
6. export: the whole model as a diffusers folder ``<name>/`` and one ``<name>.safetensors`` checkpoint (A1111,
   ComfyUI) in ``save.dtype``.
"""

from __future__ import annotations

import contextlib
import random
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from PIL import Image
from rich.console import Console

from sdtune.config.methods import DreamBoothConfig
from sdtune.core.dtypes import torch_dtype
from sdtune.core.errors import DataError
from sdtune.data import CaptionOptions, process_caption
from sdtune.data.dataset import ImageCaptionSet
from sdtune.inference.generate import generate
from sdtune.inference.previews import class_image_settings, eval_mode, preview_settings, render_previews
from sdtune.methods.regularisation import frozen_copy_preservation
from sdtune.models.text_encoding import encode_prompts
from sdtune.train.full_weights import export_model, load_weights_state, trained_modules, unfreeze, weights_state
from sdtune.train.loop import sample_rng
from sdtune.train.prior import PriorPreservation, check_instance_count, class_folder
from sdtune.train.recipe import (
    ConsoleReport,
    frozen_base,
    held_out_loss,
    recipe_loss,
    text_cache,
    training_images,
)


class DreamBoothJob:
    """The loop's view of a DreamBooth run (see :class:`sdtune.train.loop.Job`)."""

    initial_step = 0

    def __init__(self, cfg: DreamBoothConfig, accelerator: Accelerator, console: Console | None = None) -> None:
        self.cfg, self.console = cfg, console or Console()
        self.report = ConsoleReport(self.console)

        # 1. the base model, frozen until step 4 says what trains
        # in fp32 whatever the precision: exports write it all
        self.base_path, self.model = frozen_base(cfg, accelerator, reduced=False, report=self.report)
        self.scheduler = self.model.noise_scheduler()

        # 2. instance images: latents once; each trains with instance_prompt ([filewords] = its caption)
        self.resolution, self.data, self.validation = training_images(cfg, self.model, self.report)
        d = cfg.data
        self.caption_options = CaptionOptions.from_data(d)
        self.uses_captions = "[filewords]" in cfg.instance_prompt
        token = cfg.instance_token
        if self.uses_captions and token not in cfg.instance_prompt:  # then the captions must name the subject
            if bad := [i for i, c in enumerate(self.data.captions) if token not in c]:
                raise DataError(
                    f"instance_prompt: the caption of {self.data.paths[bad[0]]} ({self.data.captions[bad[0]]!r}) "
                    f"does not contain instance_token {token!r}; write it in every caption or in instance_prompt"
                )

        # 3. prior preservation: class images from the base model (before anything trains), reused next time
        self.prior: PriorPreservation | None = None
        if cfg.prior_preservation:
            self.prior = PriorPreservation.prepare(
                prompt=cfg.class_prompt,
                weight=cfg.prior_loss_weight,
                count=cfg.num_class_images,
                folder=class_folder(cfg.class_data_dir, cfg.output_dir, cfg.name),
                instances=self.data,
                data=cfg.data,
                vae=self.model.vae,
                resolution=self.resolution,
                seed=cfg.train.seed,
                render=self._render,
                accelerator=accelerator,
                log=self.report.log,
                report=self.report.skipped,
            )
        else:
            check_instance_count(self.data, d.batch_size, d.path)

        # 4. what trains: the UNet, and the text encoder(s) on request; the VAE stays frozen
        self.trained = trained_modules(self.model, unet=True, text_encoders=cfg.train_text_encoder)
        fixed = not (self.uses_captions and (d.shuffle_tags or d.tag_dropout or d.caption_dropout))
        self.text_cache = text_cache(self.model, d) if fixed and not cfg.train_text_encoder else None
        # regularisation against the base model's prediction: frozen copies of what trains, taken now
        self.preservation = None
        if cfg.preservation:
            self.preservation = frozen_copy_preservation(self, accelerator, list(self.trained))
        unfreeze(self.trained, cfg.train.gradient_checkpointing)

    def _render(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        return generate(self.model, prompts, seeds, class_image_settings(self.cfg.preview, self.resolution))

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
        if not self.uses_captions:
            return self.cfg.instance_prompt
        caption = process_caption((captions or self.data.captions)[index], self.caption_options, rng)
        return self.cfg.instance_prompt.replace("[filewords]", caption)

    def loss(self, indices: list[int], generators: list[torch.Generator]) -> torch.Tensor:
        return self._loss(self.data, indices, generators)

    def validation_loss(self) -> float | None:
        """The instance loss on the validation images at fixed noise and timesteps (``None`` without them)."""
        return held_out_loss(self.cfg, self.scheduler, self.validation, self._loss)

    def _loss(self, data: ImageCaptionSet, indices, generators, timesteps=None) -> torch.Tensor:
        batch = data.batch(indices, generators)  # latents, per-pixel (masks) and per-sample (reg images) weights
        latents, mask, weights = batch.latents.to(self.model.unet.device), batch.mask, batch.weights
        prompts = [self.prompt(i, sample_rng(g), data.captions) for i, g in zip(indices, generators, strict=True)]
        training, instances = data is self.data, len(indices)
        snapshot = self.preservation.snapshot(generators) if self.preservation and training else []
        if self.prior and training:  # training: one class sample per instance sample, from its own generator
            latents, prompts, generators, weights, mask = self.prior.extend(latents, prompts, generators, mask, weights)
        encode = self.text_cache if self.text_cache is not None else partial(encode_prompts, self.model)
        if self.preservation and training:  # regularisation samples against the frozen copy's prediction
            return self.preservation.loss(
                partial(recipe_loss, self), encode, latents, prompts, generators,
                instances=instances, snapshot=snapshot, weights=weights, mask=mask,
            )  # fmt: skip
        return recipe_loss(self, latents, encode(prompts), generators, weights=weights, mask=mask, timesteps=timesteps)

    def after_step(self, step: int) -> None:
        pass  # nothing step-dependent: the chosen components train throughout

    def state_dict(self) -> dict[str, torch.Tensor]:
        return weights_state(self.trained)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_weights_state(self.trained, state)

    # -- outputs -------------------------------------------------------------------------------------
    def export(self, out_dir: Path, step: int) -> list[Path]:
        return export_model(self.model, Path(out_dir), self.cfg.name, torch_dtype(self.cfg.save.dtype))

    def preview(self, out_dir: Path, step: int) -> tuple[list[Path], Path | None]:
        cfg, p = self.cfg, self.cfg.preview
        prompts = [q.replace("[name]", cfg.instance_token) for q in p.prompts]
        if not prompts:  # the subject as trained, and its class (which prior preservation keeps)
            prompts = [self.prompt(0, random.Random(p.seed))] + ([cfg.class_prompt] if cfg.class_prompt else [])
        seeds = [p.seed + i for i in range(len(prompts))]
        settings = preview_settings(p, self.resolution)
        with self.users_model() as model:
            return render_previews(model, prompts, prompts, seeds, settings, out_dir, self.base_path.stem)

    # -- evaluation (sdtune.methods.evaluation) ---------------------------------------------------------
    @contextlib.contextmanager
    def users_model(self):
        with eval_mode(self.trained.values()):
            yield self.model

    def model_prompts(self, prompts: list[str]) -> list[str]:
        return list(prompts)


def setup(cfg: DreamBoothConfig, accelerator: Accelerator, console: Console | None = None) -> DreamBoothJob:
    """Build the job for ``cfg`` (loads model and data, makes missing class images; one-line errors for bad input)."""
    return DreamBoothJob(cfg, accelerator, console)
