"""Event listeners: console progress (a rich bar on a terminal, full text lines elsewhere) and TensorBoard.
The loop knows nothing about them."""

from __future__ import annotations

import math
import time
from collections import deque
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sdtune.core.events import (
    CheckpointSaved,
    Evaluated,
    Event,
    RunFailed,
    RunFinished,
    RunStarted,
    RunWarning,
    SampleSaved,
    StepEnd,
    ValidationLoss,
)
from sdtune.train.plots import smooth


def significant(value: float, digits: int = 3) -> str:
    """``value`` rounded to ``digits`` significant digits, never in exponent form: 2.35, 23.5, 235, 2350, 0.0234."""
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else str(value)
    places = digits - 1 - math.floor(math.log10(abs(value)))
    rounded = round(value, places)
    places = digits - 1 - math.floor(math.log10(abs(rounded)))  # 9.996 rounds up to 10.0: one place fewer
    return f"{round(value, places):.{max(places, 0)}f}"


def format_speed(per_second: float, unit: str = "it", per: str = "step") -> str:
    """A speed with 3 significant digits: ``2.35 it/s``; below one per second the time each takes: ``12.4 s/step``
    (``format_speed(0.05, "img", "img")`` is ``20.0 s/img``)."""
    if not per_second > 0 or not math.isfinite(per_second):
        return f"- {unit}/s"
    if per_second >= 1:
        return f"{significant(per_second)} {unit}/s"
    return f"{significant(1 / per_second)} s/{per}"


def format_duration(seconds: float) -> str:
    """``41s``, ``2m41s``, ``1h02m`` (whole seconds; hours drop the seconds)."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(event: StepEnd, average_loss: float, steps_per_second: float) -> str:
    """One complete progress line: ``step 120/500 loss 0.1234 (avg 0.1300) lr 1.00e-04 2.35 it/s 9.40 img/s
    epoch 3 ETA 2m41s`` (ETA from ``steps_per_second``; ``-`` while unknown)."""
    left = event.max_steps - event.step
    eta = format_duration(left / steps_per_second) if steps_per_second > 0 else "-"
    return (
        f"step {event.step}/{event.max_steps} loss {event.loss:.4f} (avg {average_loss:.4f}) lr {event.lr:.2e} "
        f"{format_speed(steps_per_second)} {format_speed(event.images_per_second, 'img', 'img')} "
        f"epoch {event.epoch} ETA {eta}"
    )


class ConsoleProgress:
    """Training progress on the console: on a terminal a bar with step, loss, smoothed loss, lr, speed and ETA;
    elsewhere (CI logs, ``| tee``, the web UI's pipe) a full :func:`progress_line` at the first and last step and
    every ``interval`` seconds between. One line per checkpoint, preview and validation loss either way."""

    def __init__(self, console: Console | None = None, interval: float = 10.0, clock=time.monotonic) -> None:
        self.console = console or Console()
        self.interval, self.clock = interval, clock
        self.progress: Progress | None = None
        self.task = None
        self.losses: list[float] = []
        self.times: deque[tuple[float, int]] = deque(maxlen=21)  # (time, step) of recent steps: speed and ETA
        self.last_printed: float | None = None
        self.pending: StepEnd | None = None  # the latest step not yet printed as a line (non-terminal mode)

    def _print(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)  # whole lines at any width

    def _steps_per_second(self) -> float:
        if len(self.times) < 2:
            return 0.0
        (t0, s0), (t1, s1) = self.times[0], self.times[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0

    def _line(self, event: StepEnd) -> None:
        self._print(progress_line(event, smooth(self.losses)[-1], self._steps_per_second()))
        self.last_printed, self.pending = self.clock(), None

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.times.append((self.clock(), event.start_step))
            if self.console.is_terminal:
                self._start_bar(event)
            else:
                self._print(f"training {event.method} from step {event.start_step} to {event.max_steps}")
        elif isinstance(event, StepEnd):
            self.losses.append(event.loss)
            self.times.append((self.clock(), event.step))
            if self.progress is not None:
                stats = (
                    f"loss {event.loss:.4f} (avg {smooth(self.losses)[-1]:.4f}) lr {event.lr:.2e} "
                    f"{format_speed(event.images_per_second, 'img', 'img')} epoch {event.epoch}"
                )
                self.progress.update(self.task, completed=event.step, stats=stats)
            elif (
                self.last_printed is None
                or event.step >= event.max_steps
                or self.clock() - self.last_printed >= self.interval
            ):
                self._line(event)
            else:
                self.pending = event
        elif isinstance(event, ValidationLoss):
            self._print(f"step {event.step}: validation loss {event.loss:.5f}")
        elif isinstance(event, Evaluated):
            figures = ", ".join(f"{k} {v:g}" for k, v in event.figures.items())
            best = f"; best step {event.best_step}" if event.best_step is not None else ""
            self._print(f"step {event.step}: evaluation {figures} ({event.seconds:.1f} s){best}")
            self.times.clear()  # speed and ETA are of training
            self.times.append((self.clock(), event.step))
        elif isinstance(event, RunWarning):
            self.console.print(f"[yellow]warning:[/yellow] {escape(event.message)}", highlight=False, soft_wrap=True)
        elif isinstance(event, (CheckpointSaved, SampleSaved)):
            what = f"checkpoint {event.path}" if isinstance(event, CheckpointSaved) else f"previews {event.grid}"
            self._print(f"step {event.step}: {what}")
            if isinstance(event, SampleSaved):  # speed and ETA are of training: restart the window after previews
                self.times.clear()
                self.times.append((self.clock(), event.step))
        elif isinstance(event, (RunFinished, RunFailed)):
            if self.progress is not None:
                self.progress.stop()
            elif self.pending is not None:
                self._line(self.pending)  # a run that ends early still shows its last step
            if isinstance(event, RunFailed):
                self.console.print(f"[red]stopped:[/red] {escape(event.reason)}", highlight=False, soft_wrap=True)
            elif event.train_seconds is not None:
                previews = f", previews {format_duration(event.preview_seconds)}" if event.preview_seconds else ""
                evaluation = f", evaluation {format_duration(event.eval_seconds)}" if event.eval_seconds else ""
                self._print(f"time: training {format_duration(event.train_seconds)}{previews}{evaluation}")

    def _start_bar(self, event: RunStarted) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[stats]}", markup=False),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(event.method, total=event.max_steps, completed=event.start_step, stats="")


class TensorBoardLogger:
    """Scalars (loss, lr, img/s) and preview grids for TensorBoard, under ``<run>/tensorboard``."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def __call__(self, event: Event) -> None:
        if isinstance(event, StepEnd):
            self.writer.add_scalar("loss", event.loss, event.step)
            self.writer.add_scalar("lr", event.lr, event.step)
            self.writer.add_scalar("images_per_second", event.images_per_second, event.step)
        elif isinstance(event, ValidationLoss):
            self.writer.add_scalar("validation_loss", event.loss, event.step)
        elif isinstance(event, Evaluated):
            for key, value in event.figures.items():
                self.writer.add_scalar(f"eval/{key}", value, event.step)
        elif isinstance(event, SampleSaved) and event.grid:
            import numpy as np
            from PIL import Image

            with Image.open(event.grid) as img:
                self.writer.add_image("previews", np.asarray(img.convert("RGB")), event.step, dataformats="HWC")
        elif isinstance(event, (RunFinished, RunFailed)):
            self.writer.flush()
            self.writer.close()
