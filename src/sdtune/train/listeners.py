"""Event listeners: console progress (rich) and TensorBoard. The loop knows nothing about them."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sdtune.core.events import (
    CheckpointSaved,
    Event,
    RunFailed,
    RunFinished,
    RunStarted,
    SampleSaved,
    StepEnd,
    ValidationLoss,
)
from sdtune.train.plots import smooth


class ConsoleProgress:
    """A progress bar with step, loss, smoothed loss, lr, it/s and ETA; one line per checkpoint or preview."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.progress: Progress | None = None
        self.task = None
        self.losses: list[float] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task(
                event.method, total=event.max_steps, completed=event.start_step, stats=""
            )
        elif isinstance(event, StepEnd) and self.progress is not None:
            self.losses.append(event.loss)
            stats = (
                f"loss {event.loss:.4f} (avg {smooth(self.losses)[-1]:.4f}) lr {event.lr:.2e} "
                f"{event.images_per_second:.1f} img/s epoch {event.epoch}"
            )
            self.progress.update(self.task, completed=event.step, stats=stats)
        elif isinstance(event, ValidationLoss):
            self.console.print(f"step {event.step}: validation loss {event.loss:.5f}", highlight=False)
        elif isinstance(event, (CheckpointSaved, SampleSaved)):
            what = f"checkpoint {event.path}" if isinstance(event, CheckpointSaved) else f"previews {event.grid}"
            self.console.print(f"step {event.step}: {what}", highlight=False)
        elif isinstance(event, (RunFinished, RunFailed)):
            if self.progress is not None:
                self.progress.stop()
            if isinstance(event, RunFailed):
                self.console.print(f"[red]stopped:[/red] {event.reason}", highlight=False)


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
        elif isinstance(event, SampleSaved) and event.grid:
            import numpy as np
            from PIL import Image

            with Image.open(event.grid) as img:
                self.writer.add_image("previews", np.asarray(img.convert("RGB")), event.step, dataformats="HWC")
        elif isinstance(event, (RunFinished, RunFailed)):
            self.writer.flush()
            self.writer.close()
