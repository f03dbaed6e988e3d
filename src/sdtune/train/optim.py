"""Optimizers and learning-rate schedules, built from the config.

The learning rate is a pure function of the step (diffusers' schedule lambdas, or AUTOMATIC1111's ``rate:step``
string), so resuming at step N needs no scheduler state: the same step gives the same rate.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
from diffusers.optimization import get_scheduler

from sdtune.config.blocks import OptimizerConfig, ScheduleConfig
from sdtune.config.rate_schedule import RateSchedule
from sdtune.core.errors import TrainingError


def _require(package: str, name: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise TrainingError(
            f"optimizer.name: {name} needs the '{package}' package; pip install {package} "
            "(or use optimizer.name: adamw)"
        )


def make_optimizer(groups: Sequence[dict], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """An optimizer over parameter ``groups``; each group's ``lr`` is its base rate (already scaled)."""
    groups = [dict(g) for g in groups]
    if cfg.name == "adamw":
        on_gpu = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(
            groups, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=True if on_gpu else None
        )
    if cfg.name == "adamw8bit":
        _require("bitsandbytes", "adamw8bit")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "prodigy":
        _require("prodigyopt", "prodigy")
        from prodigyopt import Prodigy

        return Prodigy(groups, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            groups, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=cfg.weight_decay
        )
    return torch.optim.SGD(groups, momentum=0.9, weight_decay=cfg.weight_decay)


class LearningRate:
    """Sets each group's learning rate for a step; ``finished`` when an A1111 schedule string has ended."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        opt_cfg: OptimizerConfig,
        sched_cfg: ScheduleConfig,
        max_steps: int,
        start_step: int = 0,
    ) -> None:
        self.optimizer = optimizer
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.string: RateSchedule | None = None
        self.factor = None
        if isinstance(opt_cfg.lr, str):
            self.string = RateSchedule(opt_cfg.lr, max_steps, cur_step=start_step)
        else:
            scheduler = get_scheduler(
                sched_cfg.name,
                optimizer,
                num_warmup_steps=sched_cfg.warmup_steps,
                num_training_steps=max_steps,
                num_cycles=sched_cfg.num_cycles,
                power=sched_cfg.power,
            )
            self.factor = scheduler.lr_lambdas[0]
        self.finished = False
        self.current = 0.0

    @property
    def final_step(self) -> int | None:
        """Step at which an A1111 schedule ends training (None for diffusers schedules)."""
        return self.string.final_step if self.string is not None else None

    def set(self, step: int) -> float:
        """Apply the rate for optimizer step ``step`` (0-based) and return the first group's rate."""
        if self.string is not None:
            rate = self.string.rate_at(step)
            if rate is None:
                self.finished = True
                return self.current
            rates = [rate] * len(self.base)  # an A1111 string sets every group's rate
        else:
            f = self.factor(step)
            rates = [b * f for b in self.base]
        for group, rate in zip(self.optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        self.current = rates[0]
        return self.current


class FusedBackward(torch.optim.Optimizer):
    """One optimizer per parameter, stepped by a hook the moment that parameter's gradient is complete in the
    backward pass, its gradient freed right after (PyTorch's "fuse the optimizer step into backward" recipe; kohya's
    ``--fused_backward_pass``): peak memory holds one gradient at a time instead of all of them.

    To the loop it looks like one optimizer: ``param_groups`` are the per-parameter groups (the learning rate is set
    on them as usual), ``step`` and ``zero_grad`` do nothing (the hooks did it), ``state_dict`` holds every
    parameter's state. A non-finite gradient is not stepped on; :meth:`take_grad_norm` then returns NaN, so the loop
    stops as it does for a NaN loss (the parameters stepped earlier in that pass are only changed in memory: the
    last checkpoint is intact)."""

    def __init__(self, groups: Sequence[dict], cfg: OptimizerConfig, clip_value: float | None = None) -> None:
        params = [p for g in groups for p in g["params"]]
        super().__init__(params, {})
        self._optimizers = [make_optimizer([{**g, "params": [p]}], cfg) for g in groups for p in g["params"]]
        self.param_groups = [o.param_groups[0] for o in self._optimizers]  # shared: a rate set here reaches them
        self._clip_value = clip_value
        self._squares: list[torch.Tensor] = []
        self._nonfinite = 0
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._hook(o)) for p, o in zip(params, self._optimizers, strict=True)
        ]

    def _hook(self, optimizer: torch.optim.Optimizer):
        def step(param: torch.Tensor) -> None:
            grad = param.grad
            squares = grad.detach().float().pow(2).sum()
            if not torch.isfinite(squares):
                self._nonfinite += 1
            else:
                self._squares.append(squares)
                if self._clip_value is not None:
                    grad.clamp_(-self._clip_value, self._clip_value)
                optimizer.step()
            param.grad = None

        return step

    def take_grad_norm(self) -> float:
        """The norm of this step's gradients (before clipping); NaN when one was not finite. Resets."""
        norm = (
            float("nan")
            if self._nonfinite
            else float(torch.stack(self._squares).sum().sqrt())
            if self._squares
            else 0.0
        )
        self._squares, self._nonfinite = [], 0
        return norm

    def step(self, closure=None) -> None:  # the hooks stepped each parameter during backward
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:  # the hooks freed each gradient after its step
        return None

    def state_dict(self) -> dict:
        return {"per_parameter": [o.state_dict() for o in self._optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        for optimizer, state in zip(self._optimizers, state_dict["per_parameter"], strict=True):
            optimizer.load_state_dict(state)

    def remove(self) -> None:
        """Take the hooks off the parameters (the run is over)."""
        for hook in self._hooks:
            hook.remove()
