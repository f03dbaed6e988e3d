"""Config blocks shared by every training method: model, data, optimizer, schedule, training, save, preview.

Defaults are chosen for the common case and commented like a recipe; per-method schemas (``methods.py``)
override the defaults that differ (e.g. textual inversion's much higher learning rate).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from sdtune.config.base import StrictModel
from sdtune.config.rate_schedule import check_rate_schedule


def _check_learning_rate(value: float | str) -> float | str:
    """A number must be > 0; a string must parse as an A1111 schedule (its error shows the syntax)."""
    if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f"must be > 0 (got {value}); e.g. 1e-4")
    return check_rate_schedule(value)


LearningRate = Annotated[float | str, AfterValidator(_check_learning_rate)]


class ModelConfig(StrictModel):
    base: str = Field("builtin", examples=["builtin"])
    """Base model: `builtin` (sdtune's shapes-world model), a diffusers folder, or a .safetensors/.ckpt file."""
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = "auto"
    """What the UNet predicts. `auto` reads it from the model; set it for SD 2.x files that do not record it."""
    vae_precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Precision of the frozen VAE (it encodes the latent cache and decodes previews). `auto`: the run's precision
    (`train.mixed_precision`), except that fp16 runs keep the VAE in fp32, since SDXL's VAE overflows in fp16
    (kohya's `--no_half_vae`)."""


class DataConfig(StrictModel):
    path: str = Field(examples=["./datasets/my-concept"])
    """Training images: a folder (captions from `.txt` sidecars, else file names), a folder of kohya `N_name`
    sub-folders (`10_teal heart`: 10 repeats), a kohya dataset config `.toml`, or a `.jsonl` manifest
    (`{"image": ..., "caption": ...}` per line). Chosen by the suffix; check it first with `sdtune data check`."""
    resolution: int | None = Field(None, ge=8, le=4096, multiple_of=8, examples=[512])
    """Training resolution in pixels (square). Empty = the base model's native resolution."""
    template: str | None = Field(None, examples=["subject_filewords"])
    """Prompt templates: a shipped set (subject, style, subject_filewords, style_filewords, none, filewords) or a
    file with one prompt per line using `[name]` (the new token) and `[filewords]` (the image's caption).
    Empty = the method's default: `subject_filewords` for textual inversion, `filewords` (the captions) for LoRA."""
    caption_extension: str = Field(".txt", examples=[".txt"])
    """Extension of caption sidecar files next to each image."""
    filename_word_regex: str = Field("", examples=[r"\w+"])
    """When captions come from file names: regex whose matches are kept (A1111's 'Filename word regex')."""
    filename_join: str = Field(" ", examples=[" "])
    """String that joins the regex matches (A1111's 'Filename join string')."""
    shuffle_tags: bool = False
    """Shuffle the comma-separated tags of each caption every time it is used."""
    keep_tags: int = Field(0, ge=0, examples=[1])
    """With shuffling or dropout: keep this many leading tags fixed (kohya's keep_tokens)."""
    tag_dropout: float = Field(0.0, ge=0.0, le=1.0, examples=[0.1])
    """Probability of dropping each tag when a caption is used."""
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0, examples=[0.05])
    """Probability of training on an empty caption instead."""
    repeats: int = Field(1, ge=1, examples=[10])
    """How many times each image is seen per epoch. Multiplies the repeats the source sets (kohya `N_name`
    folders, TOML `num_repeats`, JSONL `repeats`), so keep it 1 with those."""
    reg_weight: float = Field(1.0, ge=0.0, examples=[1.0])
    """Loss weight of regularisation images (kohya `is_reg` subsets, JSONL `"is_reg": true`) relative to the
    others: kohya's `prior_loss_weight`. 0 = they do not train."""
    buckets: bool = False
    """Aspect-ratio buckets (kohya's `enable_bucket`): train each image at the bucket of nearest aspect ratio
    within the `resolution`² area instead of its centre square. Batches are drawn from one bucket at a time."""
    bucket_step: int = Field(64, ge=8, multiple_of=8, examples=[64])
    """Bucket sides are multiples of this (kohya's `bucket_reso_steps`)."""
    min_bucket_side: int | None = Field(None, ge=8, multiple_of=8, examples=[256])
    """Smallest bucket side (kohya's `min_bucket_reso`). Empty = resolution / 2."""
    max_bucket_side: int | None = Field(None, ge=8, multiple_of=8, examples=[1024])
    """Largest bucket side (kohya's `max_bucket_reso`). Empty = 2 x resolution."""
    bucket_no_upscale: bool = False
    """Never enlarge an image: each gets its own bucket that fits inside it (kohya's `bucket_no_upscale`)."""
    flip: bool = False
    """Randomly mirror images left-right (cached as a second latent)."""
    latent_sampling: Literal["once", "deterministic", "random"] = "once"
    """VAE latents: `once` samples the posterior once and caches it, `deterministic` caches its mean,
    `random` samples anew every step (A1111's 'latent sampling method')."""
    cache_latents: bool = True
    """Encode each image with the VAE once and reuse the latents (fast). Off: encode every time an image is used
    (slower; only worth it to compare speeds)."""
    batch_size: int = Field(1, ge=1, examples=[4])
    """Images per step (per process). Effective batch = batch_size x grad_accum x processes."""
    alpha_mask: bool = False
    """Use each image's alpha channel (PNG transparency) as its loss mask: transparent pixels do not train.
    A mask file (JSONL `mask`, or `masks/<image stem>.png` beside the images) takes precedence."""
    mask_floor: float = Field(0.0, ge=0.0, le=1.0, examples=[0.1])
    """Loss weight of fully masked-out (black) areas: 0 ignores them, e.g. 0.1 keeps a little of the background."""
    validation_split: float = Field(0.0, ge=0.0, lt=1.0, examples=[0.1])
    """Share of the images held out for validation (chosen by a hash of the file name and `split_seed`, so adding
    images never moves the others). 0 = no split."""
    test_split: float = Field(0.0, ge=0.0, lt=1.0, examples=[0.05])
    """Share of the images held out as a test set: never trained on nor used for validation."""
    validation_path: str | None = Field(None, examples=["./datasets/my-concept-val"])
    """Validation images in their own folder, kohya folders, .toml or .jsonl (instead of `validation_split`)."""
    split_seed: int = Field(0, examples=[0])
    """Seed of the train/validation/test partition; keep it fixed so the partition never changes."""
    cache_dir: str | None = Field(None, examples=["./cache"])
    """Folder for latents and text-encoder outputs kept across runs, keyed by image content, settings and model;
    reused when nothing changed. Empty = cache in memory for this run only."""

    @model_validator(mode="after")
    def _consistent_splits(self) -> DataConfig:
        if self.validation_split + self.test_split >= 1.0:
            raise ValueError(
                f"validation_split: with test_split {self.test_split} it leaves no training images "
                f"(got {self.validation_split}); e.g. 0.1"
            )
        if self.validation_path and self.validation_split:
            raise ValueError(
                "validation_path: use either validation_path or validation_split, not both; "
                "set validation_split: 0 or remove validation_path"
            )
        return self


OptimizerName = Literal["adamw", "adamw8bit", "prodigy", "adafactor", "sgd", "lion", "came", "schedulefree_adamw"]
# The optimizers that come from the `pytorch-optimizer` package (sdtune.train.optim).
PYTORCH_OPTIMIZER_NAMES = ("lion", "came", "schedulefree_adamw")
# Lion's betas when the config gives none (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").
LION_BETAS = (0.9, 0.99)


class OptimizerConfig(StrictModel):
    name: OptimizerName = "adamw"
    """Optimizer. 8-bit AdamW needs bitsandbytes, Prodigy needs prodigyopt; `lion` (Chen et al. 2023), `came`
    (Luo et al. 2023, confidence-guided Adafactor) and `schedulefree_adamw` (Defazio et al. 2024) need
    pytorch-optimizer (`pip install "sdtune[optimizers]"`). Lion takes a 3-10x smaller lr than AdamW (e.g. 3e-5 for
    a LoRA). Schedule-free AdamW needs no decaying schedule (keep `schedule.name: constant`): it trains on one
    weight sequence and averages another, and previews, the validation loss and every export use the average."""
    lr: LearningRate = Field(1e-4, examples=[1e-4])
    """Learning rate: a number, or A1111's schedule string `0.005:100, 1e-3:1000, 1e-5` (rate until step)."""
    weight_decay: float = Field(0.0, ge=0.0, examples=[0.01])
    """Decoupled weight decay (AdamW, Lion, CAME, schedule-free AdamW)."""
    betas: tuple[float, ...] = Field((0.9, 0.999), examples=[[0.9, 0.999]])
    """Adam beta1, beta2 (also Lion's and schedule-free AdamW's; Lion's default is 0.9, 0.99). `came` takes a third
    beta, the decay of its confidence estimate (default 0.9999, the CAME paper's)."""
    eps: float = Field(1e-8, gt=0, examples=[1e-8])
    """Adam epsilon (also schedule-free AdamW's)."""

    @model_validator(mode="before")
    @classmethod
    def _lion_betas(cls, data):
        """Lion's own default betas when the config sets none (AdamW's 0.999 is too slow a momentum for Lion)."""
        if isinstance(data, dict) and data.get("name") == "lion" and "betas" not in data:
            return {**data, "betas": LION_BETAS}
        return data

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, ...], info: ValidationInfo) -> tuple[float, ...]:
        if len(value) not in (2, 3) or not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"two numbers in [0, 1) (three for came) (got {list(value)}); e.g. [0.9, 0.999]")
        name = info.data.get("name")
        if len(value) == 3 and name != "came":
            raise ValueError(
                f"only came takes a third beta (got {list(value)} for {name}); give two, e.g. [{value[0]}, {value[1]}]"
            )
        return value


