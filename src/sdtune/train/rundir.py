"""The run directory: the single source of truth for a run (the UI and resume read it).

    runs/<name>/config.yaml          the resolved config
                metrics.jsonl        one JSON object per step: step, loss, lr, images_per_second, ...
                events.log           human-readable log of what happened
                samples/step-<N>/    preview PNGs (with infotext) and grid.png
                checkpoints/step-<N>/ trainable.safetensors, optimizer.pt, state.json, rng.pt, config.yaml, export/
                output/              the exported artifacts (with eval: the best evaluated step's; output/last/
                                     the last step's when they differ)
                eval.jsonl           one JSON object per evaluation: step and every figure (eval:)
                eval/                step-<N>.png (the evaluation images), reference.safetensors (drift's baseline)
                report.json          best_step, selected_by, the best and last figures, why the run stopped
                .lock                held (OS lock) by the one process training the run; names its PID and host

Every file is written atomically; a checkpoint folder is written under a temporary name and renamed, so a
crash never leaves a half checkpoint that resume would pick up.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdtune.core.atomic import atomic_dir, recover_interrupted_writes, write_text
from sdtune.core.errors import TrainingError

try:  # the lock is an OS lock the kernel drops when its process dies (SIGKILL included), so it is never stale
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None  # type: ignore[assignment]

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    step: int
    path: Path

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
        """(trainable tensors, optimizer state, loop state, rng states)."""
        trainable = load_file(self.path / "trainable.safetensors")
        optimizer = torch.load(self.path / "optimizer.pt", map_location="cpu", weights_only=True)
        state = json.loads((self.path / "state.json").read_text(encoding="utf-8"))
        rng = torch.load(self.path / "rng.pt", map_location="cpu", weights_only=True)
        return trainable, optimizer, state, rng


class RunDir:
    """Paths and writers of one run folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.samples = self.root / "samples"
        self.output = self.root / "output"
        self.metrics_path = self.root / "metrics.jsonl"
        self.events_path = self.root / "events.log"
        self.config_path = self.root / "config.yaml"
        self.stop_path = self.root / "STOP"
        self.lock_path = self.root / ".lock"
        self.eval_path = self.root / "eval.jsonl"
        self.eval_dir = self.root / "eval"
        self.report_path = self.root / "report.json"

    # -- graceful stop: any process (the web UI, a signal handler, a user with `touch`) may ask ---------
    def request_stop(self) -> None:
        """Ask a running job to stop after its current step, with a checkpoint and the exported files."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_text(self.stop_path, time.strftime("%Y-%m-%d %H:%M:%S\n"))

    def stop_requested(self) -> bool:
        return self.stop_path.exists()

    def clear_stop(self, older_than: float | None = None) -> None:
        """Remove the STOP file (only if it was written before ``older_than``, a ``time.time()``, when given)."""
        try:
            if older_than is None or self.stop_path.stat().st_mtime < older_than:
                self.stop_path.unlink(missing_ok=True)
        except FileNotFoundError:
            pass

    def ensure(self) -> None:
        """Create the run's folders (idempotent)."""
        for folder in (self.root, self.checkpoints, self.samples, self.output):
            folder.mkdir(parents=True, exist_ok=True)

    def create(self, config_yaml: str) -> None:
        self.ensure()
        write_text(self.config_path, config_yaml)

    def check_writable(self) -> None:
        """Create the run folder and write a probe file there; a one-line error if the folder cannot be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise TrainingError(
                f"output_dir: cannot write the run folder {self.root} ({reason}); make it writable "
                "(or set output_dir to a folder you can write) and start again"
            ) from None

    def recover(self) -> list[str]:
        """Clean up what a killed process left mid-write (``checkpoints/.step-N.*`` and other temporary files);
        call it only while holding :meth:`lock`. Returns what was done, one line each."""
        return recover_interrupted_writes(self.root) if self.root.is_dir() else []

    # -- one writer per run: an OS lock on .lock ------------------------------------------------------
    def lock(self, wait: float = 1.0) -> RunLock:
        """Take the run's lock (``with run.lock(): ...``); :class:`RunBusyError` names the process holding it."""
        lock = RunLock(self)
        lock.acquire(wait)
        return lock

    def busy_message(self) -> str | None:
        """The one-line refusal if another process holds the run's lock, else None (checks without waiting)."""
        if fcntl is None or not self.lock_path.is_file():
            return None
        fd = os.open(self.lock_path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _busy_message(self)
            fcntl.flock(fd, fcntl.LOCK_UN)  # free: a trainer starting this instant retries (RunLock.acquire)
            return None
        finally:
            os.close(fd)

    # -- logs ----------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        with open(self.events_path, "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        return _rows(self.metrics_path)

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric and evaluation rows past ``after_step`` (steps a killed run did after its last checkpoint)."""
        for path in (self.metrics_path, self.eval_path):
            if path.is_file():
                rows = [r for r in _rows(path) if r.get("step", 0) <= after_step]
                write_text(path, "".join(json.dumps(r) + "\n" for r in rows))

    def append_eval(self, row: dict[str, Any]) -> None:
        with open(self.eval_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def evaluations(self) -> list[dict[str, Any]]:
        return _rows(self.eval_path)

    # -- checkpoints ---------------------------------------------------------------------------------
    def list_checkpoints(self) -> list[Checkpoint]:
        if not self.checkpoints.is_dir():
            return []
        found = []
        for path in self.checkpoints.iterdir():
            m = _STEP_DIR.match(path.name)
            if m and (path / "state.json").is_file():
                found.append(Checkpoint(int(m.group(1)), path))
        return sorted(found, key=lambda c: c.step)

    def latest_checkpoint(self) -> Checkpoint | None:
        found = self.list_checkpoints()
        return found[-1] if found else None

    def save_checkpoint(
        self,
        step: int,
        trainable: dict[str, torch.Tensor],
        optimizer: dict[str, Any],
        state: dict[str, Any],
        rng: dict[str, torch.Tensor],
        export=None,
        keep_last: int = 3,
        config: str | None = None,
        keep: frozenset[int] = frozenset(),
    ) -> Path:
        """Write ``checkpoints/step-<step>/`` atomically; ``export(dir)`` may add exported files; prune old ones
        (beyond the newest ``keep_last``; the steps in ``keep``, e.g. the best evaluated step, are never pruned).

        ``config`` (the resolved YAML) is kept beside the weights: resume compares it with the config it is given.
        """
        final = self.checkpoints / f"step-{step}"
        with atomic_dir(final) as tmp:
            if config is not None:
                (tmp / "config.yaml").write_text(config, encoding="utf-8")
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors")
            )
            torch.save(optimizer, tmp / "optimizer.pt")
            torch.save(rng, tmp / "rng.pt")
            if export is not None:
                written = export(tmp / "export") or []  # what the export names as its outputs, in its order
                names = [str(Path(f).relative_to(tmp / "export")) for f in written]
                (tmp / "outputs.json").write_text(json.dumps(names), encoding="utf-8")
            (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
        for old in self.list_checkpoints()[:-keep_last]:
            if old.step not in keep:
                shutil.rmtree(old.path, ignore_errors=True)
        return final

    def checkpoint(self, step: int) -> Checkpoint | None:
        return next((c for c in self.list_checkpoints() if c.step == step), None)


def _rows(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``.jsonl`` file, a line cut by a kill left out."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RunBusyError(TrainingError):
    """Another process is training this run folder."""


class RunLock:
    """The run's ``.lock``: an exclusive ``flock`` held for the life of the training process.

    The file holds ``{"pid", "host", "started"}`` so a refused process can name the holder. The kernel releases
    the lock when its process ends in any way, so a crash never leaves a stale lock; the file itself stays.
    """

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self._fd: int | None = None

    def acquire(self, wait: float = 1.0) -> None:
        if fcntl is None:
            return
        self.run.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait  # another process may be probing it (busy_message) for an instant
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise RunBusyError(_busy_message(self.run)) from None
                time.sleep(0.05)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # no holder named any more
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(run: RunDir) -> dict[str, Any] | None:
    """What ``.lock`` says about its holder (pid, host, started), if it says anything."""
    try:
        data = json.loads(run.lock_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def _busy_message(run: RunDir) -> str:
    holder = None
    for _ in range(20):  # the holder writes its pid just after taking the lock
        if (holder := lock_holder(run)) is not None:
            break
        time.sleep(0.05)
    if holder is None:
        who = "another process"
    else:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
        who = f"process {holder['pid']} on {holder.get('host', '?')} (since {since})"
    return (
        f"{run.root}: already being trained by {who}; wait for it to finish or stop it "
        f"(kill -TERM {holder['pid'] if holder else '<pid>'}, or Stop in the web UI), then resume: "
        f"sdtune train {run.root}"
    )
