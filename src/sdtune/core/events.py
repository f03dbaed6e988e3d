"""Typed events the training loop emits; console progress, metrics files, TensorBoard and the UI subscribe.

Listeners are plain callables (k-diffusion's callback idea): ``bus.subscribe(fn)``; ``fn(event)`` is called for
every event in order. A listener that raises is reported once and dropped, so a broken display never stops a run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RunStarted:
    run_dir: str
    method: str
    start_step: int
    max_steps: int


@dataclass(frozen=True)
class StepEnd:
    step: int
    max_steps: int
    epoch: int
    loss: float
    lr: float
    images_per_second: float
    grad_norm: float | None = None


@dataclass(frozen=True)
class ValidationLoss:
    """The validation loss after ``step`` (fixed noise and timesteps: comparable across steps)."""

    step: int
    loss: float


@dataclass(frozen=True)
class Evaluated:
    """An evaluation after ``step`` (``eval:``): its figures (points), the best step so far, the time it took."""

    step: int
    figures: dict
    best_step: int | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class SampleSaved:
    step: int
    paths: tuple[str, ...]
    grid: str | None = None


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: str


@dataclass(frozen=True)
class RunFinished:
    step: int
    outputs: tuple[str, ...]
    reason: str = "max steps reached"
    train_seconds: float | None = None  # wall time of this process's run without its previews
    preview_seconds: float = 0.0  # wall time spent rendering previews
    eval_seconds: float = 0.0  # wall time spent on evaluations (eval:)


@dataclass(frozen=True)
class RunFailed:
    step: int
    reason: str
    last_checkpoint: str | None = None


@dataclass(frozen=True)
class RunWarning:
    """Something the user should know about the run's outputs (e.g. a tool that would drop LoRA keys)."""

    step: int
    message: str


Event = RunStarted | StepEnd | ValidationLoss | SampleSaved | CheckpointSaved | RunFinished | RunFailed | RunWarning
Listener = Callable[[Event], None]


@dataclass
class EventBus:
    listeners: list[Listener] = field(default_factory=list)

    def subscribe(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def emit(self, event: Event) -> None:
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception as exc:  # noqa: BLE001 - a display must never stop training
                print(
                    f"warning: event listener {listener!r} failed ({exc}); it is dropped and training goes on "
                    "(its display or log stops here; the run folder's metrics.jsonl and events.log stay complete)",
                    file=sys.stderr,
                )
                self.listeners.remove(listener)
