"""Textual inversion: teach a model new words. Only the new tokens' vectors train; the model stays frozen.

Recipe:
1. load the base model and freeze all of it;
2. read the images and captions, encode the images to latents once;
3. add the new token (and ``token_1 ... token_{n-1}`` for n vectors) to every tokenizer and give each text
   encoder a separate trainable table for just those rows, initialised by AUTOMATIC1111's rule (or from an
   existing embedding file, whose step count then continues);
4. loss: prompt from a template (``[name]`` = the token, ``[filewords]`` = the caption), noise at a random
   timestep, UNet prediction against the noise (or velocity), Min-SNR weighting if configured;
5. export: A1111 ``.pt``, ``.safetensors`` (SDXL: ``clip_l`` + ``clip_g``) and the PNG with the embedding inside.

The original token rows are never parameters, so they cannot change: no "restore the other rows" step needed.
"""

from __future__ import annotations

import contextlib
import random
import re
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console

from sdtune.adapters.token_embedding import add_trainable_token, expand_token, token_names
from sdtune.config.methods import TextualInversionConfig
from sdtune.core.errors import ConfigError, DataError
from sdtune.data import process_caption
from sdtune.data.dataset import ImageCaptionSet
from sdtune.formats.embeddings import Embedding, check_width, load_embedding, save_a1111_pt, save_safetensors
from sdtune.formats.hashes import a1111_short_hash
from sdtune.formats.png_embedding import save_png_embedding
from sdtune.inference.generate import generate
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
    training_images,
)

ENCODER_KEYS = ("clip_l", "clip_g")  # SDXL embedding file keys, in text-encoder order


