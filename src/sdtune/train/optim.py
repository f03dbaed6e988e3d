"""Optimizers and learning-rate schedules, built from the config.

The learning rate is a pure function of the step (diffusers' schedule lambdas, or AUTOMATIC1111's ``rate:step``
string), so resuming at step N needs no scheduler state: the same step gives the same rate.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Sequence

import torch
from diffusers.optimization import get_scheduler

from sdtune.config.blocks import PYTORCH_OPTIMIZER_NAMES, OptimizerConfig, ScheduleConfig
from sdtune.config.rate_schedule import RateSchedule
from sdtune.core.errors import TrainingError


def _require(package: str, name: str, install: str | None = None) -> None:
    if importlib.util.find_spec(package) is None:
        raise TrainingError(
            f"optimizer.name: {name} needs the '{package}' package; pip install {install or package} "
            "(or use optimizer.name: adamw)"
        )


def check_optimizer(cfg: OptimizerConfig) -> None:
    """A one-line :class:`TrainingError` when the package an optimizer comes from is not installed (before the
    model loads: run start-up calls it)."""
    packages = {"adamw8bit": ("bitsandbytes", None), "prodigy": ("prodigyopt", None)}
    packages |= dict.fromkeys(PYTORCH_OPTIMIZER_NAMES, ("pytorch_optimizer", "pytorch-optimizer"))
    if cfg.name in packages:
        module, install = packages[cfg.name]
        _require(module, cfg.name, install)


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
    if cfg.name in PYTORCH_OPTIMIZER_NAMES:
        return _pytorch_optimizer(groups, cfg)
    return torch.optim.SGD(groups, momentum=0.9, weight_decay=cfg.weight_decay)


def _pytorch_optimizer(groups: list[dict], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """Lion, CAME and schedule-free AdamW from pytorch-optimizer (kozistr/pytorch_optimizer), with the config's
    betas and decoupled weight decay (each class's default ``weight_decouple``)."""
    _require("pytorch_optimizer", cfg.name, "pytorch-optimizer")
    import pytorch_optimizer as po

    betas, decay = tuple(cfg.betas), cfg.weight_decay
    if cfg.name == "lion":
        return po.Lion(groups, betas=betas, weight_decay=decay)
    if cfg.name == "came":
        return po.CAME(groups, betas=betas if len(betas) == 3 else (*betas, CAME_BETA3), weight_decay=decay)
    return po.ScheduleFreeAdamW(groups, betas=betas, weight_decay=decay, eps=cfg.eps)


# CAME's third beta (the decay of its confidence estimate) when the config gives two: the paper's and
# pytorch-optimizer's default (Luo et al. 2023, "CAME: Confidence-guided Adaptive Memory Efficient Optimization").
CAME_BETA3 = 0.9999
SCHEDULE_FREE = ("schedulefree_adamw",)


@contextlib.contextmanager
def eval_weights(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig) -> Iterator[None]:
    """Inside the block the parameters hold the weights users get. Schedule-free AdamW (Defazio et al. 2024, "The
    Road Less Scheduled") trains at y and evaluates at the average x: ``optimizer.eval()`` moves the parameters to x;
    on the way out they get back exactly the y they held (a copy: ``optimizer.train()``'s interpolation back rounds,
    and an exact resume must replay bit for bit). Every other optimizer: nothing to do."""
    if cfg.name not in SCHEDULE_FREE:
        yield
        return
    inner = optimizer.optimizers if isinstance(optimizer, FusedBackward) else [optimizer]
    params = [p for o in inner for g in o.param_groups for p in g["params"]]
    saved = [p.detach().to("cpu", copy=True) for p in params]
    for o in inner:
        o.eval()
    try:
        yield
    finally:
        for o in inner:
            o.train()
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)


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

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The per-parameter optimizers."""
        return self._optimizers

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
