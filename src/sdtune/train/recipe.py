"""What every training recipe shares: the frozen base model, the training and validation images, how captions
become prompts (templates, per-use options, the text-encoding cache), the configured denoising loss and the
validation loss at fixed noise."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.markup import escape

from sdtune.config.blocks import DataConfig
from sdtune.config.methods import RunBase
from sdtune.core.dtypes import TORCH_DTYPES
from sdtune.core.errors import ConfigError
from sdtune.data import CaptionOptions, Templates, load_templates
from sdtune.data.dataset import ImageCaptionSet, has_validation
from sdtune.data.disk_cache import text_store
from sdtune.data.images import Skipped
from sdtune.models.components import COMPONENT_NAMES, SDComponents, native_size
from sdtune.models.loading import load_model, resolve_path
from sdtune.models.text_encoding import TextCache
from sdtune.train.diffusion import denoising_loss, fixed_validation_loss


class ConsoleReport:
    """How a recipe tells the user about its data: files left out (by name, with the reason) and plain messages."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._last_progress = 0.0
        self._sizes_seen: set[str] = set()
        self.phases: dict[str, float] = {}
        """Seconds spent in each named start-up phase (``timed``), for the run's start-up line."""

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        tic = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - tic

    def skipped(self, item: Skipped) -> None:
        self.console.print(f"[yellow]skipped[/yellow] {escape(f'{item.path}: {item.reason}')}", highlight=False)

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False)  # file names and captions printed literally

    def encoding(self, size: str, done: int, total: int) -> None:
        """Latent-cache progress: the first chunk, then at most every 5 s, and the last."""
        now, first = time.monotonic(), size not in self._sizes_seen
        self._sizes_seen.add(size)
        if first or done >= total or now - self._last_progress >= 5:
            self._last_progress = now
            self.console.print(f"caching latents {size}: {done}/{total} images", highlight=False, markup=False)


STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def storage_dtypes(cfg: RunBase, precision: str, reduced: bool = True) -> dict[str, torch.dtype]:
    """The dtype each frozen component is stored in: the compute precision of the run (``precision``:
    accelerate's ``no`` / ``bf16`` / ``fp16``), so a bf16 run holds half the bytes of an fp32 one; the VAE per
    ``model.vae_precision``. ``reduced=False`` keeps every component in fp32 (full-weight methods, whose exports
    write the frozen components back and must not round them)."""
    compute = STORAGE_DTYPES.get(precision, torch.float32) if reduced else torch.float32
    out = {name: compute for name in COMPONENT_NAMES}
    vae = cfg.model.vae_precision
    if vae == "auto":
        out["vae"] = torch.float32 if compute == torch.float16 else compute
    else:
        out["vae"] = {"fp32": torch.float32, **STORAGE_DTYPES}[vae]
    return out


def frozen_base(
    cfg: RunBase, accelerator: Accelerator, reduced: bool = True, report: ConsoleReport | None = None
) -> tuple[Path, SDComponents]:
    """``cfg.model.base`` resolved and loaded onto the accelerator's device, every module frozen in eval mode,
    in :func:`storage_dtypes` (read and converted one component at a time). With ``report`` the load is announced
    on the console and timed (phase ``loading``)."""
    base_path = resolve_path(cfg.model.base)
    dtypes = storage_dtypes(cfg, accelerator.mixed_precision, reduced)
    if report is not None:
        names = {d: n for n, d in TORCH_DTYPES.items()}
        kinds = "/".join(sorted({names.get(d, str(d)) for d in dtypes.values()}))
        report.log(f"loading {base_path.name} in {kinds} onto {accelerator.device.type}")
    with report.timed("loading") if report is not None else contextlib.nullcontext():
        model = load_model(base_path, prediction_type=cfg.model.prediction_type, dtype=dtypes)
        model = model.to(accelerator.device)
    for module in model.modules().values():
        module.requires_grad_(False).eval()
    apply_schedule_options(cfg, model)
    return base_path, model


def apply_schedule_options(cfg: RunBase, model: SDComponents) -> None:
    """The run's noise-schedule options on the model's scheduler config, the one every later user reads (the
    training scheduler, previews, the scheduler of exported whole models); a timestep range beyond the schedule is a
    one-line :class:`ConfigError`.

    ``train.zero_terminal_snr``: diffusers' ``rescale_betas_zero_snr`` (Lin et al. 2023, Algorithm 1) and, for
    sampling, ``timestep_spacing: trailing`` (the paper's section 3.3: sample from the last timestep, whose SNR is
    now 0)."""
    steps = int(model.scheduler_config.get("num_train_timesteps", 1000))
    if cfg.train.timestep_range is not None and cfg.train.timestep_range[1] > steps:
        low, high = cfg.train.timestep_range
        raise ConfigError(
            f"train.timestep_range: this model's schedule has {steps} timesteps (got [{low}, {high}]); "
            f"e.g. [{min(low, steps - 1)}, {steps}]"
        )
    if cfg.train.zero_terminal_snr:
        model.scheduler_config = dict(model.scheduler_config, rescale_betas_zero_snr=True, timestep_spacing="trailing")