class TextualInversionJob:
    """The loop's view of a textual-inversion run (see :class:`sdtune.train.loop.Job`)."""

    def __init__(self, cfg: TextualInversionConfig, accelerator: Accelerator, console: Console | None = None) -> None:
        self.cfg, self.console = cfg, console or Console()
        self.report = ConsoleReport(self.console)

        # 1. the base model, frozen
        self.base_path, self.model = frozen_base(cfg, accelerator, report=self.report)
        self.scheduler = self.model.noise_scheduler()

        # 2. data: images -> latents once; captions kept as text (templates and tag options apply per use)
        self.resolution, self.data, self.validation = training_images(cfg, self.model, self.report)
        self.captions = self.data.captions
        # the token must reach the prompts: through [name] in the templates, or written in every caption
        self.templates, self.caption_options, _ = captioning(cfg.data, "subject_filewords")
        named = any("[name]" in line for line in self.templates.lines)
        if not named and not all(cfg.token in c for c in self.captions):
            raise DataError(
                f"{self.templates.source}: no template line contains [name] and the captions do not all "
                f"contain {cfg.token}, so the token would never be trained; add [name] to the templates"
            )
        if len(self.data) < cfg.data.batch_size:
            self.console.print(
                f"note: {len(self.data)} images, fewer than data.batch_size {cfg.data.batch_size}: "
                "images repeat within a batch",
                highlight=False,
                markup=False,
            )

        # 3. the new token(s): one trainable table per text encoder (A1111's init), everything else stays frozen
        self.names = token_names(cfg.token, cfg.num_vectors)
        self.initial_step = 0  # an init_embedding file sets its own step count
        try:
            self.tables = add_trainable_token(
                self.model.tokenizers, self.model.text_encoders, cfg.token, cfg.num_vectors, cfg.init_text
            )
        except ValueError as exc:
            raise ConfigError(f"token: {exc}; choose a new word, e.g. <{cfg.name}>") from None
        if cfg.init_embedding:  # or start from an existing embedding, continuing its step count
            with torch.no_grad():
                for table, vectors in zip(self.tables, self._vectors_from_file(), strict=True):
                    table.extra.copy_(vectors)
        if cfg.train.gradient_checkpointing:  # the loss backpropagates through the UNet and the text encoders
            encoders = dict(zip(("text_encoder", "text_encoder_2"), self.model.text_encoders, strict=False))
            checkpoint_activations({"unet": self.model.unet} | encoders)

    def _vectors_from_file(self) -> list[torch.Tensor]:
        """Per text encoder, the vectors of ``init_embedding`` (its step count becomes the run's start)."""
        cfg = self.cfg
        widths = tuple(t.embedding_dim for t in self.tables)
        emb = load_embedding(cfg.init_embedding)
        check_width(emb, widths, cfg.init_embedding)
        if emb.num_vectors != cfg.num_vectors:
            raise ConfigError(
                f"num_vectors: {cfg.init_embedding} has {emb.num_vectors} vectors per token "
                f"(got num_vectors {cfg.num_vectors}); set num_vectors: {emb.num_vectors}"
            )
        self.initial_step = emb.step  # max_steps counts the embedding's earlier training too (A1111)
        return [emb.vectors[k].float() for k in self._keys()]

    # -- what the loop calls -------------------------------------------------------------------------
    def trainable_parameters(self) -> list[dict]:
        rate = self.cfg.optimizer.lr if isinstance(self.cfg.optimizer.lr, float) else 1.0  # string: set per step
        return [{"params": [t.extra for t in self.tables], "lr": rate}]

    def num_examples(self) -> int:
        return len(self.captions)

    def prompt(self, index: int, rng: random.Random, captions: list[str] | None = None) -> str:
        filewords = process_caption((captions or self.captions)[index], self.caption_options, rng)
        text = self.templates.render(self.cfg.token, filewords, rng)
        return expand_token(text, self.cfg.token, self.cfg.num_vectors)

    def loss(self, indices: list[int], generators: list[torch.Generator]) -> torch.Tensor:
        return self._loss(self.data, indices, generators)

    def validation_loss(self) -> float | None:
        """The loss on the validation images at fixed noise and timesteps (``None`` without validation images)."""
        return held_out_loss(self.cfg, self.scheduler, self.validation, self._loss)

    def _loss(self, data: ImageCaptionSet, indices, generators, timesteps=None) -> torch.Tensor:
        # masks (data.alpha_mask, mask files) weight the loss per pixel, mirrored with their latents
        batch = data.batch(indices, generators)  # (and reg images at data.reg_weight)
        latents = batch.latents.to(self.tables[0].extra.device)
        prompts = [self.prompt(i, sample_rng(g), data.captions) for i, g in zip(indices, generators, strict=True)]
        cond = encode_prompts(self.model, prompts)  # gradients flow into the new rows only
        return recipe_loss(self, latents, cond, generators, mask=batch.mask, weights=batch.weights, timesteps=timesteps)

    def after_step(self, step: int) -> None:
        pass  # nothing to restore: the original rows are not trainable (see module docstring)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"vectors.{i}": t.extra.detach().cpu().clone() for i, t in enumerate(self.tables)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, t in enumerate(self.tables):
                t.extra.copy_(state[f"vectors.{i}"])

    # -- outputs -------------------------------------------------------------------------------------
    def embedding(self, step: int) -> Embedding:
        vectors = {k: t.extra.detach().cpu().float().clone() for k, t in zip(self._keys(), self.tables, strict=True)}
        model_hash = a1111_short_hash(self.base_path) if self.base_path.is_file() else None
        return Embedding(self.file_stem, vectors, step, model_hash, self.base_path.stem)

    def _keys(self) -> tuple[str, ...]:
        return ENCODER_KEYS if self.model.family.arch == "sdxl" else ("text_encoder",)

    @property
    def file_stem(self) -> str:
        """File name = the trigger word in A1111/ComfyUI: the token without brackets and unsafe characters."""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", self.cfg.token).strip("-.")
        return stem or self.cfg.name

    def export(self, out_dir: Path, step: int) -> list[Path]:
        emb = self.embedding(step)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [out_dir / f"{self.file_stem}.safetensors"]
        save_safetensors(emb, paths[0])
        if self.model.family.arch != "sdxl":  # the A1111 .pt and PNG formats hold one text encoder's vectors
            paths.append(out_dir / f"{self.file_stem}.pt")
            save_a1111_pt(emb, paths[-1])
            (preview,) = self._render([self._preview_prompts()[0]], [self.cfg.preview.seed])
            paths.append(out_dir / f"{self.file_stem}.png")
            save_png_embedding(emb, preview, paths[-1])
        return paths

    def _preview_prompts(self) -> list[str]:
        return preview_prompts(self.cfg.preview, self.templates, self.captions, name=self.cfg.token)

    def _render(self, prompts: list[str], seeds: list[int]):
        expanded = [expand_token(p, self.cfg.token, self.cfg.num_vectors) for p in prompts]
        return generate(self.model, expanded, seeds, preview_settings(self.cfg.preview, self.resolution))

    # -- evaluation (sdtune.methods.evaluation) ---------------------------------------------------------
    def users_model(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext(self.model)

    def model_prompts(self, prompts: list[str]) -> list[str]:
        return [expand_token(p, self.cfg.token, self.cfg.num_vectors) for p in prompts]

    def preview(self, out_dir: Path, step: int) -> tuple[list[Path], Path | None]:
        prompts = self._preview_prompts()
        seeds = [self.cfg.preview.seed + i for i in range(len(prompts))]
        expanded = [expand_token(p, self.cfg.token, self.cfg.num_vectors) for p in prompts]
        settings = preview_settings(self.cfg.preview, self.resolution)
        return render_previews(self.model, expanded, prompts, seeds, settings, out_dir, self.base_path.stem)


def setup(cfg: TextualInversionConfig, accelerator: Accelerator, console: Console | None = None) -> TextualInversionJob:
    """Build the job for ``cfg`` (loads the model and data; raises one-line errors for bad input)."""
    return TextualInversionJob(cfg, accelerator, console)
