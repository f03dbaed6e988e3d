"""A disk that fills (or a folder that refuses writes) while a run writes is one line: what was being written, the
space it needs, the last good checkpoint and how to resume; the previous checkpoint stays intact and resumable."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from safetensors import SafetensorError
from tests.methods.run_configs import sdtune_in_process, ti_run_config

import sdtune.train.rundir as rundir_module
from sdtune.train.rundir import RunDir


def _config(tmp_path: Path, model: Path, data: Path, max_steps: int = 4) -> Path:
    return ti_run_config(tmp_path, model, data, name="full", max_steps=max_steps, seed=2, num_vectors=2)


STORAGE_FULL = (
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
)


def _one_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _full_on_checkpoint(step: int, raise_error):
    """Wrap safetensors' writer in rundir so that writing checkpoint ``step`` fails like a full disk."""
    real = rundir_module.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if f".step-{step}." in str(filename):
            Path(filename).write_bytes(b"\0" * 10)  # the disk took a part of it
            raise_error()
        return real(tensors, filename, *args, **kwargs)

    return save_file


def _raise_safetensors():
    raise SafetensorError(STORAGE_FULL)


def _raise_enospc():
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("raise_error", [_raise_safetensors, _raise_enospc], ids=["SafetensorError", "ENOSPC"])
def test_disk_full_during_a_checkpoint_is_one_line_and_the_last_checkpoint_resumes(
    tmp_path, tiny_checkpoint, image_folder, monkeypatch, capsys, raise_error
):
    cfg = _config(tmp_path, tiny_checkpoint("sd1"), image_folder)
    root = tmp_path / "runs" / "full"
    monkeypatch.setattr(rundir_module, "save_file", _full_on_checkpoint(4, raise_error))
    code, _, err = sdtune_in_process(monkeypatch, capsys, "train", str(cfg))
    line = _one_line(code, err)
    good = root / "checkpoints" / "step-2"
    assert "disk full while writing checkpoint step-4" in line
    assert "it needs about " in line and " free there" in line  # the estimate from the tensors being written
    assert f"the last good checkpoint is {good} (intact)" in line
    assert line.endswith(f"then resume: sdtune train {root}")
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["step-2"]  # no half checkpoint left
    kept = _files(good)
    assert line.removeprefix("error: ") in (root / "events.log").read_text()

    monkeypatch.undo()  # space freed: the command it printed resumes from the intact checkpoint
    code, out, err = sdtune_in_process(monkeypatch, capsys, "train", str(root))
    assert code == 0, err
    assert f"resumed from {good} at step 2" in (root / "events.log").read_text()
    assert RunDir(root).latest_checkpoint().step == 4
    steps = [json.loads(row)["step"] for row in (root / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert _files(good) == kept  # the intact checkpoint was not rewritten


def test_disk_full_while_logging_metrics_is_one_line(tmp_path, tiny_checkpoint, image_folder, monkeypatch, capsys):
    cfg = _config(tmp_path, tiny_checkpoint("sd1"), image_folder)
    root = tmp_path / "runs" / "full"
    real = RunDir.append_metrics

    def append_metrics(self, row):
        if row["step"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.metrics_path))
        return real(self, row)

    monkeypatch.setattr(RunDir, "append_metrics", append_metrics)
    code, _, err = sdtune_in_process(monkeypatch, capsys, "train", str(cfg))
    line = _one_line(code, err)
    assert f"disk full while writing the run folder ({root / 'metrics.jsonl'})" in line
    assert f"the last good checkpoint is {root / 'checkpoints' / 'step-2'} (intact)" in line


def test_disk_full_while_the_run_folder_is_set_up_is_one_line(tmp_path, image_folder, monkeypatch, capsys):
    cfg = _config(tmp_path, Path("builtin"), image_folder)

    def create(self, config_yaml):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.config_path))

    monkeypatch.setattr(RunDir, "create", create)
    code, _, err = sdtune_in_process(monkeypatch, capsys, "train", str(cfg))
    line = _one_line(code, err)
    root = tmp_path / "runs" / "full"
    assert f"disk full while writing the run folder ({root / 'config.yaml'})" in line
    assert "no checkpoint was written yet" in line and line.endswith(f"then resume: sdtune train {root}")


def test_a_run_folder_that_cannot_be_written_is_one_line_before_anything_starts(
    tmp_path, tiny_checkpoint, image_folder, monkeypatch, capsys
):
    cfg = _config(tmp_path, tiny_checkpoint("sd1"), image_folder)
    root = tmp_path / "runs" / "full"
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # the run folder refuses new files (as a read-only mount would)
        if dir is not None and Path(dir) == root:
            raise PermissionError(errno.EACCES, "Permission denied", str(root))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    code, _, err = sdtune_in_process(monkeypatch, capsys, "train", str(cfg))
    line = _one_line(code, err)
    assert f"output_dir: cannot write the run folder {root} (Permission denied)" in line
    assert sorted(p.name for p in root.iterdir()) == []  # refused before the lock, config or anything else


_DIE_MID_CHECKPOINT = """
import os, sys
from pathlib import Path
from sdtune.core.atomic import atomic_dir
with atomic_dir(Path(sys.argv[1])) as folder:
    (folder / "trainable.safetensors").write_bytes(b"half a file")
    os._exit(9)
"""


def test_a_checkpoint_killed_mid_write_is_cleaned_up_on_the_next_start(
    tmp_path, tiny_checkpoint, image_folder, monkeypatch, capsys
):
    cfg = _config(tmp_path, tiny_checkpoint("sd1"), image_folder, max_steps=2)
    root = tmp_path / "runs" / "full"
    assert sdtune_in_process(monkeypatch, capsys, "train", str(cfg))[0] == 0
    killed = subprocess.run([sys.executable, "-c", _DIE_MID_CHECKPOINT, str(root / "checkpoints" / "step-4")])
    assert killed.returncode == 9
    (partial,) = [p for p in (root / "checkpoints").iterdir() if p.name.startswith(".step-4.")]
    code, _, err = sdtune_in_process(monkeypatch, capsys, "train", str(root), "--set", "train.max_steps=4")
    assert code == 0, err
    assert not partial.exists()
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert f"removed {partial}" in (root / "events.log").read_text()