def fp32_masters(params: Sequence[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Trainable parameters kept in fp32 whatever the frozen weights' precision (optimizer updates smaller than a
    bf16 step would round to nothing); the forward pass runs in the compute precision under autocast."""
    for p in params:
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return list(params)


def checkpoint_activations(modules: Mapping[str, torch.nn.Module]) -> None:
    """Gradient checkpointing in the networks a loss backpropagates through (``unet``, ``text_encoder``,
    ``text_encoder_2``; trained or frozen): their activations are recomputed in the backward pass instead of kept
    (less memory, about a third more compute). transformers checkpoints only modules in training mode, so text
    encoders are put in training mode (SD's CLIP encoders have no dropout, so their outputs do not change)."""
    for name, module in modules.items():
        if name == "unet":
            module.enable_gradient_checkpointing()
            continue
        module.train()
        if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers 4
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def training_images(
    cfg: RunBase, model: SDComponents, report: ConsoleReport
) -> tuple[int, ImageCaptionSet, ImageCaptionSet | None]:
    """The resolution (configured, else the model's native one), the training set with its latents, and the
    held-out validation set (``data.validation_split`` / ``validation_path``) or ``None``. Left-out files go to
    ``report.skipped``; with ``data.buckets`` the bucket histogram goes to ``report.log``."""
    resolution = cfg.data.resolution or native_size(model)
    with report.timed("caching latents"):
        data = ImageCaptionSet.load(
            cfg.data, model.vae, resolution, cfg.train.seed, report.skipped, progress=report.encoding
        )
    if cfg.data.buckets:
        sizes = data.bucket_histogram()
        lines = [f"  {w}x{h}  aspect {w / h:.2f}  {n} images" for (w, h), n in sizes.items()]
        report.log(f"buckets for {resolution}² ({len(sizes)} sizes):\n" + "\n".join(lines))
    validation = None
    if has_validation(cfg.data):
        with report.timed("caching latents"):
            validation = ImageCaptionSet.load(
                cfg.data, model.vae, resolution, cfg.train.seed, report.skipped, split="validation"
            )
    return resolution, data, validation


class Captioning(NamedTuple):
    """How a recipe turns captions into prompts."""

    templates: Templates
    options: CaptionOptions
    fixed: bool
    """Every use of a caption gives the same prompt (one template line, no per-use options): with frozen text
    encoders, each prompt's encoding can be computed once."""


def captioning(data: DataConfig, default_template: str = "filewords") -> Captioning:
    """The prompt templates (``data.template``, else ``default_template``) and per-use caption options of a run."""
    templates = load_templates(data.template or default_template, require_name=False)
    varied = data.shuffle_tags or data.tag_dropout or data.caption_dropout
    return Captioning(templates, CaptionOptions.from_data(data), not varied and len(templates.lines) == 1)


def text_cache(model: SDComponents, data: DataConfig) -> TextCache:
    """A cache of the frozen text encoders' output per prompt; with ``data.cache_dir`` also kept on disk, so a
    later run with the same text encoders reuses it."""
    store = text_store(data.cache_dir, model.text_encoders, model.tokenizers, model.family.arch)
    return TextCache(model, store)


def recipe_loss(job, latents: torch.Tensor, cond, generators, **extra) -> torch.Tensor:
    """``denoising_loss`` with the job's model and scheduler and the run's noise and loss options (``train.*``:
    offset and multi-resolution noise, input perturbation, timestep range and shift, Min-SNR, debiased estimation);
    ``extra`` passes per-sample ``weights``, a pixel ``mask`` or fixed ``timesteps`` (validation)."""
    t = job.cfg.train
    return denoising_loss(
        job.model,
        job.scheduler,
        latents,
        cond,
        generators,
        noise_offset=t.noise_offset,
        min_snr_gamma=t.min_snr_gamma,
        debiased_estimation=t.debiased_estimation,
        multires_noise_iterations=t.multires_noise_iterations,
        multires_noise_discount=t.multires_noise_discount,
        input_perturbation=t.input_perturbation,
        timestep_range=t.timestep_range,
        timestep_shift=t.timestep_shift,
        **extra,
    )


def held_out_loss(cfg: RunBase, scheduler, validation: ImageCaptionSet | None, loss: Callable) -> float | None:
    """``loss(data, indices, generators, timesteps)`` on the validation images at fixed noise and timesteps
    (``None`` without validation images)."""
    if validation is None:
        return None
    t = cfg.train
    steps = scheduler.config.num_train_timesteps
    batch_loss = partial(loss, validation)  # (indices, generators, timesteps) -> loss
    groups = validation.example_groups()
    return fixed_validation_loss(
        batch_loss, len(validation), t.seed, steps, t.validation_timesteps, cfg.data.batch_size, groups
    )
