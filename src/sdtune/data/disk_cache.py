"""Disk caches of encoder outputs (VAE latents, text-encoder states), reused across runs.

Storage: one ``.safetensors`` file per key under ``<data.cache_dir>/<kind>/<key[:2]>/<key>.safetensors``. Keys are
SHA-256 digests of everything the stored tensors depend on, so a file is reused exactly when nothing changed and a
changed input simply misses (stale files are never read; delete the folder to reclaim space). The two-character
shards keep folders small (30,000 images -> ~120 files per folder). Writes are atomic (temporary file + rename),
so a killed run never leaves a half file that a later run would read; an unreadable file counts as a miss.

What goes into a key is decided where the inputs are known: :func:`latent_key` (image bytes, crop, resolution,
mirroring, VAE identity) and :func:`text_encoder_identity` (encoder weights, tokenizer, family). Model identity is
:func:`module_fingerprint`: the config plus every parameter's name, shape, dtype and a strided sample of its values
(cheap even for real-size models, and any fine-tune changes the sampled values).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sdtune.core.atomic import atomic_path

# Bump when the meaning of stored tensors changes (e.g. a new crop rule), so old files stop matching.
LATENT_FORMAT = "sdtune-latent-posterior-v1"
TEXT_FORMAT = "sdtune-text-states-v1"
_SAMPLES_PER_TENSOR = 32


def digest(*parts: Any) -> str:
    """SHA-256 hex of ``parts`` (strings, numbers, bytes), each length-prefixed so no two tuples collide."""
    h = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (its content identity: renaming or touching it changes nothing)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _config_json(module: Any) -> str:
    config = getattr(module, "config", None)
    if config is None:
        return ""
    if hasattr(config, "to_dict"):  # transformers configs
        config = config.to_dict()
    try:
        return json.dumps(dict(config), sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(config)


def module_fingerprint(modules: Iterable[torch.nn.Module]) -> str:
    """Identity of one or more modules: class, config and, per parameter/buffer, name, shape, dtype and a strided
    sample of its values. Reads a few dozen numbers per tensor, so it is cheap for real-size models."""
    parts: list[Any] = []
    with torch.no_grad():
        for module in modules:
            parts += [type(module).__name__, _config_json(module)]
            for name, tensor in module.state_dict().items():
                flat = tensor.detach().reshape(-1)
                step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
                sample = flat[::step][:_SAMPLES_PER_TENSOR].float().cpu().numpy().tobytes()
                parts += [name, tuple(tensor.shape), str(tensor.dtype), sample]
    return digest(*parts)


class DiskCache:
    """Tensors by key in sharded ``.safetensors`` files under ``root``; counts reads that hit and files written."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.hits = 0
        self.writes = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The tensors stored under ``key``, or ``None`` (missing or unreadable: the caller recomputes them)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError):
            return None
        self.hits += 1
        return tensors

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store ``tensors`` (CPU copies, contiguous) under ``key``, atomically."""
        with atomic_path(self.path(key)) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        self.writes += 1


# -- latents --------------------------------------------------------------------------------------------------


def latent_key(content: str, resolution: int | tuple[int, int], mirrored: bool, vae_identity: str) -> str:
    """Key of one image's VAE posterior: image bytes, the loader's crop rule, size (a square side, or a bucket's
    ``(width, height)``), mirroring and the VAE."""
    if isinstance(resolution, int):
        rule, size = "square-centre-crop", resolution
    else:
        rule, size = "bucket-centre-crop", f"{resolution[0]}x{resolution[1]}"
    return digest(LATENT_FORMAT, content, rule, size, "mirrored" if mirrored else "", vae_identity)


# -- text-encoder outputs ---------------------------------------------------------------------------------------


def _tokenizer_identity(tokenizer: Any) -> str:
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return digest(
        type(tokenizer).__name__,
        len(tokenizer),
        getattr(tokenizer, "model_max_length", ""),
        getattr(tokenizer, "pad_token", ""),
        json.dumps(sorted(vocab.items())),
    )


def text_encoder_identity(encoders: Sequence[torch.nn.Module], tokenizers: Sequence[Any], family: str) -> str:
    """Identity of a model's prompt encoding: text-encoder weights, tokenizers and the family (which decides which
    hidden states are used)."""
    return digest(TEXT_FORMAT, family, module_fingerprint(encoders), *(_tokenizer_identity(t) for t in tokenizers))


class DiskTextStore:
    """A prompt -> ``(context, pooled | None)`` mapping kept on disk: the store of
    :class:`sdtune.models.text_encoding.TextCache` when ``data.cache_dir`` is set. Entries read once stay in memory.
    """

    def __init__(self, cache_dir: str | Path, identity: str) -> None:
        self.disk = DiskCache(Path(cache_dir) / "text")
        self.identity = identity
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _key(self, prompt: str) -> str:
        return digest(self.identity, prompt)

    def __contains__(self, prompt: object) -> bool:
        if not isinstance(prompt, str):
            return False
        if prompt in self.memory:
            return True
        stored = self.disk.get(self._key(prompt))
        if stored is None:
            return False
        self.memory[prompt] = (stored["context"], stored.get("pooled"))
        return True

    def __getitem__(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if prompt not in self:
            raise KeyError(prompt)
        return self.memory[prompt]

    def __setitem__(self, prompt: str, value: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        context, pooled = value
        tensors = {"context": context} | ({"pooled": pooled} if pooled is not None else {})
        self.disk.put(self._key(prompt), tensors)
        self.memory[prompt] = (context, pooled)

    def __len__(self) -> int:
        return len(self.memory)


def text_store(
    cache_dir: str | Path | None, encoders: Sequence[torch.nn.Module], tokenizers: Sequence[Any], family: str
) -> DiskTextStore | None:
    """The disk store for a model's prompt encodings under ``cache_dir`` (``None`` when no cache folder is set)."""
    if not cache_dir:
        return None
    return DiskTextStore(cache_dir, text_encoder_identity(encoders, tokenizers, family))
