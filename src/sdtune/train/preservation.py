"""Prior-prediction regularisation: keep what the base model drew by training against its own prediction.

Fine-tuning on a few images of a new concept also changes what every other prompt draws (the base model
"forgets"). Class images with the plain denoising loss (DreamBooth's prior preservation, :mod:`sdtune.train.prior`)
hold the class's *images*; this holds the base model's *prediction*, which carries everything it knows about an
image at each noise level (OneTrainer's prior-prediction concepts, SimpleTuner's regularisation data, ai-toolkit's
Differential Output Preservation are the same idea). Two kinds of regularisation sample, both optional:

- **regularisation images** (``preservation.images`` / ``prompts``): images with their captions, e.g. rendered once
  by the base model from prompts of what it should keep drawing (image i from ``prompts[i % n]`` with seed i,
  cached as ``reg-<i>.png`` + ``.txt``). ``ceil(ratio x batch)`` of them join every batch; on their noisy latents
  the trained model must predict what the frozen base predicts for the same input and caption (or, for the
  fraction ``unconditional`` of them, the empty prompt: the unconditional prediction that guidance subtracts).
- **trigger-free samples** (``preservation.trigger``, DOP): every training sample whose prompt holds the trigger
  word is repeated with the word removed, at the same latents, noise and timestep; without its trigger the
  concept must not show, so the prediction must equal the base model's.

``loss = training loss + weight x mean(regularisation losses) + trigger_weight x mean(trigger-free losses)``, each
term the run's configured loss (Min-SNR and friends included) with the base prediction as the target. The frozen
base is the model itself with its adapters switched off (concept models: no extra memory) or a frozen copy of the
trained components in the compute precision (DreamBooth, fine-tune: one more UNet in memory; ``sdtune estimate``
counts it). Cost per step: each extra sample trains like a training sample, plus one no-grad forward pass of the
base model: with ``ratio: 1`` and no trigger about 2.3x a plain step.

Randomness: regularisation sample j of a batch draws from a generator derived from instance sample ``j % B``'s seed
(never drawn from it), so the training samples see exactly what they would see without preservation, and a
resumed run replays both; a trigger-free sample uses a copy of its training sample's generator (the same draws).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from sdtune.config.blocks import DataConfig
from sdtune.config.methods import PreservationConfig
from sdtune.core.errors import DataError
from sdtune.data.dataset import ImageCaptionSet
from sdtune.data.images import Skipped, list_candidates
from sdtune.data.sources import Entry
from sdtune.models.components import SDComponents, vae_scale_factor
from sdtune.models.text_encoding import Conditioning, encode_prompts
from sdtune.train.prior import Render, render_images

_REG_STREAM = 0x70726564  # salt that separates a regularisation sample's generator from its training sample's


def preservation_folder(cfg: PreservationConfig, output_dir: str, name: str) -> Path:
    """The configured folder, or the run's own ``<output_dir>/<name>/preservation_images``."""
    return Path(cfg.images).expanduser() if cfg.images else Path(output_dir) / name / "preservation_images"


def reg_image_path(folder: Path, index: int) -> Path:
    return folder / f"reg-{index:05d}.png"


def fill_reg_images(
    folder: Path, prompts: Sequence[str], count: int, render: Render, *, chunk: int = 4, log: Callable = print
) -> int:
    """Render images of ``prompts`` (image i from ``prompts[i % n]``, seed i) until ``folder`` holds ``count``;
    return how many were rendered. Images already there count and are kept; a rendered image whose prompt is not
    among ``prompts`` any more is a one-line :class:`DataError` (it would regularise towards the wrong thing)."""
    prompts = [p.strip() for p in prompts if p.strip()]
    folder.mkdir(parents=True, exist_ok=True)
    existing, _ = list_candidates(folder)
    for image in existing:
        sidecar = image.with_suffix(".txt")
        if image.name.startswith("reg-") and sidecar.is_file():
            made_for = sidecar.read_text(encoding="utf-8").strip()
            if made_for not in prompts:
                raise DataError(
                    f"preservation.images: {folder} holds {image.name}, rendered from {made_for!r}, which is not "
                    "among preservation.prompts; choose another folder or empty this one"
                )
    missing = count - len(existing)
    if missing <= 0:
        return 0
    free = (i for i in itertools.count() if not reg_image_path(folder, i).exists())
    indices = list(itertools.islice(free, missing))
    log(f"rendering {missing} regularisation images of {len(prompts)} prompts into {folder} (reused by later runs)")
    render_images(indices, lambda i: prompts[i % len(prompts)], lambda i: reg_image_path(folder, i), render, chunk)
    return missing


