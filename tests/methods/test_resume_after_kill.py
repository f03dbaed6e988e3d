"""A textual-inversion run killed with SIGKILL and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

STEPS, EVERY = 60, 5


def _config(tmp_path: Path, name: str, model: Path, data: Path) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "method": "textual_inversion",
                "name": name,
                "output_dir": str(tmp_path / "runs"),
                "token": "<thing>",
                "num_vectors": 2,
                "init_text": "red",
                "model": {"base": str(model)},
                "data": {
                    "path": str(data),
                    "template": "subject_filewords",
                    "batch_size": 2,
                    "latent_sampling": "random",
                },
                "optimizer": {"lr": 0.01},
                "train": {"max_steps": STEPS, "seed": 3},
                "save": {"every_n_steps": EVERY, "keep_last": 20},
                "preview": {"before_training": False, "steps": 2},
            }
        )
    )
    return path


def _sdtune(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "sdtune.cli.main", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, tiny_checkpoint, image_folder):
    model = tiny_checkpoint("sd1")
    whole = _sdtune("train", str(_config(tmp_path, "whole", model, image_folder)))
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    killed_cfg = _config(tmp_path, "killed", model, image_folder)
    proc = _sdtune("train", str(killed_cfg))
    first = tmp_path / "runs" / "killed" / "checkpoints" / f"step-{EVERY}" / "state.json"
    deadline = time.time() + 240
    while not first.exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = tmp_path / "runs" / "killed"
    assert not (run / "output" / "thing.safetensors").exists(), "killed too late: the run had finished"

    resumed = _sdtune("train", str(killed_cfg), "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a = load_file(tmp_path / "runs" / "whole" / "checkpoints" / f"step-{STEPS}" / "trainable.safetensors")
    b = load_file(run / "checkpoints" / f"step-{STEPS}" / "trainable.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() == 0, key  # bit-exact: every random draw is replayed
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_sigterm_stops_gracefully_with_checkpoint_and_outputs_then_resumes(tmp_path, tiny_checkpoint, image_folder):
    model = tiny_checkpoint("sd1")
    cfg = _config(tmp_path, "stopped", model, image_folder)
    run = tmp_path / "runs" / "stopped"
    proc = _sdtune("train", str(cfg))
    deadline = time.time() + 120
    while not (run / "checkpoints" / f"step-{EVERY}" / "state.json").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what the web UI's stop button sends
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    steps = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").iterdir())
    stopped_at = steps[-1]
    assert EVERY <= stopped_at < STEPS  # it stopped early, after writing a checkpoint of the step it finished
    assert (run / "output" / "thing.safetensors").is_file()  # and the outputs of that step
    log = (run / "events.log").read_text()
    assert f"finished at step {stopped_at} (stopped on request)" in log
    assert log.count(f"checkpoints/step-{stopped_at}\n") == 1  # not written twice when it was just saved
    assert not (run / "STOP").exists()  # an honoured request is consumed
    (run / "STOP").write_text("stale\n")  # left by a process that died before honouring it
    os.utime(run / "STOP", (time.time() - 3600, time.time() - 3600))
    resumed = _sdtune("train", str(cfg), "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert (run / "checkpoints" / f"step-{STEPS}" / "state.json").is_file()
    assert not (run / "STOP").exists()  # the resumed run removed the stale request instead of stopping at once
