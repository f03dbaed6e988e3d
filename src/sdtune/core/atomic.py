"""Atomic file writes: a crash never leaves a half-written file.

Everything sdtune writes goes to a temporary file in the same folder and is then renamed over the
destination (``os.replace`` is atomic on POSIX and Windows when both paths are on one filesystem).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it replaces ``dest``, on error it is removed.

    Use it for writers that want a path (``safetensors.torch.save_file``, ``PIL.Image.save``)::

        with atomic_path(out) as tmp:
            save_file(tensors, tmp)
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes(dest: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``dest`` atomically (fsync before the rename)."""
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def write_text(dest: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``dest`` atomically."""
    write_bytes(dest, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder next to ``dest``; on success it replaces ``dest`` (renamed), on error it is removed.

    Readers see the old folder or the new one, never a half-written one. Replacing an existing ``dest`` renames it
    aside first (``.<name>.old.<id>``), renames the new one in, then deletes the old: at every moment one complete
    copy is on disk, and :func:`recover_interrupted_writes` puts the old one back if a crash came between the renames.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            aside = dest.with_name(f".{dest.name}.old.{uuid.uuid4().hex[:8]}")
            dest.rename(aside)
            try:
                tmp.rename(dest)
            except BaseException:
                aside.rename(dest)  # the old one goes back
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# The names the writers above leave behind when a process dies mid-write (mkstemp / mkdtemp add 8 characters).
_ASIDE_DIR = re.compile(r"^\.(?P<name>.+)\.old\.[0-9a-f]{8}$")
_TEMP_DIR = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}$")
_TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


def recover_interrupted_writes(root: str | os.PathLike[str]) -> list[str]:
    """Undo what a killed writer left under ``root``; return one line per action (for a log).

    Temporary files and folders of :func:`atomic_path` / :func:`atomic_dir` are deleted; an old folder renamed
    aside is restored when its replacement never arrived and deleted when it did. Only the process that owns
    ``root`` may call it (another one's writes in progress would look the same).
    """
    actions: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in sorted(dirnames):
            path = here / name
            if match := _ASIDE_DIR.match(name):
                target = here / match["name"]
                if target.exists():
                    shutil.rmtree(path, ignore_errors=True)
                    actions.append(f"removed {path} (replaced by {target})")
                else:
                    path.rename(target)
                    actions.append(f"restored {target} (its replacement was never written)")
                dirnames.remove(name)
            elif _TEMP_DIR.match(name):
                shutil.rmtree(path, ignore_errors=True)
                actions.append(f"removed {path} (written partly by a process that stopped)")
                dirnames.remove(name)
        for name in filenames:
            if _TEMP_FILE.match(name):
                with contextlib.suppress(FileNotFoundError):
                    (here / name).unlink()
                    actions.append(f"removed {here / name} (written partly by a process that stopped)")
    return actions
