"""Run a training config end to end: the one entry point the CLI and the web UI both call."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console

from sdtune.config import dump_yaml, load_train_config
from sdtune.config.methods import RunBase
from sdtune.core import quiet
from sdtune.core.errors import ConfigError
from sdtune.core.events import EventBus
from sdtune.methods import setup_function
from sdtune.train.config_changes import check_resume, describe
from sdtune.train.disk_errors import WriteGuard
from sdtune.train.listeners import ConsoleProgress, TensorBoardLogger
from sdtune.train.loop import train
from sdtune.train.precision import precision_note, resolve_precision
from sdtune.train.rundir import RunDir


def run_dir_of(cfg: RunBase) -> RunDir:
    return RunDir(Path(cfg.output_dir) / cfg.name)


def resolve(
    config: str | Path, overrides: list[str] | tuple[str, ...] = (), resume: bool = False
) -> tuple[RunBase, bool]:
    """A config from a YAML file or from a run folder (which means: resume that run)."""
    path = Path(config)
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise ConfigError(f"{path}: not a run folder (no config.yaml); give a config YAML or a run folder")
        return load_train_config(path / "config.yaml", overrides), True
    return load_train_config(path, overrides), resume


def run(
    cfg: RunBase,
    *,
    resume: bool = False,
    console: Console | None = None,
    bus: EventBus | None = None,
    progress: bool = True,
    allow_config_change: bool = False,
) -> list[Path]:
    """Train ``cfg``; with ``resume`` continue the run folder's latest checkpoint. Returns the exported files.

    The main process holds the run folder's lock (``.lock``) until it returns: a second run on the same folder is
    refused with one line naming the process. Resuming with a config that differs from the checkpoint's names each
    changed field; changes that break the exact resume need ``allow_config_change`` (see
    :mod:`sdtune.train.config_changes`).
    """
    console = console or Console()
    run = run_dir_of(cfg)
    # Launched as several processes (torchrun / accelerate launch) without CUDA: accelerate forms the gloo
    # process group only in its CPU mode; a single process keeps accelerate's own device choice.
    cpu_group = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # A precision the device cannot do is one line before anything starts.
    precision = resolve_precision(cfg.train.mixed_precision, base=cfg.model.base)
    accelerator = Accelerator(mixed_precision=precision, cpu=cpu_group)
    if accelerator.is_main_process and (note := precision_note(precision, accelerator.device.type)):
        console.print(note, markup=False, highlight=False)
    with ExitStack() as held:
        if accelerator.is_main_process:  # one writer per run folder; the other processes of this run write nothing
            run.check_writable()
            held.enter_context(run.lock())
        if run.latest_checkpoint() is not None and not resume:
            raise ConfigError(f"name: {run.root} already holds a run; resume it (--resume) or choose another name")
        changes = check_resume(run, cfg, allow_config_change) if resume else []
        accelerator.wait_for_everyone()  # every process has read the stored config before it is replaced
        bus = bus or EventBus()
        if accelerator.is_main_process:
            with WriteGuard(run).writing("the run folder"):  # a full disk here is one line too
                for action in run.recover():  # what a killed process left mid-write
                    run.log(action)
                if changes:
                    line = describe(changes, cfg, allow_config_change)
                    console.print(line, markup=False, highlight=False)
                    run.log(line)
                run.create(dump_yaml(cfg))
                if progress:
                    bus.subscribe(ConsoleProgress(console))
                bus.subscribe(TensorBoardLogger(run.root / "tensorboard"))
            held.enter_context(quiet.run_log(run.events_path))  # third-party notices: events.log, not the console
        accelerator.wait_for_everyone()
        job = setup_function(cfg.method)(cfg, accelerator, console)
        with _graceful_stop(run, console):
            return train(job, cfg, run, bus, accelerator)


@contextmanager
def _graceful_stop(run: RunDir, console: Console):
    """SIGTERM (the web UI's stop, `kill`) and a first Ctrl-C finish the current step, write a checkpoint and the
    outputs, then stop; a second Ctrl-C aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame):
        if signum == signal.SIGINT and run.stop_requested():
            raise KeyboardInterrupt
        run.request_stop()
        console.print("stopping after this step with a checkpoint (Ctrl-C again to abort now)")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
