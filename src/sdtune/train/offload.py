"""The frozen VAE and text encoders leave the accelerator once what they compute is cached.

A LoRA, hypernetwork, DreamBooth or fine-tune run whose latents and prompt encodings are all cached needs the VAE
and the frozen text encoders again only to render previews (and to write a whole-model export). On a GPU they then
wait in host memory and come back only while previews or exports run: an SDXL run keeps its two text encoders
(1.6 GB in bf16) and its VAE off the card for every training step. On a CPU there is nowhere else to put them, so
they stay where they are; the same bookkeeping still runs there, and a parked module that is called outside
:meth:`Parking.in_use` raises, so a code path that would break on a GPU fails in the CPU tests too.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping

import torch

from sdtune.core.errors import TrainingError


class Parking:
    """Modules kept off ``device`` (in host memory) between uses; ``in_use()`` brings them back for a block."""

    def __init__(self, modules: Mapping[str, torch.nn.Module], device: torch.device) -> None:
        self.modules, self.device = dict(modules), torch.device(device)
        self.home = torch.device("cpu")
        self._depth = 0
        self._hooks = [m.register_forward_pre_hook(self._guard(name)) for name, m in self.modules.items()]
        self._move(self.home)

    @property
    def moves(self) -> bool:
        """Whether parking moves anything (a GPU run); on a CPU the modules stay put and only the guard runs."""
        return self.device.type != self.home.type

    def _guard(self, name: str):
        def check(module, args):
            if self._depth == 0:
                raise TrainingError(
                    f"internal error: the parked {name} was called outside Parking.in_use() (it is not on the "
                    "training device between previews); please report this"
                )

        return check

    def _move(self, where: torch.device) -> None:
        if not self.moves:
            return
        for module in self.modules.values():
            module.to(where)
        if where.type == "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """The parked modules on the training device for the block (nested blocks move them once)."""
        if self._depth == 0:
            self._move(self.device)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._move(self.home)

    def release(self) -> None:
        """Back on the device for good, guards removed (the end of the run)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._depth == 0:
            self._move(self.device)
        self._depth = 0


def parkable(job) -> dict[str, torch.nn.Module]:
    """The frozen modules ``job``'s training steps never call: the text encoders when every prompt's encoding comes
    from the job's text cache, the VAE when every image set's latents are cached (``latent_sampling`` other than
    ``random``). Trained modules are never parked."""
    model = getattr(job, "model", None)
    if model is None:
        return {}

    def frozen(module: torch.nn.Module) -> bool:  # what trains requires grad when the loop starts
        return not any(p.requires_grad for p in module.parameters())

    out: dict[str, torch.nn.Module] = {}
    if getattr(job, "text_cache", None) is not None:
        for name, encoder in zip(("text_encoder", "text_encoder_2"), model.text_encoders, strict=False):
            if frozen(encoder):
                out[name] = encoder
    sets = [getattr(job, "data", None), getattr(job, "validation", None)]
    prior = getattr(job, "prior", None)
    sets.append(getattr(prior, "images", None))
    sets.append(getattr(getattr(job, "preservation", None), "images", None))
    if all(s is None or not s.encodes_per_step for s in sets) and frozen(model.vae):
        out["vae"] = model.vae
    return out


def park_frozen(job, device: torch.device) -> Parking:
    """Fill ``job``'s text cache with every prompt its steps will ask for (training and validation captions,
    the class prompt), then park what :func:`parkable` finds. A prompt missed here still works: the cache brings
    the encoders back for it."""
    cache = getattr(job, "text_cache", None)
    if cache is not None:
        cache.fill(_every_prompt(job))
    parking = Parking(parkable(job), device)
    if cache is not None:
        cache.encoders_ready = parking.in_use
    return parking


def _every_prompt(job) -> list[str]:
    """The prompts of a job whose captions are fixed (one template line, no per-use options): each example's
    prompt does not depend on the random generator, so one pass over the captions lists them all."""
    rng = random.Random(0)
    prompts = []
    for data in (getattr(job, "data", None), getattr(job, "validation", None)):
        if data is not None:
            prompts += [job.prompt(i, rng, data.captions) for i in range(len(data.captions))]
    if (prior := getattr(job, "prior", None)) is not None:
        prompts.append(prior.prompt)
    if (preservation := getattr(job, "preservation", None)) is not None:  # regularisation and trigger-free prompts
        prompts += preservation.prompts(prompts)
    return prompts