def load_reg_images(
    folder: Path, count: int, data: DataConfig, vae: Any, resolution: int, seed: int, report: Callable
) -> ImageCaptionSet:
    """The first ``count`` images of ``folder`` (by name), captioned as a data folder is (sidecars, else the file
    name), square at ``resolution``; a folder without a usable image is a one-line :class:`DataError`."""
    if not folder.is_dir():
        raise DataError(
            f"preservation.images: {folder} is not a folder; give a folder of regularisation images, or "
            "preservation.prompts so the base model renders them"
        )
    images, hidden = list_candidates(folder)
    entries = [Entry(path, None, is_reg=True, source=folder.name) for path in images[:count]]
    square = data.model_copy(update={"path": str(folder), "buckets": False, "caption_extension": ".txt"})
    try:
        return ImageCaptionSet.from_entries(entries, square, vae, resolution, seed, report, hidden)
    except DataError as exc:
        raise DataError(f"preservation.images: {exc}") from None


_SPACES = re.compile(r"\s+")


def remove_trigger(prompt: str, trigger: str) -> str:
    """``prompt`` without the word ``trigger`` (also a pivotal token's ``<x>_1``-style extra words); the commas and
    spaces it leaves are tidied: ``a sks dog, sks`` -> ``a dog``."""
    pattern = rf"(?<!\w){re.escape(trigger.strip())}(?:_\d+)?(?!\w)"
    text = re.sub(pattern, " ", prompt)
    parts = [_SPACES.sub(" ", p).strip() for p in text.split(",")]
    return ", ".join(p for p in parts if p)


def has_trigger(prompt: str, trigger: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(trigger.strip())}(?!\w)", prompt) is not None


def derived_generator(generator: torch.Generator, slot: int) -> torch.Generator:
    """Regularisation slot ``slot``'s generator for the training sample of ``generator``: derived from its seed,
    not drawn from it."""
    seq = np.random.SeedSequence([generator.initial_seed(), _REG_STREAM, slot])
    state = seq.generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def copy_generator(generator: torch.Generator) -> torch.Generator:
    """A generator that makes exactly the draws ``generator`` would make next."""
    out = torch.Generator()
    out.set_state(generator.get_state())
    return out


# -- the frozen base model --------------------------------------------------------------------------------------


