"""An exponential moving average (EMA) of trained weights, checkpointed so a resumed run continues the same average.

Averaging the weights of the last steps smooths out the noise of single steps (Polyak averaging); SD fine-tunes
export the average. The update is diffusers' ``EMAModel``: after optimizer step t the average moves toward the
weights with decay ``min(ema_decay, (1 + t') / (10 + t'))``, t' = t - 1, so the first update copies the weights and
early averages forget the starting model quickly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.training_utils import EMAModel


class WeightAverage:
    """The EMA of named parameters; :meth:`update` once per optimizer step, :meth:`applied` to use it."""

    def __init__(self, named: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.names = list(named)
        self.params = list(named.values())
        self.ema = EMAModel(self.params, decay=decay, foreach=True)

    @property
    def step(self) -> int:
        """Optimizer steps averaged in so far."""
        return self.ema.optimization_step

    def update(self, step: int) -> None:
        """Average in the weights after optimizer step ``step`` (a step already averaged in is skipped, so the
        loop's ``after_step`` call before the first step of a resumed run changes nothing)."""
        if step > self.ema.optimization_step:
            self.ema.step(self.params)

    def state_dict(self, prefix: str = "ema.") -> dict[str, torch.Tensor]:
        pairs = zip(self.names, self.ema.shadow_params, strict=True)
        state = {prefix + name: shadow.detach().to("cpu", copy=True) for name, shadow in pairs}
        return state | {prefix + "step": torch.tensor([self.ema.optimization_step])}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str = "ema.") -> None:
        with torch.no_grad():
            for name, shadow in zip(self.names, self.ema.shadow_params, strict=True):
                shadow.copy_(state[prefix + name])
        self.ema.optimization_step = int(state[prefix + "step"][0])

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the live modules inside the block (previews, export); the trained ones after."""
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)
