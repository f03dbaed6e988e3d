"""Checkpoint folders on disk: replacing one never leaves a moment with neither copy, and what a killed writer left
(``.step-N.*`` temp folders, an old folder renamed aside, temp files) is cleaned up or restored on the next start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdtune.core import atomic
from sdtune.core.atomic import atomic_dir, recover_interrupted_writes
from sdtune.train.rundir import RunDir


def _save(run: RunDir, step: int, value: float) -> None:
    run.save_checkpoint(step, {"w": torch.full((3,), value)}, {"state": {}}, {"step": step}, {"torch": torch.ones(1)})


def _complete_copies(folder: Path) -> list[tuple[str, float]]:
    """Every folder (visible or aside) under ``folder`` that holds a complete checkpoint, with its weight."""
    from safetensors.torch import load_file

    found = []
    for path in folder.iterdir():
        if (path / "state.json").is_file() and (path / "trainable.safetensors").is_file():
            found.append((path.name, float(load_file(path / "trainable.safetensors")["w"][0])))
    return found


def test_replacing_a_checkpoint_always_keeps_a_complete_copy(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    _save(run, 4, 1.0)
    seen: list[list[tuple[str, float]]] = []
    real_rename = Path.rename

    def watched_rename(self, target):
        seen.append(_complete_copies(run.checkpoints))
        result = real_rename(self, target)
        seen.append(_complete_copies(run.checkpoints))
        return result

    monkeypatch.setattr(Path, "rename", watched_rename)
    _save(run, 4, 2.0)
    assert seen and all(copies for copies in seen)  # at every rename, a complete copy was on disk
    assert _complete_copies(run.checkpoints) == [("step-4", 2.0)]  # the new one, and nothing else left
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-4"]


def test_a_failed_swap_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    _save(run, 4, 1.0)
    real_rename = Path.rename

    def failing_rename(self, target):
        if self.name.startswith(".step-4.") and ".old." not in self.name:  # moving the new one in
            raise OSError(5, "Input/output error")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError):
        _save(run, 4, 2.0)
    monkeypatch.undo()
    assert _complete_copies(run.checkpoints) == [("step-4", 1.0)]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-4"]


_DIE_MID_WRITE = """
import os, sys
from pathlib import Path
from sdtune.core.atomic import atomic_dir, atomic_path
dest = Path(sys.argv[1])
with atomic_path(dest.parent.parent / "metrics.jsonl") as tmp:
    tmp.write_text("half a line")
    with atomic_dir(dest) as folder:
        (folder / "trainable.safetensors").write_bytes(b"half a file")
        os._exit(9)  # killed mid-write: no cleanup runs
"""


def test_what_a_killed_writer_left_is_removed_and_an_aside_copy_restored(tmp_path):
    run = RunDir(tmp_path / "run")
    _save(run, 2, 1.0)
    proc = subprocess.run([sys.executable, "-c", _DIE_MID_WRITE, str(run.checkpoints / "step-4")], timeout=60)
    assert proc.returncode == 9
    left = sorted(p.name for p in run.checkpoints.iterdir())
    assert len(left) == 2 and left[0].startswith(".step-4.")  # the half-written temp folder is there
    assert any(p.name.startswith(".metrics.jsonl.") for p in run.root.iterdir())
    # A swap killed between its two renames: the old step-6 renamed aside, the new one never moved in.
    _save(run, 6, 3.0)
    (run.checkpoints / "step-6").rename(run.checkpoints / ".step-6.old.0123abcd")
    # And one killed after both renames, before deleting the old copy.
    _save(run, 8, 4.0)
    _save(run, 9, 0.0)
    (run.checkpoints / "step-9").rename(run.checkpoints / ".step-8.old.89abcdef")

    actions = run.recover()
    assert len(actions) == 4, actions
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-2", "step-6", "step-8"]
    assert dict(_complete_copies(run.checkpoints)) == {"step-2": 1.0, "step-6": 3.0, "step-8": 4.0}
    assert not any(p.name.startswith(".") for p in run.root.iterdir() if p.is_file())
    assert run.latest_checkpoint().step == 8
    assert recover_interrupted_writes(run.root) == []  # nothing left to do


def test_recovery_leaves_other_files_alone(tmp_path):
    keep = [tmp_path / ".lock", tmp_path / "STOP", tmp_path / ".hidden", tmp_path / "x.tmp", tmp_path / ".a.b.tmp"]
    for path in keep:
        path.write_text("x")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    assert recover_interrupted_writes(tmp_path) == []
    assert all(p.exists() for p in keep) and (tmp_path / ".ipynb_checkpoints").is_dir()


def test_atomic_dir_names_match_what_recovery_looks_for(tmp_path):
    # The patterns are tied to tempfile's names: check them against a real temporary folder and file.
    with atomic_dir(tmp_path / "step-1") as folder:
        assert atomic._TEMP_DIR.match(folder.name)
    with atomic.atomic_path(tmp_path / "f.json") as tmp:
        assert atomic._TEMP_FILE.match(tmp.name)
