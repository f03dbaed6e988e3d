"""Which write failures count as a full disk or a refused write, and what the one line says."""

from __future__ import annotations

import errno

import pytest
import torch
from safetensors import SafetensorError

from sdtune.core.errors import TrainingError
from sdtune.train.disk_errors import WriteGuard, disk_problem, human_bytes, tensor_bytes
from sdtune.train.rundir import RunDir


@pytest.mark.parametrize(
    ("exc", "problem"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "full"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "full"),
        (SafetensorError('IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'), "full"),
        (PermissionError(errno.EACCES, "Permission denied"), "denied"),
        (OSError(errno.EROFS, "Read-only file system"), "denied"),
        (RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file"), "failed"),
        (OSError(errno.EIO, "Input/output error"), None),
        (ValueError("bad value"), None),
        (FileNotFoundError(errno.ENOENT, "No such file or directory"), None),
    ],
)
def test_disk_problem_classifies_write_errors(exc, problem):
    assert disk_problem(exc) == problem


def test_tensor_bytes_counts_nested_state():
    state = {"a": torch.zeros(10, dtype=torch.float32), "b": [torch.zeros(4, dtype=torch.float16), {"c": 3}]}
    assert tensor_bytes(state) == 10 * 4 + 4 * 2
    assert human_bytes(999) == "999 B" and human_bytes(12_345_678) == "12.3 MB"


def test_the_line_names_what_how_much_the_last_checkpoint_and_the_resume(tmp_path):
    run = RunDir(tmp_path / "run")
    run.save_checkpoint(2, {"w": torch.ones(2)}, {"state": {}}, {"step": 2}, {"torch": torch.ones(1)})
    guard = WriteGuard(run)
    with pytest.raises(TrainingError) as info:
        with guard.writing("checkpoint step-4", run.checkpoints / "step-4", need=2 * 10**14):
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"disk full while writing checkpoint step-4 ({run.checkpoints / 'step-4'})")
    assert "it needs about 200.0 TB" in message  # torch.save hid the errno; the free space tells
    assert f"the last good checkpoint is {run.checkpoints / 'step-2'} (intact)" in message
    assert message.endswith(f"then resume: sdtune train {run.root}")
    with pytest.raises(ValueError):  # anything else passes unchanged
        with guard.writing("metrics", run.metrics_path):
            raise ValueError("not a disk problem")
