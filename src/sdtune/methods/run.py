"""Run a training config end to end: the one entry point the CLI and the web UI both call."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console

from sdtune.config import dump_yaml, load_train_config
from sdtune.config.methods import RunBase
from sdtune.core import quiet
from sdtune.core.atomic import write_text as atomic_write_text
from sdtune.core.errors import ConfigError, TrainingError
from sdtune.core.events import EventBus
from sdtune.methods import setup_function
from sdtune.methods.estimate import Estimate, device_memory, estimate, peak_rss, summary_lines
from sdtune.methods.evaluation import load_scorers, make_evaluator
from sdtune.train.config_changes import check_resume, describe
from sdtune.train.disk_errors import WriteGuard
from sdtune.train.listeners import ConsoleProgress, TensorBoardLogger
from sdtune.train.loop import train
from sdtune.train.optim import check_optimizer
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
    entered, estimate_seconds = time.time(), 0.0
    console = console or Console()
    run = run_dir_of(cfg)
    # Launched as several processes (torchrun / accelerate launch) without CUDA: accelerate forms the gloo
    # process group only in its CPU mode; a single process keeps accelerate's own device choice.
    cpu_group = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # An optimizer whose package is missing, or a precision the device cannot do, is one line before anything starts.
    check_optimizer(cfg.optimizer)
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
                tic = time.perf_counter()
                cost = _estimate(cfg, accelerator, run, console)
                estimate_seconds = time.perf_counter() - tic
                if progress:
                    bus.subscribe(ConsoleProgress(console))
                bus.subscribe(TensorBoardLogger(run.root / "tensorboard"))
            held.enter_context(quiet.run_log(run.events_path))  # third-party notices: events.log, not the console
        else:
            cost = None
        accelerator.wait_for_everyone()
        say = _say(console, run) if accelerator.is_main_process else (lambda line: None)
        scorers = load_scorers(cfg.eval, cfg.model.base)  # a bad scorer folder is one line before the model loads
        if scorers.notice:
            say(scorers.notice)
        try:
            job = setup_function(cfg.method)(cfg, accelerator, console)
            evaluate = make_evaluator(cfg, scorers, job, say) if accelerator.is_main_process else None
            if not accelerator.is_main_process and scorers.kind is not None:
                evaluate = _elsewhere  # the main process evaluates; the others take part in its decisions
            if accelerator.is_main_process:
                run.log(_startup_line(entered, estimate_seconds, getattr(job, "report", None)))
            with _graceful_stop(run, console):
                outputs = train(job, cfg, run, bus, accelerator, evaluate)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            raise TrainingError(_out_of_memory(exc, cost, run)) from None
        if accelerator.is_main_process:
            _record_measured(run, cost, accelerator)
        return outputs


def _say(console: Console, run: RunDir):
    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False)
        run.log(line)

    return say


def _elsewhere(step: int, folder: Path) -> dict:
    raise RuntimeError("evaluations run on the main process only")


def _startup_line(entered: float, estimate_seconds: float, report) -> str:
    """Where the time from launch to training went: before sdtune's run started (Python, imports, the config),
    the estimate, the recipe's timed phases (loading, caching latents) and the rest of the set-up."""
    import psutil

    now = time.time()
    launched = psutil.Process().create_time()
    parts = {"launch and imports": entered - launched, "estimate": estimate_seconds}
    parts |= dict(report.phases) if report is not None else {}
    parts["other set-up"] = max(0.0, now - launched - sum(parts.values()))
    return f"start-up {now - launched:.1f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items())


def _estimate(cfg: RunBase, accelerator: Accelerator, run: RunDir, console: Console) -> Estimate | None:
    """The run's expected cost, printed first (and recorded in ``estimate.json``); a warning with what to change
    when it exceeds the free memory. An estimate that cannot be made never stops the run."""
    try:
        cost = estimate(cfg, accelerator.device.type, accelerator.mixed_precision)  # the precision already chosen
    except Exception as exc:  # advisory only: say why, train anyway
        run.log(f"no estimate: {type(exc).__name__}: {exc}")
        return None
    free = device_memory(cost.device)
    lines = summary_lines(cost, free)
    for line in lines:
        console.print(line, markup=False, highlight=False)
        run.log(line)
    atomic_write_text(run.root / "estimate.json", json.dumps({"estimate": cost.as_dict()}, indent=2))
    return cost


def _record_measured(run: RunDir, cost: Estimate | None, accelerator: Accelerator) -> None:
    """The measured peaks beside the estimate (``estimate.json``; the line in events.log)."""
    measured = {"peak_host_bytes": peak_rss()}
    if accelerator.device.type == "cuda":
        measured["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    record = {"estimate": cost.as_dict() if cost else None, "measured": measured}
    atomic_write_text(run.root / "estimate.json", json.dumps(record, indent=2))
    line = f"peak memory: host {measured['peak_host_bytes'] / 2**30:.2f} GiB"
    if "peak_device_bytes" in measured:
        line += f", GPU {measured['peak_device_bytes'] / 2**30:.2f} GiB"
    if cost:
        line += f" (estimated {cost.peak_device_bytes / 2**30:.2f} GiB)"
    run.log(line)


def _out_of_memory(exc: BaseException, cost: Estimate | None, run: RunDir) -> str:
    """One line: what ran out, what was estimated, what to change, the last good checkpoint."""
    where = "GPU" if isinstance(exc, torch.OutOfMemoryError) else "host"
    latest = run.latest_checkpoint()
    line = f"out of {where} memory during the run"
    if cost:
        line += f" (estimated peak {cost.peak_device_bytes / 2**30:.2f} GiB)"
        if cost.suggestions:
            line += "; try " + "; ".join(cost.suggestions[:3])
    line += f". Last good checkpoint: {latest.path if latest else 'none'}"
    return line + (f"; resume with: sdtune train {run.root} --resume" if latest else "")


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
