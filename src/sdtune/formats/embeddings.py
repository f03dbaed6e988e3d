"""Textual-inversion embedding files: read and write the layouts AUTOMATIC1111, ComfyUI, InvokeAI, kohya and
diffusers use.

Layouts (one term per file; ``n`` vectors of the text encoder's width):

- A1111 ``.pt`` (``modules/textual_inversion/textual_inversion.py``, ``Embedding.save``): a pickled dict
  ``{"string_to_token": {"*": 265}, "string_to_param": {"*": [n, width]}, "name", "step", "sd_checkpoint",
  "sd_checkpoint_name"}``. The original textual_inversion repo (rinongal) stored ``string_to_param`` as an
  ``nn.ParameterDict``.
- kohya ``.safetensors`` (``train_textual_inversion.py``): ``{"emb_params": [n, width]}``; SDXL files hold
  ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` (A1111, ComfyUI and InvokeAI read both).
- diffusers concept (``examples/textual_inversion``, ``learned_embeds.safetensors``/``.bin``): ``{token: [n, width]}``
  (older files hold a 1-D ``[width]`` tensor).
- A PNG/WEBP with the A1111 dict embedded (see :mod:`sdtune.formats.png_embedding`).

Pickles are only ever read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdtune.core.atomic import atomic_path
from sdtune.core.errors import DataError, ModelError, SdtuneError
from sdtune.core.safe_load import load_torch_file
from sdtune.models.checkpoint_io import safetensors_header

SINGLE = "text_encoder"
SDXL_KEYS = ("clip_l", "clip_g")
# A1111 keeps the placeholder "*" with the id it has in CLIP's vocabulary, as the original TI repo wrote it.
A1111_STRING_TO_TOKEN = {"*": 265}
TORCH_SUFFIXES = (".pt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)
IMAGE_SUFFIXES = (".png", ".webp")
_NEITHER = (
    "neither a textual-inversion embedding nor a diffusers concept "
    "(expected string_to_param, emb_params, clip_l/clip_g or one tensor)"
)
# Embedding widths -> the model family they come from, for hints when an embedding does not fit a model.
_FAMILY_BY_WIDTHS = {(768,): "SD 1.x", (1024,): "SD 2.x", (768, 1280): "SDXL"}


@dataclass
class Embedding:
    """One textual-inversion term: its trigger word and ``[n_vectors, width]`` vectors per text encoder.

    Single-encoder models (SD 1.x/2.x, tiny test models) use the key ``"text_encoder"``; SDXL uses ``"clip_l"``
    and ``"clip_g"`` with the same number of vectors.
    """

    name: str
    vectors: dict[str, torch.Tensor]
    step: int = 0
    sd_checkpoint: str | None = None  # A1111: 10-hex short hash of the model it was trained on
    sd_checkpoint_name: str | None = None

    def __post_init__(self) -> None:
        _check_vectors(self.vectors, f"embedding {self.name!r}")

    @property
    def is_sdxl(self) -> bool:
        """True for a two-encoder (clip_l + clip_g) SDXL embedding."""
        return SDXL_KEYS[0] in self.vectors

    @property
    def num_vectors(self) -> int:
        """Vectors per token (rows of each tensor)."""
        return int(next(iter(self.vectors.values())).shape[0])

    @property
    def widths(self) -> tuple[int, ...]:
        """Vector width per text encoder: ``(w,)`` or ``(clip_l, clip_g)``."""
        keys = SDXL_KEYS if self.is_sdxl else (SINGLE,)
        return tuple(int(self.vectors[k].shape[1]) for k in keys)


def _check_vectors(vectors: Mapping[str, Any], where: str) -> None:
    if set(vectors) not in ({SINGLE}, set(SDXL_KEYS)):
        raise DataError(f"{where}: vectors must be keyed 'text_encoder' or 'clip_l'+'clip_g' (got {sorted(vectors)})")
    for key, vec in vectors.items():
        if not isinstance(vec, torch.Tensor) or vec.ndim != 2 or vec.shape[0] < 1:
            shape = tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__
            raise DataError(f"{where}: {key} must be a [n_vectors, width] tensor (got {shape})")
    rows = {int(v.shape[0]) for v in vectors.values()}
    if len(rows) > 1:
        raise DataError(f"{where}: clip_l and clip_g have different vector counts {sorted(rows)}; re-export it")


def _cpu(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # clone: a view would make torch.save write its whole storage and safetensors refuse shared storage.
    return t.detach().to(device="cpu", dtype=dtype).clone(memory_format=torch.contiguous_format)


def _single(emb: Embedding, where: str, fmt: str) -> torch.Tensor:
    if emb.is_sdxl:
        raise DataError(
            f"{where}: {fmt} holds one text encoder's vectors but {emb.name!r} is an SDXL embedding "
            "(clip_l + clip_g); save it as .safetensors with save_safetensors instead"
        )
    return emb.vectors[SINGLE]


def a1111_dict(emb: Embedding, dtype: torch.dtype = torch.float32, where: str = "") -> dict[str, Any]:
    """The dict A1111 pickles into ``.pt`` files and embeds in PNGs.

    Source: AUTOMATIC1111 ``modules/textual_inversion/textual_inversion.py`` (``Embedding.save``). Plain
    dicts/str/int/None/tensors only, so ``torch.load(weights_only=True)`` reads it.
    """
    vec = _cpu(_single(emb, where or f"embedding {emb.name!r}", "A1111's .pt/PNG format"), dtype)
    return {
        "string_to_token": dict(A1111_STRING_TO_TOKEN),
        "string_to_param": {"*": vec},
        "name": emb.name,
        "step": int(emb.step),
        "sd_checkpoint": emb.sd_checkpoint,
        "sd_checkpoint_name": emb.sd_checkpoint_name,
    }


def save_a1111_pt(emb: Embedding, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """Write an AUTOMATIC1111 ``.pt`` embedding atomically (format: A1111 ``textual_inversion.py``).

    SDXL embeddings have no A1111 ``.pt`` form: a :class:`DataError` suggests :func:`save_safetensors`.
    """
    data = a1111_dict(emb, dtype, where=str(path))
    with atomic_path(path) as tmp:
        torch.save(data, tmp)


def _metadata(emb: Embedding) -> dict[str, str]:
    meta = {"format": "pt", "name": emb.name, "step": str(int(emb.step))}
    if emb.sd_checkpoint is not None:
        meta["sd_checkpoint"] = emb.sd_checkpoint
    if emb.sd_checkpoint_name is not None:
        meta["sd_checkpoint_name"] = emb.sd_checkpoint_name
    return meta


def save_safetensors(emb: Embedding, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """Write the kohya/A1111/ComfyUI/InvokeAI safetensors embedding atomically.

    Single encoder: ``{"emb_params": [n, width]}`` (kohya ``train_textual_inversion.py``; diffusers reads it with
    ``load_textual_inversion(path, token=...)``). SDXL: ``{"clip_l", "clip_g"}`` (A1111 ``textual_inversion.py``,
    ComfyUI ``comfy/sd1_clip.py``). String metadata: ``name``, ``step``, ``sd_checkpoint[_name]``, ``format``.
    """
    if emb.is_sdxl:
        tensors = {k: _cpu(emb.vectors[k], dtype) for k in SDXL_KEYS}
    else:
        tensors = {"emb_params": _cpu(emb.vectors[SINGLE], dtype)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=_metadata(emb))


def save_diffusers(
    emb: Embedding, path: str | Path, token: str | None = None, dtype: torch.dtype = torch.float32
) -> None:
    """Write diffusers' ``learned_embeds.safetensors`` layout ``{token: [n, width]}`` atomically.

    Source: diffusers ``examples/textual_inversion/textual_inversion.py`` (``save_progress``). ``token`` defaults
    to the embedding's name; single-encoder embeddings only. Metadata as in :func:`save_safetensors`.
    """
    vec = _cpu(_single(emb, str(path), "the diffusers concept layout"), dtype)
    with atomic_path(path) as tmp:
        save_file({token or emb.name: vec}, str(tmp), metadata=_metadata(emb))


def _matrix(value: Any, where: str, key: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim not in (1, 2) or not value.is_floating_point():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise DataError(f"{where}: {key} is not a [n_vectors, width] float tensor (got {shape}); {_NEITHER}")
    vec = value.detach().to(device="cpu", dtype=torch.float32)
    return (vec.unsqueeze(0) if vec.ndim == 1 else vec).contiguous()  # old diffusers concepts are 1-D


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def embedding_from_dict(
    data: Any, source: str | Path, name: str | None = None, metadata: Mapping[str, str] | None = None
) -> Embedding:
    """Build an :class:`Embedding` from a loaded file's dict, detecting the layout as A1111 does.

    Order (A1111 ``textual_inversion.py`` ``create_embedding_from_data``): ``string_to_param`` (one term),
    ``clip_l`` + ``clip_g``, ``emb_params`` (kohya; A1111 reads it as a one-tensor dict), one tensor (diffusers).
    Name: ``name`` > the file's ``name`` field/metadata > the diffusers key > the file stem.
    """
    where, meta = str(source), dict(metadata or {})
    if not isinstance(data, Mapping):
        raise DataError(f"{where}: {_NEITHER}")
    key_name: str | None = None
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # rinongal's nn.ParameterDict
        if not isinstance(params, Mapping) or len(params) != 1:
            count = len(params) if isinstance(params, Mapping) else 0
            raise DataError(
                f"{where}: embedding file has multiple terms ({count} in string_to_param); "
                "sdtune reads files with exactly one, split it into one file per term"
            )
        vectors = {SINGLE: _matrix(next(iter(params.values())), where, "string_to_param")}
    elif all(k in data for k in SDXL_KEYS):
        vectors = {k: _matrix(data[k], where, k) for k in SDXL_KEYS}
    elif "emb_params" in data:
        vectors = {SINGLE: _matrix(data["emb_params"], where, "emb_params")}
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        key_name, tensor = next(iter(data.items()))
        vectors = {SINGLE: _matrix(tensor, where, repr(key_name))}
    else:
        raise DataError(f"{where}: {_NEITHER}")
    _check_vectors(vectors, where)

    def field(key: str) -> Any:
        value = data.get(key)
        return meta.get(key) if value is None or isinstance(value, torch.Tensor) else value

    file_name = field("name")
    try:
        step = int(field("step") or 0)
    except (TypeError, ValueError):
        step = 0  # a broken step counter is not worth refusing the vectors for
    return Embedding(
        name=name or _opt_str(file_name) or _opt_str(key_name) or Path(where).stem,
        vectors=vectors,
        step=step,
        sd_checkpoint=_opt_str(field("sd_checkpoint")),
        sd_checkpoint_name=_opt_str(field("sd_checkpoint_name")),
    )


def _torch_load(path: Path) -> Any:
    # The original TI repo pickled an nn.ParameterDict: allowing that one class is safe, its contents still
    # go through the weights-only unpickler, which refuses anything but tensors and containers.
    return load_torch_file(path, DataError, "embedding file", allowed_globals=[torch.nn.ParameterDict])


def _safetensors_load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        safetensors_header(path)  # one-line errors for renamed text files and truncated downloads
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except SdtuneError as exc:
        raise DataError(str(exc)) from None
    except Exception as exc:  # the Rust parser raises its own error types
        raise DataError(f"{path}: unreadable safetensors file ({exc}); re-download or re-export it") from None


def load_embedding(path: str | Path, name: str | None = None) -> Embedding:
    """Read an embedding from ``.pt``/``.bin`` (weights-only), ``.safetensors``, ``.png`` or ``.webp``.

    Layout detection follows AUTOMATIC1111 ``modules/textual_inversion/textual_inversion.py``
    (``load_from_file``); see :func:`embedding_from_dict`. Vectors come back as float32 ``[n, width]``.
    Every failure is a one-line :class:`DataError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such embedding file")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        from sdtune.formats.png_embedding import read_png_embedding  # lazy: that module imports this one

        emb = read_png_embedding(path, name=name)
        if emb is None:
            raise DataError(f"{path}: image holds no embedding (no sd-ti-embedding chunk or pixel payload)")
        return emb
    if suffix in TORCH_SUFFIXES:
        return embedding_from_dict(_torch_load(path), path, name)
    if suffix in SAFETENSORS_SUFFIXES:
        tensors, metadata = _safetensors_load(path)
        return embedding_from_dict(tensors, path, name, metadata)
    raise DataError(f"{path}: unknown embedding file type {suffix!r}; expected .pt, .bin, .safetensors, .png or .webp")


def check_width(emb: Embedding, widths: tuple[int, ...], path_or_name: str | Path) -> None:
    """Raise a one-line :class:`ModelError` unless ``emb`` fits text encoders of ``widths``.

    ``widths`` is the model's text-encoder widths in order (``(768,)`` SD 1.x, ``(1024,)`` SD 2.x,
    ``(768, 1280)`` SDXL; tiny test models are narrower).
    """
    have, want = emb.widths, tuple(int(w) for w in widths)
    if have == want:
        return
    family = _FAMILY_BY_WIDTHS.get(have)
    hint = f" ({family}?)" if family else ""
    noun, verb = ("width", "does") if len(have) == 1 else ("widths", "do")
    encoder = "text encoder" if len(want) == 1 else "text encoders"
    raise ModelError(
        f"{path_or_name}: embedding {noun} {'+'.join(map(str, have))} {verb} not match this model's {encoder} "
        f"({'+'.join(map(str, want))}); it was made for another model family{hint}"
    )
