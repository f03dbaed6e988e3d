"""DreamBooth prior preservation: class images made once by the base model, paired with every instance sample.

Ruiz et al. 2023, "DreamBooth" (arXiv 2208.12242), section 3.3: a few images of one subject teach the model that
the whole class looks like the subject ("language drift"); training every step on images the base model made from
the class prompt too keeps the class as it was. As in diffusers' ``examples/dreambooth/train_dreambooth.py``:

- class images: when ``class_data_dir`` holds fewer than ``num_class_images`` images, the base model renders the
  missing ones from the class prompt (``class-<i>.png`` with seed i, and a ``.txt`` sidecar holding the prompt);
  existing images are counted and reused, never rendered again. The first ``num_class_images`` (by name) train,
  each with the class prompt.
- batch: every instance sample gets one class sample; ``loss = instance loss + prior_loss_weight x class loss``,
  computed in one denoising pass with per-sample weights (:func:`paired_weights`).
- randomness: the class sample of instance sample k draws everything (which class image, latent, noise,
  timestep) from its own generator, derived from k's seed without drawing from k's generator. The instance
  half therefore sees exactly what it would see without prior preservation, and a resumed run replays both.

This is the DreamBooth data option of every method that offers it (``dreambooth``, ``lora`` with ``dreambooth:``).
Rendering needs the model and :mod:`sdtune.inference`, which ``train/`` may not import (siblings in one layer):
methods pass a ``render(prompts, seeds) -> images`` function, as the CLI passes token counting to the data check.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from sdtune.config.blocks import DataConfig
from sdtune.core.atomic import atomic_path, write_text
from sdtune.core.errors import DataError
from sdtune.data.dataset import ImageCaptionSet
from sdtune.data.images import Skipped, list_candidates
from sdtune.data.sources import Entry

Render = Callable[[list[str], list[int]], list[Image.Image]]
"""Images of ``prompts[i]`` from ``seeds[i]`` with the base model (the method binds the model and settings)."""

_CLASS_STREAM = 0x7072696F72  # salt that separates a sample's class generator from its instance generator


def class_folder(class_data_dir: str | None, output_dir: str, name: str) -> Path:
    """The configured class-image folder, or the run's own ``<output_dir>/<name>/class_images``."""
    return Path(class_data_dir).expanduser() if class_data_dir else Path(output_dir) / name / "class_images"


def class_image_path(folder: Path, index: int) -> Path:
    """Where generated class image ``index`` lives; it is rendered with seed ``index``."""
    return folder / f"class-{index:05d}.png"


def fill_class_images(
    folder: Path, prompt: str, count: int, render: Render, *, chunk: int = 4, log: Callable[[str], Any] = print
) -> int:
    """Render class images of ``prompt`` until ``folder`` holds ``count`` images; return how many were rendered.

    Images already there (generated earlier or the user's own) count and are kept. Missing images take the first
    free names ``class-<i>.png`` and seed i, so the same model and prompt always give the same files. Each image
    is written atomically (its caption sidecar first) as soon as its chunk is rendered: an interrupted run keeps
    what it made.
    """
    folder.mkdir(parents=True, exist_ok=True)
    existing, _ = list_candidates(folder)
    for image in existing:  # images generated for another class prompt would train the wrong class
        sidecar = image.with_suffix(".txt")
        if image.name.startswith("class-") and sidecar.is_file():
            made_for = sidecar.read_text(encoding="utf-8").strip()
            if made_for != prompt.strip():
                raise DataError(
                    f"class_data_dir: {folder} holds class images of {made_for!r} (e.g. {image.name}), not of "
                    f"{prompt!r}; choose another class_data_dir or empty this one"
                )
    missing = count - len(existing)
    if missing <= 0:
        return 0
    free = (i for i in itertools.count() if not class_image_path(folder, i).exists())
    indices = list(itertools.islice(free, missing))
    log(f"generating {missing} class images of {prompt!r} into {folder} (reused by later runs)")
    render_images(indices, lambda i: prompt, lambda i: class_image_path(folder, i), render, chunk)
    return missing


def render_images(
    indices: Sequence[int],
    prompt_of: Callable[[int], str],
    path_of: Callable[[int], Path],
    render: Render,
    chunk: int = 4,
) -> None:
    """Render image i (seed i) from ``prompt_of(i)`` to ``path_of(i)`` for each of ``indices``, ``chunk`` at a
    time; each is written atomically, its caption sidecar (the prompt) first, as soon as its chunk is rendered."""
    for start in range(0, len(indices), chunk):
        part = list(indices[start : start + chunk])
        asked = [prompt_of(i) for i in part]
        for index, prompt, image in zip(part, asked, render(asked, part), strict=True):
            path = path_of(index)
            write_text(path.with_suffix(".txt"), prompt + "\n")
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")


