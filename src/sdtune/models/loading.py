"""Loading and saving any supported model: the entry points other layers call.

``load_model`` accepts a diffusers folder, a single-file ``.safetensors`` / ``.ckpt``, or ``builtin``
(sdtune's own tiny base model) and returns :class:`~sdtune.models.components.SDComponents`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from sdtune.core.errors import ModelError
from sdtune.models.checkpoint_io import SAFETENSORS_SUFFIXES, read_metadata
from sdtune.models.components import TEXT_ENCODER_NAMES, ComponentDtypes, SDComponents
from sdtune.models.family import Detection, ModelFamily, Prediction, detect_diffusers_folder
from sdtune.models.folder import load_diffusers_folder, save_diffusers_folder
from sdtune.models.shipped import shipped_configs
from sdtune.models.single_file import detect_single_file, load_single_file, save_single_file


def resolve_path(path: str | Path) -> Path:
    """The filesystem path of a model reference (``builtin`` names sdtune's shipped base model)."""
    if str(path) == "builtin":
        from sdtune.models.builtin import builtin_path

        return builtin_path()
    return Path(path).expanduser()


def detect(path: str | Path) -> Detection:
    """Decide the family and layout of a model path without loading its weights."""
    path = resolve_path(path)
    if path.is_dir():
        return detect_diffusers_folder(path)
    if path.is_file():
        return detect_single_file(path)
    raise ModelError(f"{path}: no such file or folder; give a diffusers folder, a .safetensors/.ckpt file or 'builtin'")


def model_configs(path: str | Path) -> tuple[ModelFamily, dict[str, dict]]:
    """The family and component configs of a model path, from its configs and header only (no weights read):
    what :func:`load_model` would build (a folder's own configs; a single file's recorded or shipped ones)."""
    path = resolve_path(path)
    family = detect(path).family
    if path.is_dir():
        configs = {}
        for name in ("unet", "vae", *TEXT_ENCODER_NAMES[: family.num_text_encoders]):
            configs[name] = json.loads((path / name / "config.json").read_text(encoding="utf-8"))
        return family, configs
    metadata = read_metadata(path) if path.suffix.lower() in SAFETENSORS_SUFFIXES else {}
    configs = json.loads(metadata["sdtune.configs"]) if "sdtune.configs" in metadata else shipped_configs(family)
    return family, {k: v for k, v in configs.items() if k != "scheduler"}


def load_model(
    path: str | Path,
    *,
    prediction_type: Prediction | Literal["auto"] = "auto",
    dtype: ComponentDtypes = torch.float32,
) -> SDComponents:
    """Load a model offline; ``prediction_type`` overrides what detection found; ``dtype`` is one precision for
    every component or one per component name (``{"unet": torch.bfloat16, ...}``; ``None`` = as stored)."""
    path = resolve_path(path)
    family = detect(path).family
    if prediction_type != "auto":
        family = dataclasses.replace(family, prediction_type=prediction_type)
    if path.is_dir():
        return load_diffusers_folder(path, family=family, dtype=dtype)
    components = load_single_file(path, family=family, dtype=dtype)
    return components


def save_model(
    components: SDComponents,
    dest: str | Path,
    *,
    layout: Literal["diffusers", "single_file"] = "single_file",
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
    only: Sequence[str] | None = None,
) -> Path:
    """Save as a diffusers folder or as one original-layout file (``.safetensors`` or ``.ckpt``).

    ``only`` (component names, e.g. ``["unet"]``) saves just those components: a partial folder or file.
    """
    dest = Path(dest)
    if layout == "diffusers":
        return save_diffusers_folder(components, dest, dtype=dtype, overwrite=overwrite, only=only)
    if dest.exists() and not overwrite:
        raise ModelError(f"{dest}: already exists; choose another output path or allow overwriting")
    return save_single_file(components, dest, dtype=dtype, only=only)


__all__ = ["ModelFamily", "detect", "load_model", "resolve_path", "save_model"]
