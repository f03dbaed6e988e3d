"""diffusers pipeline folders: ``model_index.json`` plus one sub-folder per component.

Loaded component by component with ``local_files_only=True`` (no hub access), and written the same way
(config + safetensors per component) so the live modules are never cast in place when saving in half
precision. The folder is written under a temporary name and renamed, so a crash leaves no half folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sdtune.core.atomic import atomic_dir
from sdtune.core.errors import ModelError
from sdtune.models.components import (
    TEXT_ENCODER_NAMES,
    TOKENIZER_NAMES,
    ComponentDtypes,
    SDComponents,
    component_dtype,
)
from sdtune.models.family import ModelFamily, detect_diffusers_folder
from sdtune.models.ldm_keys import canonical_clip_key
from sdtune.models.shipped import config_dir
from sdtune.models.tokenizers import load_tokenizer

_WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors"}


def load_diffusers_folder(
    path: str | Path, *, family: ModelFamily | None = None, dtype: ComponentDtypes = torch.float32
) -> SDComponents:
    """Load a diffusers pipeline folder offline (``dtype``: one for all, or one per component name)."""
    path = Path(path)
    detection = detect_diffusers_folder(path)
    family = family or detection.family
    try:
        unet = UNet2DConditionModel.from_pretrained(
            path, subfolder="unet", local_files_only=True, torch_dtype=component_dtype(dtype, "unet")
        )
        vae = AutoencoderKL.from_pretrained(
            path, subfolder="vae", local_files_only=True, torch_dtype=component_dtype(dtype, "vae")
        )
        text_encoders = []
        for name in TEXT_ENCODER_NAMES[: family.num_text_encoders]:
            config = json.loads((path / name / "config.json").read_text(encoding="utf-8"))
            with_projection = "CLIPTextModelWithProjection" in config.get("architectures", [])
            cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
            encoder = cls.from_pretrained(path / name, local_files_only=True)
            text_encoders.append(encoder.to(dtype=component_dtype(dtype, name)))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load diffusers folder ({str(exc).splitlines()[0][:200]})") from None
    tokenizers = [load_tokenizer(path / name) for name in TOKENIZER_NAMES[: family.num_text_encoders]]
    scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    return SDComponents(
        family=family,
        unet=unet,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        scheduler_config=dict(scheduler, prediction_type=family.prediction_type),
        source=str(path),
    )


def save_diffusers_folder(
    components: SDComponents,
    dest: str | Path,
    *,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
    only: Sequence[str] | None = None,
) -> Path:
    """Write ``components`` as a diffusers pipeline folder with weights in ``dtype``.

    ``only`` (component names) writes just those sub-folders, e.g. a fine-tuned ``unet/`` that diffusers loads with
    ``UNet2DConditionModel.from_pretrained(dest, subfolder="unet")``; such a folder has no ``model_index.json``.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise ModelError(f"{dest}: already exists; choose another output path or allow overwriting")
    modules = components.modules()
    if only is not None and (unknown := [n for n in only if n not in modules]):
        raise ValueError(f"unknown component {unknown[0]!r}; choose from {', '.join(modules)}")
    with atomic_dir(dest) as tmp:
        if only is None:
            index = json.loads((config_dir(components.family) / "model_index.json").read_text(encoding="utf-8"))
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        for name, module in modules.items():
            if only is not None and name not in only:
                continue
            folder = tmp / name
            folder.mkdir()
            state = {
                k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in module.state_dict().items()
            }
            if name in _WEIGHT_FILES:
                module.save_config(folder)
                save_file(state, str(folder / _WEIGHT_FILES[name]), metadata={"format": "pt"})
            else:
                module.config.architectures = [type(module).__name__]  # picks the class on reload
                module.config.save_pretrained(folder)
                state = {canonical_clip_key(k): v for k, v in state.items()}  # the layout every loader reads
                save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        if only is None:  # a whole pipeline: tokenizers and the scheduler too
            for name, tokenizer in zip(TOKENIZER_NAMES, components.tokenizers, strict=False):
                tokenizer.save_pretrained(tmp / name)
            (tmp / "scheduler").mkdir()
            scheduler = dict(components.scheduler_config, prediction_type=components.family.prediction_type)
            text = json.dumps(scheduler, indent=2)
            (tmp / "scheduler" / "scheduler_config.json").write_text(text, encoding="utf-8")
    return dest
