"""One writer per run: a second `sdtune train` on a running run (CLI or web UI) is refused naming the process;
a lock left by a process killed with SIGKILL does not block the next run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from tests.methods.run_configs import ti_run_config

from sdtune.config import load_train_config
from sdtune.methods.run import run
from sdtune.train.rundir import RunBusyError, RunDir
from sdtune.ui.jobs import JobError, JobManager


def _config(tmp_path: Path, model: Path, data: Path, max_steps: int) -> Path:
    return ti_run_config(tmp_path, model, data, name="locked", max_steps=max_steps, seed=1)


def _holder(root: Path) -> dict | None:
    try:
        return json.loads((root / ".lock").read_text())
    except (OSError, ValueError):
        return None


def _wait(condition, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended before {what}: {proc.stderr.read() if proc.stderr else ''}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _sdtune(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "sdtune.cli.main", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_a_second_train_on_a_running_run_is_refused_naming_the_first(tmp_path, tiny_checkpoint, image_folder):
    cfg_path = _config(tmp_path, tiny_checkpoint("sd1"), image_folder, max_steps=10_000)
    root = tmp_path / "runs" / "locked"
    first = subprocess.Popen(
        [sys.executable, "-m", "sdtune.cli.main", "train", str(cfg_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    try:
        _wait(lambda: (_holder(root) or {}).get("pid") == first.pid, 240, "the first run to take the lock", first)
        _wait(lambda: (root / "checkpoints" / "step-2").is_dir(), 240, "the first checkpoint", first)

        for args in (["train", str(root)], ["train", str(cfg_path), "--resume"], ["train", str(cfg_path)]):
            second = _sdtune(*args)
            lines = second.stderr.strip().splitlines()
            assert second.returncode == 2, second.stderr
            assert len(lines) == 1 and lines[0].startswith("error: "), second.stderr
            assert f"process {first.pid} " in lines[0] and "already being trained" in lines[0]

        # The web UI refuses with the same line, and sees the terminal's run as running with its pid.
        jobs = JobManager([tmp_path / "runs"])
        assert jobs.alive_pid(root) == first.pid
        assert jobs.status(root).state == "running"
        with pytest.raises(JobError, match=f"already being trained by process {first.pid} "):
            jobs.resume(root)
        with pytest.raises(JobError, match=f"already being trained by process {first.pid} "):
            jobs.start(load_train_config(cfg_path))
        assert first.poll() is None  # the refusals did not disturb it

        RunDir(root).request_stop()  # the first run completes: checkpoint and outputs of the step it reached
        assert first.wait(timeout=240) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    log = (root / "events.log").read_text()
    assert log.count("training textual_inversion from step 0") == 1  # only the first one trained
    assert "finished at step" in log and (root / "output" / "thing.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no step written twice
    assert _holder(root) is None  # released on exit: the file no longer names a holder


_HOLD = """
import sys, time
from sdtune.train.rundir import RunDir
lock = RunDir(sys.argv[1]).lock()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_lock_left_by_a_killed_process_does_not_block_the_next_run(tmp_path, tiny_checkpoint, image_folder):
    cfg = load_train_config(_config(tmp_path, tiny_checkpoint("sd1"), image_folder, max_steps=2))
    root = tmp_path / "runs" / "locked"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunBusyError, match=f"process {holder.pid} "):  # while it lives, the run is taken
            run(cfg, console=Console(quiet=True), progress=False)
        assert not (root / "checkpoints").exists()  # refused before writing anything
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert _holder(root)["pid"] == holder.pid  # the file still names the dead process ...
    outputs = run(cfg, console=Console(quiet=True), progress=False)  # ... but the kernel dropped its lock
    assert all(p.is_file() for p in outputs)
    assert RunDir(root).latest_checkpoint().step == 2
    assert RunDir(root).busy_message() is None


def test_the_lock_is_exclusive_within_one_process_and_released_on_exit(tmp_path):
    run_dir = RunDir(tmp_path / "r")
    with run_dir.lock():
        assert f"process {os.getpid()} " in run_dir.busy_message()
        with pytest.raises(RunBusyError, match=f"process {os.getpid()} "):
            run_dir.lock(wait=0.2)
    assert run_dir.busy_message() is None
    with run_dir.lock():  # taken again after release
        assert _holder(run_dir.root)["pid"] == os.getpid()