class BasePrediction:
    """What the frozen base model predicts, for the regularisation targets.

    ``predict(noisy, timesteps, cond)`` runs ``unet`` inside ``base()`` (a context in which it computes the base
    model: adapters switched off, or nothing for a frozen copy) without gradients; ``encode(prompts)`` is the base
    model's conditioning (``frozen_text(prompts)`` when the text encoders do not train, else ``text_model``'s
    encoders inside ``base()``)."""

    def __init__(
        self,
        unet: torch.nn.Module,
        text_model: SDComponents,
        base: Callable[[], contextlib.AbstractContextManager],
        frozen_text: Callable[[list[str]], Conditioning] | None,
    ) -> None:
        self.unet, self.text_model, self.base, self.frozen_text = unet, text_model, base, frozen_text
        self.factor = vae_scale_factor(text_model)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        if self.frozen_text is not None:
            return self.frozen_text(prompts)
        with self.base():
            return encode_prompts(self.text_model, prompts)

    def target(self, cond: Conditioning) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The ``target_fn`` of :func:`sdtune.train.diffusion.denoising_loss` for samples conditioned on ``cond``."""

        @torch.no_grad()
        def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            dtype = self.unet.dtype
            extra = cond.unet_kwargs(noisy.shape[-2] * self.factor, noisy.shape[-1] * self.factor)
            with self.base():
                return self.unet(noisy.to(dtype), timesteps, cond.context.to(dtype), **extra).sample

        return predict


@contextlib.contextmanager
def adapters_off(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Inside the block every peft adapter layer in ``modules`` computes its base layer alone; afterwards the
    adapters are back and every parameter's ``requires_grad`` is as before (peft's toggle resets it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]
    flags = [(p, p.requires_grad) for module in modules for p in module.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


def frozen_copies(
    model: SDComponents, names: Sequence[str], dtype: torch.dtype
) -> tuple[torch.nn.Module, SDComponents]:
    """Frozen copies (eval mode, in ``dtype``) of the components ``names`` that will train (``unet``,
    ``text_encoder``, ``text_encoder_2``), taken before training changes them: the base UNet, and a view of the
    model whose text encoders are the copies where they train."""

    def frozen(module: torch.nn.Module) -> torch.nn.Module:
        # deepcopy with every tensor pre-cast in the memo: only the copies in ``dtype`` are ever allocated (a plain
        # deepcopy would hold a second fp32 model for a moment); copy=True, so a copy never shares storage
        memo: dict[int, Any] = {}
        for p in module.parameters():
            memo[id(p)] = torch.nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False)
        for b in module.buffers():
            memo[id(b)] = b.detach().to(dtype if b.is_floating_point() else b.dtype, copy=True)
        return copy.deepcopy(module, memo).requires_grad_(False).eval()

    unet = frozen(model.unet) if "unet" in names else model.unet
    encoders = [
        frozen(te) if f"text_encoder{'' if i == 0 else '_2'}" in names else te
        for i, te in enumerate(model.text_encoders)
    ]
    return unet, dataclasses.replace(model, unet=unet, text_encoders=encoders)


# -- the regularisation term ------------------------------------------------------------------------------------


@dataclass
class Preservation:
    """The regularisation samples of a run and how they join a batch (see the module docstring)."""

    cfg: PreservationConfig
    images: ImageCaptionSet | None
    base: BasePrediction
    folder: Path | None = None
    rendered: int = 0

    @classmethod
    def prepare(
        cls,
        cfg: PreservationConfig,
        *,
        base: BasePrediction,
        folder: Path,
        training_prompts: Sequence[str],
        data: DataConfig,
        vae: Any,
        resolution: int,
        seed: int,
        render: Render,
        accelerator: Accelerator | None = None,
        log: Callable[[str], Any] = print,
        report: Callable[[Skipped], None] = lambda item: None,
    ) -> Preservation:
        """Check the trigger against the training prompts, render missing regularisation images (main process
        only; the others wait) and load them. Call it before anything trains: the images show the *base* model."""
        if cfg.trigger is not None and not any(has_trigger(p, cfg.trigger) for p in training_prompts):
            example = training_prompts[0] if training_prompts else ""
            raise DataError(
                f"preservation.trigger: {cfg.trigger!r} occurs in none of the {len(training_prompts)} training "
                f"prompts (e.g. {example!r}); set it to the word that names the concept in the captions"
            )
        images, rendered = None, 0
        if cfg.has_images:
            if cfg.prompts and (accelerator is None or accelerator.is_main_process):
                rendered = fill_reg_images(folder, cfg.prompts, cfg.num_images, render, log=log)
            if accelerator is not None:
                accelerator.wait_for_everyone()
            images = load_reg_images(folder, cfg.num_images, data, vae, resolution, seed, report)
        return cls(cfg, images, base, folder if cfg.has_images else None, rendered)

    def prompts(self, training_prompts: Sequence[str]) -> list[str]:
        """Every prompt the regularisation samples use (to fill a text cache before step 1)."""
        out = list(self.images.captions) if self.images is not None else []
        out += [""] if self.images is not None and self.cfg.unconditional > 0 else []
        if self.cfg.trigger is not None:
            out += [remove_trigger(p, self.cfg.trigger) for p in training_prompts if has_trigger(p, self.cfg.trigger)]
        return out

    def snapshot(self, generators: Sequence[torch.Generator]) -> list[torch.Generator]:
        """Copies of the training samples' generators as they stand before the loss draws noise and timesteps
        (the trigger-free samples replay those draws); empty without a trigger."""
        return [copy_generator(g) for g in generators] if self.cfg.trigger is not None else []

    def loss(
        self,
        loss_fn: Callable[..., torch.Tensor],
        encode: Callable[[list[str]], Conditioning],
        latents: torch.Tensor,
        prompts: Sequence[str],
        generators: Sequence[torch.Generator],
        *,
        instances: int,
        snapshot: Sequence[torch.Generator],
        weights: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The run's loss on a training batch with the regularisation samples joined to it.

        ``latents``, ``prompts``, ``generators``, ``weights`` and ``mask`` are the batch as the method would train it
        (its first ``instances`` samples the training samples, e.g. DreamBooth class samples after them);
        ``snapshot`` is :meth:`snapshot` taken before anything drew from their generators' noise. ``loss_fn(latents,
        cond, generators, **kw)`` is the run's denoising loss, ``encode`` the trained model's conditioning. One pass
        holds every sample of the same latent size: the batch's mean of weighted losses equals ``loss(batch) +
        weight x mean(regularisation) + trigger_weight x mean(trigger-free)``; regularisation images of another size
        (an aspect-ratio bucket) take a pass of their own."""
        cfg = self.cfg
        joined: list[tuple[torch.Tensor, list[str], list[torch.Generator], float]] = []
        separate: list[tuple[torch.Tensor, list[str], list[torch.Generator], float]] = []
        if self.images is not None and cfg.weight > 0:
            own = generators[:instances]
            count = math.ceil(cfg.ratio * instances)
            reg_gens = [derived_generator(own[j % instances], j // instances) for j in range(count)]
            rows = [int(torch.randint(len(self.images), (1,), generator=g)) for g in reg_gens]
            reg_prompts = [self.images.captions[r] for r in rows]
            if cfg.unconditional > 0:  # the empty prompt: the unconditional prediction guidance subtracts
                empty = [float(torch.rand((), generator=g)) < cfg.unconditional for g in reg_gens]
                reg_prompts = ["" if e else p for e, p in zip(empty, reg_prompts, strict=True)]
            reg = (self.images.latents(rows, reg_gens).to(latents), reg_prompts)
            same = reg[0].shape[1:] == latents.shape[1:]
            (joined if same else separate).append((*reg, reg_gens, cfg.weight))
        if cfg.trigger is not None and cfg.trigger_weight > 0:
            keep = [i for i in range(instances) if has_trigger(prompts[i], cfg.trigger)]
            if keep:
                free = [remove_trigger(prompts[i], cfg.trigger) for i in keep]
                joined.append((latents[keep], free, [snapshot[i] for i in keep], cfg.trigger_weight))
        n0 = len(generators)
        total = n0 + sum(len(g) for _, _, g, _ in joined)
        own_weights = weights.cpu() if weights is not None else torch.ones(n0)
        sample_weights = [own_weights * total / n0] + [torch.full((len(g),), w * total / len(g)) for *_, g, w in joined]
        if mask is not None and joined:
            ones = torch.ones(total - n0, *mask.shape[1:])
            mask = torch.cat([mask.cpu(), ones])
        base_prompts = [p for _, ps, _, _ in joined for p in ps]
        loss = loss_fn(
            torch.cat([latents, *(lat for lat, _, _, _ in joined)]),
            encode([*prompts, *base_prompts]),
            [*generators, *(g for _, _, gs, _ in joined for g in gs)],
            weights=torch.cat(sample_weights) if joined or weights is not None else None,
            mask=mask,
            target_fn=self.base.target(self.base.encode(base_prompts)) if joined else None,
            target_rows=torch.arange(n0, total) if joined else None,
        )
        for lat, ps, gs, w in separate:
            target = self.base.target(self.base.encode(ps))
            loss = loss + w * loss_fn(lat, encode(ps), gs, target_fn=target)
        return loss