def load_class_images(
    folder: Path,
    prompt: str,
    count: int,
    data: DataConfig,
    vae: Any,
    resolution: int,
    seed: int,
    report: Callable[[Skipped], None] = lambda item: None,
) -> ImageCaptionSet:
    """The first ``count`` images of ``folder`` (by name), each captioned ``prompt``, as a latent-cached set.

    The run's ``data.*`` image options (latent sampling, flip, caching) apply to them as to the instance images.
    """
    images, hidden = list_candidates(folder)
    entries = [Entry(path, prompt, is_reg=True, source=folder.name) for path in images[:count]]
    square = data.model_copy(update={"path": str(folder), "buckets": False})  # rendered square: one size
    return ImageCaptionSet.from_entries(entries, square, vae, resolution, seed, report, hidden)


def check_instance_count(instances: ImageCaptionSet, batch_size: int, where: str) -> None:
    """A batch must hold distinct instance images: fewer images than ``data.batch_size`` is a config error."""
    count = len(set(instances.paths))
    if count < batch_size:
        raise DataError(
            f"data.batch_size: {batch_size} is more than the {count} instance images in {where}; "
            f"set data.batch_size: {count} or add images"
        )


def class_generator(generator: torch.Generator) -> torch.Generator:
    """The generator of the class sample paired with the instance sample of ``generator``.

    Derived from the instance generator's seed (:func:`sdtune.train.loop.sample_generator` seeds each one), not
    drawn from it, so the instance sample's own draws are unchanged.
    """
    state = np.random.SeedSequence([generator.initial_seed(), _CLASS_STREAM]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def paired_weights(n_instance: int, n_class: int, prior_loss_weight: float) -> torch.Tensor:
    """Per-sample loss weights for a batch of ``n_instance`` instance then ``n_class`` class samples.

    The weighted batch mean equals diffusers' ``mse(instance) + prior_loss_weight * mse(class)``: the mean over
    all ``n`` samples of ``w_i * l_i`` with ``w = n / n_instance`` (instance) and ``prior_loss_weight * n / n_class``.
    """
    total = n_instance + n_class
    return torch.tensor([total / n_instance] * n_instance + [prior_loss_weight * total / n_class] * n_class)


class PairedBatch(NamedTuple):
    """Instance samples followed by their class samples, with per-sample loss weights (and per-pixel ones)."""

    latents: torch.Tensor
    prompts: list[str]
    generators: list[torch.Generator]
    weights: torch.Tensor
    mask: torch.Tensor | None


@dataclass
class PriorPreservation:
    """The class half of a DreamBooth batch: class images, their prompt and the weight of their loss."""

    prompt: str
    weight: float
    images: ImageCaptionSet
    folder: Path
    generated: int = 0  # class images rendered by :meth:`prepare` (0 when all existed)

    @classmethod
    def prepare(
        cls,
        *,
        prompt: str,
        weight: float,
        count: int,
        folder: Path,
        instances: ImageCaptionSet,
        data: DataConfig,
        vae: Any,
        resolution: int,
        seed: int,
        render: Render,
        accelerator: Accelerator | None = None,
        log: Callable[[str], Any] = print,
        report: Callable[[Skipped], None] = lambda item: None,
    ) -> PriorPreservation:
        """Check the instance set, render the missing class images (main process only; the others wait) and load
        the first ``count`` of them. Call it before anything trains: class images show the *base* model."""
        check_instance_count(instances, data.batch_size, data.path)
        if odd := [f"{w}x{h}" for (w, h) in instances.bucket_histogram() if (w, h) != (resolution, resolution)]:
            raise DataError(
                f"data.buckets: prior preservation pairs every instance image with a square {resolution}px class "
                f"image, but some instance images train at {', '.join(odd)}; set data.buckets: false or crop the "
                "instance images square"
            )
        generated = 0
        if accelerator is None or accelerator.is_main_process:
            generated = fill_class_images(folder, prompt, count, render, log=log)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        images = load_class_images(folder, prompt, count, data, vae, resolution, seed, report)
        return cls(prompt, weight, images, folder, generated)

    def extend(
        self,
        latents: torch.Tensor,
        prompts: Sequence[str],
        generators: Sequence[torch.Generator],
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> PairedBatch:
        """Append one class sample per instance sample; ``mask`` (per-pixel loss weights of the instance samples, or
        ``None``) is extended with the class images' own (all ones where they have none). ``weights`` (per-sample
        weights of the instance samples, e.g. regularisation images in the data) scale the instance half."""
        paired = [class_generator(g) for g in generators]
        rows = [int(torch.randint(len(self.images), (1,), generator=g)) for g in paired]
        class_latents, class_mask = self.images.latents_and_weights(rows, paired)
        n = len(generators)
        if mask is not None or class_mask is not None:
            ones = torch.ones(n, 1, *latents.shape[2:])
            mask = torch.cat(
                [(mask if mask is not None else ones).cpu(), (ones if class_mask is None else class_mask.cpu())]
            )
        return PairedBatch(
            torch.cat([latents, class_latents.to(latents)]),
            [*prompts, *[self.prompt] * n],
            [*generators, *paired],
            paired_weights(n, n, self.weight) * torch.cat([weights.cpu(), torch.ones(n)])
            if weights is not None
            else paired_weights(n, n, self.weight),
            mask,
        )
