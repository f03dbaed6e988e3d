"""Reading and writing single-file checkpoints, safely.

``.safetensors`` files are checked (header length, JSON header, data extent) before they are opened, so a
renamed text file or a truncated download gives a one-line error instead of a parser traceback.
``.ckpt``/``.pt``/``.bin`` files are pickles: they are read only with ``torch.load(weights_only=True)``,
which refuses any pickle that would import or call code.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdtune.core.atomic import atomic_path
from sdtune.core.errors import ModelError
from sdtune.core.safe_load import load_torch_file

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def safetensors_header(path: str | Path) -> tuple[dict, int]:
    """Return (header dict, header length) of a safetensors file after checking it is one and is whole."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > min(size - 8, 100 * 1024 * 1024):
            raise ModelError(f"{path}: not a safetensors file (bad header length); expected a .safetensors checkpoint")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(
            f"{path}: not a safetensors file (header is not JSON); expected a .safetensors checkpoint"
        ) from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: not a safetensors file (header is not a JSON object)")
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ModelError(
            f"{path}: truncated safetensors file ({size} bytes, header promises {8 + n + end}); re-download it"
        )
    return header, n


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` string map of a safetensors file (empty for pickles)."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {}
    header, _ = safetensors_header(path)
    return dict(header.get("__metadata__") or {})


def read_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes, without reading tensor data where the format allows it."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        header, _ = safetensors_header(path)
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    return {k: tuple(v.shape) for k, v in read_state_dict(path).items()}


def read_state_dict(path: str | Path, *, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read all tensors of a single-file checkpoint (safetensors, or a pickle loaded weights-only)."""
    return read_checkpoint(path, device=device)[0]


def read_checkpoint(path: str | Path, *, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read (tensors, string metadata) of a single-file checkpoint in one pass."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        header, _ = safetensors_header(path)
        try:
            with safe_open(str(path), framework="pt", device=device) as fh:
                return {k: fh.get_tensor(k) for k in fh.keys()}, dict(header.get("__metadata__") or {})
        except Exception as exc:  # the Rust parser raises its own error types
            raise ModelError(f"{path}: unreadable safetensors file ({exc}); re-download it") from None
    if suffix in PICKLE_SUFFIXES:
        return _read_pickle(path, device)
    raise ModelError(f"{path}: unknown checkpoint type '{suffix}'; expected .safetensors, .ckpt, .pt or .bin")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class LazyTensors(Mapping):
    """The tensors of a (checked) safetensors file, each read from disk when asked for (``shape(key)`` from the
    header without reading), so a loader can convert one component at a time instead of holding the whole file.

    Tensors are read with plain file reads into memory they own, not through a memory map: a mapped file's pages
    count in the process's resident memory as they are touched, which would make the peak while loading the
    file's size plus its converted copy."""

    def __init__(self, path: Path, header: dict, header_length: int) -> None:
        self.path, self._base = path, 8 + header_length
        self._entries = {k: v for k, v in header.items() if k != "__metadata__"}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ModelError(f"{self.path}: tensor {key} has an unknown dtype {entry['dtype']}")
        start, end = (int(x) for x in entry["data_offsets"])
        data = bytearray(end - start)
        with open(self.path, "rb") as fh:
            fh.seek(self._base + start)
            if fh.readinto(data) != end - start:
                raise ModelError(f"{self.path}: truncated tensor {key}; re-download the file")
        if not data:
            return torch.empty(self.shape(key), dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(self.shape(key))

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def open_checkpoint(path: str | Path) -> tuple[Mapping[str, torch.Tensor], dict[str, str]]:
    """(tensors, string metadata) of a single-file checkpoint: a :class:`LazyTensors` for safetensors (read per
    tensor on access), a dict for pickles (which can only be read whole, weights-only)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        header, length = safetensors_header(path)
        return LazyTensors(path, header, length), dict(header.get("__metadata__") or {})
    return read_checkpoint(path)


def _read_pickle(path: Path, device: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    obj = load_torch_file(path, ModelError, "checkpoint")
    if not isinstance(obj, Mapping):
        raise ModelError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    meta = obj.get("sdtune_metadata")
    metadata = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, Mapping) else {}
    if isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # the LDM / A1111 .ckpt wrapper
    return {k: v.to(device) for k, v in obj.items() if isinstance(v, torch.Tensor)}, metadata


def write_state_dict(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write tensors atomically: safetensors with string metadata, or an A1111-style ``.ckpt`` dict."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix in SAFETENSORS_SUFFIXES:
            save_file(tensors, str(tmp), metadata=dict(metadata or {}))
        elif suffix in PICKLE_SUFFIXES:
            # .ckpt has no metadata slot; the strings ride along in the dict (weights_only-loadable).
            torch.save({"state_dict": tensors, "sdtune_metadata": dict(metadata or {})}, tmp)
        else:
            raise ModelError(f"{path}: unknown checkpoint type '{suffix}'; use .safetensors or .ckpt")
