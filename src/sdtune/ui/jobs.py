"""Training jobs started from the web UI: each one is ``sdtune train`` in its own process.

A job is launched as ``python -m sdtune.cli.main train CONFIG`` in a new session (``start_new_session``), with
its output in ``<run>/ui.log`` and its process id in ``<run>/ui.pid``. It is not a child that dies with the UI:
closing or restarting the UI leaves it running, and a new :class:`JobManager` finds it again by scanning the
runs folders. Everything else about a run is read from its run folder (the contract in
:mod:`sdtune.train.rundir`), exactly as for a run started on the command line.

A run folder whose ``.lock`` another process holds (a ``sdtune train`` started in a terminal, or a job of another
UI) is not started or resumed: the refusal is the same line ``sdtune train`` prints, naming that process, and the
run shows as running with its pid.

Stop is the graceful one: :meth:`RunDir.request_stop` writes ``STOP`` (the loop finishes its step, writes a
checkpoint and the outputs) and SIGTERM does the same through ``sdtune train``'s signal handler.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sdtune.config import dump_yaml, load_train_config
from sdtune.config.methods import RunBase
from sdtune.core.atomic import write_text
from sdtune.core.errors import SdtuneError
from sdtune.train.rundir import RunDir, lock_holder

PID_FILE = "ui.pid"
LOG_FILE = "ui.log"
_FINISHED = re.compile(r"finished at step (\d+) \(([^)]*)\)")
_STARTED = re.compile(r"training \S+ from step (\d+) to (\d+)")


class JobError(SdtuneError):
    """A job cannot be started, resumed or stopped (one line: what and what to do)."""


@dataclass
class RunStatus:
    """What the Runs page shows about one run folder."""

    root: Path
    name: str
    method: str
    state: str  # starting, running, stopping, finished, stopped, failed, incomplete
    step: int = 0
    max_steps: int = 0
    pid: int | None = None
    steps_per_second: float | None = None
    eta_seconds: float | None = None
    checkpoints: list[int] = field(default_factory=list)
    message: str = ""

    @property
    def alive(self) -> bool:
        return self.pid is not None


def read_pid_file(root: Path) -> dict | None:
    try:
        data = json.loads((root / PID_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def process_matches(pid: int, argv: list[str]) -> bool:
    """True if process ``pid`` is alive and runs ``argv`` (so a reused pid of another program is not ours).

    The interpreter path is not compared (a platform may rewrite it); the module and arguments are. A zombie
    has an empty command line, so a job that ended but was not yet reaped counts as ended.
    """
    proc = Path("/proc")
    if proc.is_dir():
        try:
            raw = (proc / str(pid) / "cmdline").read_bytes()
        except OSError:
            return False
        cmdline = [part.decode("utf-8", "replace") for part in raw.split(b"\0")[:-1]]
        return len(cmdline) == len(argv) and cmdline[1:] == argv[1:]
    try:  # no /proc (macOS): the pid exists; the best check available without extra packages
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobManager:
    """Launch, find, stop and resume training processes whose run folders lie in ``runs_dirs``."""

    def __init__(
        self,
        runs_dirs: Iterable[str | Path],
        *,
        cwd: str | Path | None = None,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
    ) -> None:
        self.runs_dirs = [Path(d) for d in runs_dirs]
        self.cwd = Path(cwd) if cwd is not None else None
        self.python = python
        self.env = env
        self._children: dict[Path, subprocess.Popen] = {}
        self._known: set[Path] = set()
        self._rates: dict[Path, list[tuple[float, int]]] = {}

    # -- finding runs ----------------------------------------------------------------------------------
    def find_runs(self) -> list[Path]:
        """Run folders (a ``config.yaml`` or a ``ui.pid`` inside), newest first."""
        found: set[Path] = {r for r in self._known if r.is_dir()}
        for folder in self.runs_dirs:
            if not folder.is_dir():
                continue
            for child in folder.iterdir():
                if child.is_dir() and ((child / "config.yaml").is_file() or (child / PID_FILE).is_file()):
                    found.add(child.resolve())
        return sorted(found, key=_mtime, reverse=True)

    def alive_pid(self, root: str | Path) -> int | None:
        """The process id of the job training in ``root`` if it is running, else None."""
        root = Path(root).resolve()
        child = self._children.get(root)
        if child is not None and child.poll() is not None:  # reap our own finished child (no zombie)
            del self._children[root]
        info = read_pid_file(root)
        if info is not None and process_matches(info["pid"], list(info.get("argv", []))):
            return info["pid"]
        return _lock_holder_pid(RunDir(root))  # a run started outside this UI (`sdtune train` in a terminal)

    # -- starting --------------------------------------------------------------------------------------
    def start(self, cfg: RunBase) -> Path:
        """Write ``cfg`` as the run's ``config.yaml`` and launch ``sdtune train`` on it; return the run folder.

        The file is exactly what ``sdtune train`` would be given on the command line, so the run can be
        reproduced with ``sdtune train <run>/config.yaml`` (under another name or output_dir).
        """
        root = (Path(cfg.output_dir) / cfg.name).resolve()
        if (busy := RunDir(root).busy_message()) is not None:  # also a `sdtune train` started in a terminal
            raise JobError(busy)
        if self.alive_pid(root) is not None:
            raise JobError(f"name: a job is already training in {root}; stop it or choose another name")
        if RunDir(root).latest_checkpoint() is not None:
            raise JobError(f"name: {root} already holds a run; resume it on the Runs page or choose another name")
        root.mkdir(parents=True, exist_ok=True)
        config = root / "config.yaml"
        write_text(config, dump_yaml(cfg))
        self.launch(root, ["train", str(config)])
        return root

    def resume(self, root: str | Path) -> None:
        """Continue the run in ``root`` from its latest checkpoint (``sdtune train RUN --resume``)."""
        root = Path(root).resolve()
        run = RunDir(root)
        if not run.config_path.is_file():
            raise JobError(f"{root}: not a run folder (no config.yaml); start a run from the Train page")
        if (busy := run.busy_message()) is not None:
            raise JobError(busy)
        if self.alive_pid(root) is not None:
            raise JobError(f"{root.name}: still running; stop it first")
        cfg = load_train_config(run.config_path)
        latest = run.latest_checkpoint()
        if latest is not None and latest.step >= cfg.train.max_steps:
            raise JobError(
                f"train.max_steps: {root.name} is already at step {latest.step}; raise max_steps in "
                f"{run.config_path} to train further"
            )
        self.launch(root, ["train", str(run.config_path), "--resume"])

    def launch(self, root: Path, args: list[str]) -> int:
        """Start ``sdtune <args>`` detached from the UI, logging to ``root/ui.log``; return its pid."""
        argv = [self.python, "-m", "sdtune.cli.main", *args]
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONUNBUFFERED"] = "1"  # the log shows progress as it happens
        root.mkdir(parents=True, exist_ok=True)
        with open(root / LOG_FILE, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} sdtune {' '.join(args)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # not in the UI's process group: Ctrl-C / closing the UI leaves it running
            )
        write_text(root / PID_FILE, json.dumps({"pid": proc.pid, "argv": argv, "started": time.time()}) + "\n")
        self._children[root] = proc
        self._known.add(root)
        self._rates.pop(root, None)
        return proc.pid

    # -- stopping --------------------------------------------------------------------------------------
    def stop(self, root: str | Path) -> bool:
        """Ask the job in ``root`` to stop after its current step with a checkpoint; True if one was running.

        The ``STOP`` file is the request (any process may write it); SIGTERM makes ``sdtune train`` write the
        same file, and ends a job that is still loading its model (it has nothing to save yet).
        """
        root = Path(root).resolve()
        pid = self.alive_pid(root)
        if pid is None:
            return False  # nothing to stop (a STOP file now would be cleared by the next start anyway)
        RunDir(root).request_stop()
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        return True

    # -- status ----------------------------------------------------------------------------------------
    def status(self, root: str | Path) -> RunStatus:
        root = Path(root).resolve()
        run = RunDir(root)
        name, method, max_steps, per_step = root.name, "?", 0, 1
        try:
            cfg = load_train_config(run.config_path)
            name, method, max_steps = cfg.name, cfg.method, cfg.train.max_steps
            per_step = cfg.data.batch_size * cfg.train.grad_accum
        except SdtuneError:
            pass
        rows = _last_rows(run.metrics_path)  # the tail only: a long run's metrics are read once a second
        step = int(rows[-1]["step"]) if rows else 0
        pid = self.alive_pid(root)
        info = read_pid_file(root) or {}
        checkpoints = [c.step for c in run.list_checkpoints()]
        status = RunStatus(root, name, method, "", step, max_steps, pid, checkpoints=checkpoints)
        events = _read_tail(run.events_path, 64_000)
        last_start = max((m.end() for m in _STARTED.finditer(events)), default=0)
        finished = list(_FINISHED.finditer(events[last_start:]))
        if pid is not None:
            events_mtime = _mtime(run.events_path) if run.events_path.exists() else 0.0
            if run.stop_requested():
                status.state = "stopping"
            elif events_mtime < float(info.get("started", 0)):
                status.state = "starting"
            else:
                status.state = "running"
            status.steps_per_second = self._rate(root, step, rows, per_step)
            if status.steps_per_second and max_steps > step:
                status.eta_seconds = (max_steps - step) / status.steps_per_second
        elif finished:
            status.step = int(finished[-1].group(1))
            reason = finished[-1].group(2)
            status.state = "stopped" if "stopped" in reason else "finished"
            status.message = reason
        elif info:
            status.state = "failed"
            status.message = _last_error(root / LOG_FILE)
        else:
            status.state = "incomplete"
            status.message = "no process is training it; resume it to continue from its latest checkpoint"
        return status

    def _rate(self, root: Path, step: int, rows: list[dict], per_step: int) -> float | None:
        """Steps per second over the last ~30 s of wall time (previews and checkpoints included)."""
        now = time.monotonic()
        seen = self._rates.setdefault(root, [])
        if not seen or seen[-1][1] != step:
            seen.append((now, step))
        while len(seen) > 2 and now - seen[0][0] > 30:
            seen.pop(0)
        if len(seen) >= 2 and seen[-1][1] > seen[0][1] and seen[-1][0] > seen[0][0]:
            return (seen[-1][1] - seen[0][1]) / (seen[-1][0] - seen[0][0])
        if rows and rows[-1].get("images_per_second"):
            return float(rows[-1]["images_per_second"]) / max(per_step, 1)
        return None


def _lock_holder_pid(run: RunDir) -> int | None:
    """The pid of the process holding the run's lock, if it runs on this machine (a pid elsewhere is not ours)."""
    if run.busy_message() is None:
        return None
    holder = lock_holder(run)
    return holder["pid"] if holder is not None and holder.get("host") == socket.gethostname() else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _read_tail(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _last_rows(path: Path, limit: int = 8_000) -> list[dict]:
    """The metric rows in the last ``limit`` bytes of ``metrics.jsonl`` (a long run's file is not parsed whole)."""
    lines = _read_tail(path, limit).splitlines()
    if _size(path) > limit:
        lines = lines[1:]  # cut by the tail
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line being written, or cut by a kill
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _last_error(log: Path) -> str:
    """The job's last meaningful output line (``error: ...`` from the CLI if there is one)."""
    lines = [ln.strip() for ln in _read_tail(log, 16_000).splitlines() if ln.strip() and not ln.startswith("---")]
    errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln]
    return (errors or lines or ["the process ended without finishing; see ui.log"])[-1]