class ScheduleConfig(StrictModel):
    name: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"] = (
        "constant"
    )
    """Learning-rate schedule (diffusers' schedulers). Ignored when `optimizer.lr` is an A1111 schedule string."""
    warmup_steps: int = Field(0, ge=0, examples=[100])
    """Steps of linear warmup from 0."""
    num_cycles: int = Field(1, ge=1, examples=[1])
    """Cosine restarts."""
    power: float = Field(1.0, gt=0, examples=[1.0])
    """Polynomial decay power."""


# Timesteps of the training noise schedule of every Stable Diffusion family (SD 1.x, 2.x and XL configs all have
# 1000); a model with another count is checked when it loads (sdtune.train.recipe).
NUM_TRAIN_TIMESTEPS = 1000


class TrainConfig(StrictModel):
    max_steps: int = Field(1000, ge=1, examples=[1000])
    """Total optimizer steps, counted across resumes (A1111's 'Max steps')."""
    grad_accum: int = Field(1, ge=1, examples=[4])
    """Gradient accumulation: micro-batches per optimizer step."""
    clip_grad: Literal["none", "norm", "value"] = "none"
    """Gradient clipping mode."""
    clip_value: float = Field(1.0, gt=0, examples=[1.0])
    """Max gradient norm (mode `norm`) or absolute value (mode `value`)."""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """Compute precision; frozen weights are stored in it, trained ones stay fp32. `auto` = bf16 where the device
    computes it (Ampere+ GPUs; CPUs with AVX512-BF16/AMX), else full precision (`no`). `fp16` needs a GPU and uses
    dynamic loss scaling (an overflowing step is skipped and logged)."""
    seed: int = Field(0, examples=[0])
    """Seed for data order, noise and timesteps: the same seed gives the same run."""
    min_snr_gamma: float | None = Field(None, gt=0, examples=[5.0])
    """Min-SNR loss weighting (Hang et al. 2023); 5 is the recommended value; empty = off."""
    noise_offset: float = Field(0.0, ge=0.0, examples=[0.05])
    """Offset noise strength (Guttenberg 2023); helps very dark or bright images; 0 = off."""
    multires_noise_iterations: int = Field(0, ge=0, le=64, examples=[6])
    """Multi-resolution (pyramid) noise (Whitaker 2023; kohya's `--multires_noise_iterations`, 6-10 recommended):
    the training noise becomes noise + sum over i < iterations of discount^i x bilinearly upsampled noise of size
    side / r^i (r uniform in [2, 4), drawn per level; stops at size 1), rescaled to unit standard deviation per
    sample. Like offset noise it helps very dark or bright images. The validation loss uses plain noise. 0 = off."""
    multires_noise_discount: float = Field(0.3, gt=0.0, le=1.0, examples=[0.3])
    """Weight ratio between successive levels of multi-resolution noise (kohya's `--multires_noise_discount`;
    0.3 by default, 0.1-0.8 in use). Only with multires_noise_iterations > 0."""
    input_perturbation: float = Field(0.0, ge=0.0, le=1.0, examples=[0.1])
    """Input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion Models";
    diffusers' `--input_perturbation`, kohya's `--ip_noise_gamma`; 0.1 recommended): the noisy latents are made from
    noise + gamma x N(0, 1) while the target stays the noise. The validation loss uses plain noise. 0 = off."""
    zero_terminal_snr: bool = False
    """Rescale the noise schedule to zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and
    Sampling Steps are Flawed"; diffusers' `rescale_betas_zero_snr`, kohya's `--zero_terminal_snr`): the last
    timestep is pure noise, so the model learns to make very dark and very bright images. Needs
    `model.prediction_type: v_prediction` (the noise is not predictable from pure noise). Previews, and the scheduler
    of exported whole models, sample with the rescaled schedule and `trailing` timestep spacing; LoRA files record
    it as `ss_zero_terminal_snr`."""
    debiased_estimation: bool = False
    """Debiased estimation loss (Yu et al. 2024, "Unmasking Bias in Diffusion Model Training"; kohya's
    `--debiased_estimation_loss`): each sample's loss is weighted by 1 / sqrt(SNR), for v-prediction 1 / (SNR + 1),
    with SNR capped at 1000 as kohya does. Multiplies with min_snr_gamma when both are set."""
    timestep_range: tuple[int, int] | None = Field(None, examples=[[200, 1000]])
    """Train only on timesteps in [min, max) (kohya's `--min_timestep` / `--max_timestep`), e.g. `[0, 500]` for
    detail, `[500, 1000]` for composition. Empty = the whole schedule [0, 1000). The validation loss keeps its
    fixed timesteps over the whole schedule."""
    timestep_shift: float = Field(1.0, gt=0.0, le=100.0, examples=[3.0])
    """Shift of the training timesteps (SD3's timestep shift, Esser et al. 2024; OneTrainer's `timestep_shift`):
    t = min + floor((max - min) x s u / (1 + (s - 1) u)) with u uniform in [0, 1) and [min, max) the
    `timestep_range` (over the whole schedule this is OneTrainer's formula). Above 1 trains more on noisy timesteps
    (3 puts half of them above t = 750), below 1 on clean ones. 1 = off: uniform integer timesteps."""
    gradient_checkpointing: bool = False
    """Trade compute for memory: every method recomputes activations in the backward pass instead of keeping them,
    in the UNet and in the text encoders the loss backpropagates through (textual inversion, pivotal tuning, a
    trained text encoder). About a third more time per step."""
    fused_backward: bool = False
    """Step each weight's optimizer as soon as its gradient is ready in the backward pass, so the gradients of the
    whole network are never held at once (kohya's `--fused_backward_pass`): a full fine-tune or DreamBooth of SD 1.5
    holds 3.4 GB less. Needs grad_accum 1, clip_grad none or value, no fp16 and one process."""
    validation_every_n_steps: int = Field(0, ge=0, examples=[100])
    """Compute the validation loss (at fixed noise and timesteps, so values are comparable) every N steps; it goes
    to metrics.jsonl and TensorBoard. Needs `data.validation_split` or `data.validation_path`. 0 = off."""
    validation_timesteps: int = Field(4, ge=1, le=100, examples=[4])
    """Timesteps per validation image, spread evenly over the noise schedule."""

    @field_validator("timestep_range")
    @classmethod
    def _ordered_range(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 0 <= value[0] < value[1] <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(
                f"needs 0 <= min < max <= {NUM_TRAIN_TIMESTEPS} (the schedule's timesteps; max is left out) "
                f"(got {list(value)}); e.g. [200, {NUM_TRAIN_TIMESTEPS}]"
            )
        return value

    @model_validator(mode="after")
    def _fused_backward_fits(self) -> TrainConfig:
        if not self.fused_backward:
            return self
        if self.grad_accum != 1:
            raise ValueError(
                f"fused_backward: steps during the backward pass, so grad_accum must be 1 (got {self.grad_accum})"
            )
        if self.clip_grad == "norm":
            raise ValueError(
                "fused_backward: the total gradient norm is known only after every step; use clip_grad: value or none"
            )
        if self.mixed_precision == "fp16":
            raise ValueError(
                "fused_backward: fp16 loss scaling needs all gradients before stepping; use mixed_precision: bf16"
            )
        return self


class SaveConfig(StrictModel):
    every_n_steps: int = Field(0, ge=0, examples=[500])
    """Write a resumable checkpoint and a snapshot of the outputs every N steps (0 = only at the end)."""
    keep_last: int = Field(3, ge=1, examples=[3])
    """Resumable checkpoints to keep; older ones are pruned."""
    dtype: Literal["fp16", "bf16", "fp32"] = "fp32"
    """Precision of exported adapter and model files (embeddings are always written in fp32: they are tiny)."""


class PreviewConfig(StrictModel):
    enabled: bool = True
    """Render preview images at all. `false` = none: not before, during or after training (no `samples/`); a
    textual inversion still renders the one image its A1111 `.png` embedding is stored in."""
    every_n_steps: int = Field(0, ge=0, examples=[100])
    """Render preview images every N steps (0 = only before and after training)."""
    prompts: list[str] = Field(default_factory=list, examples=[["a photo of [name]"]])
    """Preview prompts (`[name]` = the new token). Empty = the first training captions (see `num_prompts`)."""
    num_prompts: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    """How many training captions to preview when `prompts` is empty. `auto` = 4 on a GPU, 2 on a CPU."""
    negative_prompt: str = Field("", examples=["blurry"])
    """Negative prompt for previews."""
    seed: int = Field(0, examples=[0])
    """Seed of the preview noise; fixed so previews are comparable across steps."""
    steps: Annotated[int, Field(ge=1, le=1000)] | Literal["auto"] = "auto"
    """Sampling steps of previews (and DreamBooth class images). `auto` = 20 on a GPU, 8 on a CPU (where 20 steps
    of 4 prompts at 512 px take minutes)."""
    cfg_scale: float = Field(7.0, ge=0.0, examples=[7.0])
    """Classifier-free guidance scale."""
    sampler: Literal["ddim", "euler", "euler_a", "dpmpp_2m"] = "ddim"
    """Sampler for previews."""
    before_training: bool = True
    """Render the previews once before the first step too (for before/after comparisons)."""


# The figures an evaluation writes to eval.jsonl that a run may select its best step by (all higher = better; drift,
# lower = better, is folded into `score`). Which are present depends on the scorer (sdtune.evaluate).
SELECTABLE_FIGURES = ("score", "fidelity", "adherence", "prior", "clip_i", "clip_t", "dino")


class EvalConfig(StrictModel):
    """Evaluation while training: every `every_n_steps` (and once at the start, for the base) a fixed, seeded set of
    images is generated from the model as users get it and scored; `eval.jsonl` records the figures, the best step's
    files are what `output/` holds, and `patience` can end the run early."""

    every_n_steps: int = Field(300, ge=1, examples=[300])
    """Evaluate every N steps (and at step 0, the base model; and the last step)."""
    scorer: Literal["auto", "world", "clip"] = "auto"
    """`world`: the shapes-world scorer (the built-in model); `clip`: CLIP-I / CLIP-T (and DINOv2 with
    `dino_model`) with models from local folders; `auto`: world on the built-in model, clip when `clip_model` is set,
    otherwise no evaluation (said once before training)."""
    concept: Literal["star", "teal_heart", "night"] | None = None
    """World scorer: the built-in concept the run teaches (`night`: the black-background style); its evaluation
    prompts put it on backgrounds the dataset never shows, named as the run names it (its token or trigger)."""
    prompts: list[str] = Field(default_factory=list, examples=[["a photo of [name] on a beach"]])
    """Concept prompts (`[name]` = the run's token or trigger). Empty: the concept's prompts (world) or the preview
    prompts (clip)."""
    prior_prompts: list[str] = Field(default_factory=list, examples=[["a photo of a dog"]])
    """Prompts of what the model should keep drawing (drift is measured on them). Empty: `num_prior_prompts` base
    prompts (world), else the preservation prompts or the DreamBooth class prompt."""
    num_prior_prompts: int = Field(16, ge=1, le=512, examples=[16])
    """World scorer: how many base prompts (every shape and colour) measure the drift (none for a textual
    inversion: a new word changes no prompt without it)."""
    images_per_prompt: int = Field(1, ge=1, le=64, examples=[1])
    """Images per prompt (seeds `seed`, `seed + 1`, ...)."""
    seed: int = Field(1000, examples=[1000])
    """Seed of the first evaluation image; fixed, so every evaluation sees the same noise."""
    steps: int = Field(20, ge=1, le=1000, examples=[20])
    """Sampling steps of the evaluation images (on the built-in model 12 steps read late, averaged stars 14 points
    lower than 20 do: BENCHMARKS.md)."""
    cfg_scale: float = Field(7.0, ge=0.0, examples=[7.0])
    """Classifier-free guidance scale of the evaluation images."""
    sampler: Literal["ddim", "euler", "euler_a", "dpmpp_2m"] = "ddim"
    """Sampler of the evaluation images."""
    clip_model: str | None = Field(None, examples=["models/clip-vit-large-patch14"])
    """A local CLIP folder (transformers `CLIPModel` + tokenizer): CLIP-I (likeness to the training images) and
    CLIP-T (image-prompt agreement)."""
    dino_model: str | None = Field(None, examples=["models/dinov2-small"])
    """A local DINOv2 folder (transformers `Dinov2Model`): DINO likeness to the training images, and the drift."""
    reference_images: str | None = Field(None, examples=["datasets/my-concept"])
    """Images the concept should look like (CLIP-I, DINO). Empty: the training images (`data.path`)."""
    drift_weight: float = Field(0.5, ge=0.0, examples=[0.5])
    """`score = fidelity - drift_weight x drift`."""
    select: Literal[SELECTABLE_FIGURES] = "score"
    """The `eval.jsonl` figure whose maximum picks the best step (what `output/` holds)."""
    keep_best: bool = True
    """`output/` holds the best evaluated step's files (the last step's in `output/last/`); `false`: the last step's."""
    patience: int = Field(0, ge=0, examples=[3])
    """Stop after this many evaluations in a row without an improvement of at least `min_delta` (0 = never)."""
    min_delta: float = Field(0.0, ge=0.0, examples=[1.0])
    """The smallest rise of the `select` figure (points) that counts as an improvement for `patience`."""
