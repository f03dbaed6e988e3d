"""UI jobs are `sdtune train` processes of their own: found again by a fresh manager, stopped gracefully."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdtune.config import TextualInversionConfig, dump_yaml, load_train_config
from sdtune.train.rundir import RunDir
from sdtune.ui.jobs import JobError, JobManager, process_matches, read_pid_file
from sdtune.world import write_concept_dataset


def ti_config(tmp_path, max_steps: int, name: str = "job", data: str | None = None) -> TextualInversionConfig:
    if data is None:
        write_concept_dataset("teal_heart", tmp_path / "data", n=4)
    return TextualInversionConfig.model_validate(
        {
            "method": "textual_inversion",
            "name": name,
            "output_dir": str(tmp_path / "runs"),
            "token": "<job>",
            "data": {"path": data or str(tmp_path / "data"), "batch_size": 2},
            "train": {"max_steps": max_steps},
            "preview": {"before_training": False, "steps": 2},
        }
    )


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_process_matches_checks_the_command_line():
    argv = list(sys.argv) if sys.argv[0] else ["python"]
    with open(f"/proc/{os.getpid()}/cmdline", "rb") as fh:
        mine = [p.decode() for p in fh.read().split(b"\0")[:-1]]
    assert process_matches(os.getpid(), mine)
    assert not process_matches(os.getpid(), [*mine, "--other"])  # a reused pid running something else
    assert not process_matches(2**22 + 12345, argv)  # no such process


def test_start_refuses_a_name_that_holds_a_run_and_resume_refuses_a_finished_one(tmp_path):
    jobs = JobManager([tmp_path / "runs"], cwd=tmp_path)
    cfg = ti_config(tmp_path, max_steps=5)
    root = tmp_path / "runs" / "job"
    (root / "checkpoints" / "step-5").mkdir(parents=True)
    (root / "checkpoints" / "step-5" / "state.json").write_text(json.dumps({"step": 5}))
    with pytest.raises(JobError, match="already holds a run"):
        jobs.start(cfg)
    (root / "config.yaml").write_text(dump_yaml(cfg))
    with pytest.raises(JobError, match="train.max_steps: job is already at step 5"):
        jobs.resume(root)
    with pytest.raises(JobError, match="not a run folder"):
        jobs.resume(tmp_path)


def test_a_failing_job_shows_its_error(tmp_path):
    jobs = JobManager([tmp_path / "runs"], cwd=tmp_path)
    root = jobs.start(ti_config(tmp_path, max_steps=5, data=str(tmp_path / "no-such-folder")))
    wait_for(lambda: jobs.alive_pid(root) is None, 120, "the job to exit")
    status = JobManager([tmp_path / "runs"]).status(root)
    assert status.state == "failed"
    assert status.message.startswith("error:") and "no-such-folder" in status.message


UI_PROCESS = """
import sys
from sdtune.config import TextualInversionConfig
from sdtune.ui.jobs import JobManager
cfg = TextualInversionConfig.model_validate_json(sys.argv[1])
print(JobManager([cfg.output_dir]).start(cfg))
"""


@pytest.mark.slow
def test_a_job_outlives_the_ui_is_found_again_stopped_with_a_checkpoint_and_resumed(tmp_path):
    runs = tmp_path / "runs"
    cfg = ti_config(tmp_path, max_steps=100_000)
    # "the UI": a process that starts the job and exits, as a closed or restarted UI does
    started = subprocess.run(
        [sys.executable, "-c", UI_PROCESS, cfg.model_dump_json()], capture_output=True, text=True, timeout=120
    )
    assert started.returncode == 0, started.stderr
    root = Path(started.stdout.strip())
    fresh = JobManager([runs])  # the restarted UI
    try:
        assert load_train_config(root / "config.yaml") == cfg  # the file `sdtune train` runs: reproducible
        pid = read_pid_file(root)["pid"]
        assert fresh.find_runs() == [root]
        assert fresh.alive_pid(root) == pid  # still training after its UI is gone
        assert os.getsid(pid) != os.getsid(0)  # its own session: a terminal's Ctrl-C to the UI does not reach it

        def steps() -> int:
            return len(RunDir(root).metrics())

        wait_for(lambda: steps() >= 3, 180, "training steps")
        status = fresh.status(root)
        assert status.state == "running" and status.step >= 3 and status.max_steps == 100_000

        assert fresh.stop(root)
        assert (root / "STOP").is_file()
        wait_for(lambda: fresh.alive_pid(root) is None, 180, "the job to stop")
        status = fresh.status(root)
        assert status.state == "stopped", status
        assert status.checkpoints and status.checkpoints[-1] == status.step >= 3
        assert (root / "checkpoints" / f"step-{status.step}" / "state.json").is_file()
        assert list((root / "output").glob("*.safetensors"))

        fresh.resume(root)
        assert read_pid_file(root)["argv"][-3:] == ["train", str(root / "config.yaml"), "--resume"]
        assert fresh.alive_pid(root) is not None
    finally:
        fresh.stop(root)
        wait_for(lambda: fresh.alive_pid(root) is None, 180, "the job to end")


def test_status_of_a_run_started_on_the_command_line(tmp_path):
    cfg = ti_config(tmp_path, max_steps=500, name="cli-run")
    root = tmp_path / "runs" / "cli-run"
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(dump_yaml(cfg))
    rows = [{"step": s, "loss": 0.1, "images_per_second": 4.0} for s in range(1, 401)]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # > the 8 kB tail
    (root / "events.log").write_text("2026-01-01 00:00:00 training textual_inversion from step 0 to 500, batch 2\n")
    jobs = JobManager([tmp_path / "runs"])
    assert jobs.find_runs() == [root.resolve()]
    status = jobs.status(root)
    assert (status.state, status.step, status.max_steps, status.pid) == ("incomplete", 400, 500, None)
    with open(root / "events.log", "a") as fh:
        fh.write("2026-01-01 00:01:00 finished at step 400 (stopped on request); outputs: x\n")
    assert (jobs.status(root).state, jobs.status(root).message) == ("stopped", "stopped on request")
    with open(root / "events.log", "a") as fh:  # resumed and finished: only the latest attempt counts
        fh.write("2026-01-01 00:02:00 training textual_inversion from step 400 to 500, batch 2\n")
        fh.write("2026-01-01 00:03:00 finished at step 500 (max steps reached); outputs: x\n")
    assert (jobs.status(root).state, jobs.status(root).step) == ("finished", 500)


def test_stopping_a_run_that_is_not_running_changes_nothing(tmp_path):
    root = tmp_path / "runs" / "idle"
    root.mkdir(parents=True)
    (root / "ui.pid").write_text(json.dumps({"pid": 2**22 + 54321, "argv": ["python", "-m", "x"]}))
    assert JobManager([tmp_path / "runs"]).stop(root) is False
    assert not (root / "STOP").exists()
