"""The hashes Stable Diffusion UIs show for model files.

- AUTOMATIC1111 "model hash": sha256 of the whole file; the UI shows the first 10 hex digits
  (``modules/hashes.py``), and infotext writes ``Model hash: <10 hex>``.
- A1111 legacy model hash: sha256 of 64 KiB read at offset 1 MiB, first 8 hex digits
  (``modules/sd_models.py`` ``model_hash``; collides easily, kept for old infotexts).
- kohya "addnet" hash (``sshs_model_hash``, used in ``Lora hashes:``): sha256 of a safetensors file's
  tensor payload only, i.e. after the 8-byte header length and the JSON header, so editing metadata does
  not change it.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: str | Path, offset: int = 0) -> str:
    """Hex sha256 of a file's bytes from ``offset`` to the end."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset)
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def a1111_short_hash(path: str | Path) -> str:
    """The 10-hex hash A1111 shows for a checkpoint (first 10 of the file's sha256)."""
    return sha256_file(path)[:10]


def a1111_legacy_hash(path: str | Path) -> str:
    """A1111's old 8-hex model hash: sha256 of 0x10000 bytes at offset 0x100000."""
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]


def addnet_hash(path: str | Path) -> str:
    """kohya's sshs_model_hash of a safetensors file: sha256 of the bytes after the header."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    return sha256_file(path, offset=8 + n)
