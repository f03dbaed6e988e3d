"""A full disk or a refused write, while a run writes its folder, as one line: what, how much, what is safe, what next.

Checkpoints are written under a temporary name and renamed (:func:`sdtune.core.atomic.atomic_dir`), so a write
that fails leaves the previous checkpoint intact and the run resumes from it once the disk has room again. This
module turns the error a writer raises (``OSError(ENOSPC)``, safetensors' ``SafetensorError ... No space left on
device``, torch's ``PytorchStreamWriter failed writing file``) into that one line.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sdtune.core.errors import TrainingError
from sdtune.train.rundir import RunDir

_FULL = {errno.ENOSPC, errno.EDQUOT} if hasattr(errno, "EDQUOT") else {errno.ENOSPC}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}
_FULL_TEXT = ("no space left on device", "storagefull", "disk quota exceeded", "code: 28,")
_DENIED_TEXT = ("permission denied", "permissiondenied", "read-only file system", "readonlyfilesystem")
_WRITE_FAILED_TEXT = ("file write failed", "pytorchstreamwriter failed writing")  # torch.save hides the errno


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in ``obj`` (nested dicts, lists and tuples): what writing it needs on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def disk_problem(exc: BaseException) -> str | None:
    """``"full"`` / ``"denied"`` / ``"failed"`` when ``exc`` is a refused or failed write, else None."""
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno in _FULL:
            return "full"
        if exc.errno in _DENIED:
            return "denied"
    text = str(exc).lower()
    if any(t in text for t in _FULL_TEXT):
        return "full"
    if any(t in text for t in _DENIED_TEXT):
        return "denied"
    if any(t in text for t in _WRITE_FAILED_TEXT):
        return "failed"
    return None


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            with contextlib.suppress(OSError):
                return shutil.disk_usage(folder).free
            return None
    return None


def failed_path(exc: BaseException, run: RunDir) -> Path:
    """The file an ``OSError`` names, else the run folder."""
    name = getattr(exc, "filename", None)
    return Path(name) if isinstance(name, (str, Path)) else run.root


class WriteGuard:
    """Knows what the loop is writing, so a failed write can be reported as one line."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.step = 0  # the step being trained, for the RunFailed event

    @contextlib.contextmanager
    def writing(self, what: str, dest: Path | None = None, need: int | None = None) -> Iterator[None]:
        """Around one write (``what``: "checkpoint step-40"; ``need``: estimated bytes): a disk error becomes one
        line (:class:`TrainingError`); any other error passes unchanged. Without ``dest``, the failing file's
        name (``OSError.filename``) or the run folder is shown."""
        try:
            yield
        except Exception as exc:
            if (error := self.error(exc, what, dest or failed_path(exc, self.run), need)) is not None:
                raise error from exc
            raise

    def error(self, exc: BaseException, what: str, dest: Path, need: int | None = None) -> TrainingError | None:
        """The one-line error for ``exc`` if it is a disk problem, else None."""
        problem = disk_problem(exc)
        if problem is None:
            return None
        free = _free_bytes(Path(dest))
        if problem == "failed" and need is not None and free is not None and free < need:
            problem = "full"  # torch.save says only "file write failed"; the free space tells why
        latest = self.run.latest_checkpoint()
        safe = f"the last good checkpoint is {latest.path} (intact)" if latest else "no checkpoint was written yet"
        resume = f"sdtune train {self.run.root}"
        if problem == "full":
            needs = f"it needs about {human_bytes(need)}, " if need else ""
            room = f"{human_bytes(free)} free there" if free is not None else "the disk is full"
            return TrainingError(
                f"disk full while writing {what} ({dest}): {needs}{room}; {safe}; free some space, "
                f"then resume: {resume}"
            )
        if problem == "denied":
            return TrainingError(
                f"permission denied while writing {what} ({dest}); {safe}; make {self.run.root} writable, "
                f"then resume: {resume}"
            )
        reason = " ".join(str(exc).split())[:200]
        return TrainingError(f"writing {what} ({dest}) failed: {reason}; {safe}; fix the disk, then resume: {resume}")
