"""Single-file checkpoints in the original LDM/SGM layout (what AUTOMATIC1111 and ComfyUI load).

Loading: read the file safely, decide the family, build the family's modules on the meta device from the
shipped configs (or from the configs sdtune stored in the file's metadata), convert keys with the rules
of :mod:`sdtune.models.ldm_keys` and load strictly, so a missing or misshapen tensor is an error.
Saving: the same rules in reverse, cast to the chosen dtype, with family and ``modelspec.*`` metadata.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from sdtune.core.errors import ModelError
from sdtune.models.checkpoint_io import (
    SAFETENSORS_SUFFIXES,
    LazyTensors,
    open_checkpoint,
    read_checkpoint,
    read_metadata,
    read_shapes,
    write_state_dict,
)
from sdtune.models.components import (
    TEXT_ENCODER_NAMES,
    ComponentDtypes,
    SDComponents,
    build_modules,
    component_dtype,
)
from sdtune.models.family import UNET_PREFIX, VAE_PREFIX, Detection, ModelFamily, detect_state_dict
from sdtune.models.ldm_keys import (
    KeyRule,
    hf_clip_rules,
    openclip_rules,
    to_diffusers,
    to_original,
    unet_rules,
    vae_rules,
)
from sdtune.models.shipped import shipped_configs, shipped_tokenizers


def original_layout_rules(family: ModelFamily, modules: dict[str, torch.nn.Module]) -> list[KeyRule]:
    """Every rule between the original layout of ``family`` and these modules' state dicts."""
    rules = unet_rules(modules["unet"].state_dict().keys(), modules["unet"].config, UNET_PREFIX)
    rules += vae_rules(modules["vae"].state_dict().keys(), modules["vae"].config, VAE_PREFIX)
    for name, prefix, style in zip(
        TEXT_ENCODER_NAMES, family.text_encoder_prefixes, family.text_encoder_styles, strict=False
    ):
        make = hf_clip_rules if style == "hf" else openclip_rules
        rules += make(modules[name].state_dict().keys(), prefix, name)
    return rules


def load_single_file(
    path: str | Path, *, family: ModelFamily | None = None, dtype: ComponentDtypes = torch.float32
) -> SDComponents:
    """Load a single-file checkpoint into diffusers/transformers modules (CPU, ``dtype``: one for all, or one per
    component name, ``None`` = as stored).

    One component at a time: a safetensors file's tensors are read, converted to the component's dtype and loaded,
    then dropped, so the whole file never sits in memory beside its converted copy (a pickle is read whole)."""
    path = Path(path)
    tensors, metadata = open_checkpoint(path)
    shape = tensors.shape if isinstance(tensors, LazyTensors) else lambda k: tuple(tensors[k].shape)
    detection = detect_state_dict(tensors.keys(), shape, metadata, source=str(path), layout=_layout(path))
    family = family or detection.family
    configs = json.loads(metadata["sdtune.configs"]) if "sdtune.configs" in metadata else shipped_configs(family)
    configs["scheduler"] = dict(configs["scheduler"], prediction_type=family.prediction_type)
    tensors = _upgrade_legacy_keys(tensors, family)
    modules = build_modules(configs, empty=True)
    rules = original_layout_rules(family, modules)
    for name, module in modules.items():
        source = _View(tensors, dtype=component_dtype(dtype, name))  # each tensor converted as it is read
        try:
            state = to_diffusers(source, [r for r in rules if r.component == name]).get(name, {})
        except KeyError as exc:
            raise ModelError(f"{path}: does not match the {family.name} architecture ({exc.args[0]})") from None
        try:
            module.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            first = str(exc).split("\n\t")[1][:200] if "\n\t" in str(exc) else str(exc)[:200]
            raise ModelError(f"{path}: {name} does not match the {family.name} architecture ({first})") from None
        del state
    used = {r.original for r in rules}
    extras = [k for k in tensors if k not in used]
    notes = list(detection.notes)
    if extras:
        notes.append(f"ignored {len(extras)} tensors not used by diffusers (e.g. {', '.join(sorted(extras)[:3])})")
    return SDComponents(
        family=family,
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoders=[modules[n] for n in TEXT_ENCODER_NAMES if n in modules],
        tokenizers=shipped_tokenizers(family),
        scheduler_config=configs["scheduler"],
        source=str(path),
        notes=notes,
    )


def save_single_file(
    components: SDComponents,
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float16,
    title: str | None = None,
    only: Sequence[str] | None = None,
) -> Path:
    """Save as one original-layout file (``.safetensors`` or ``.ckpt``) that A1111 and ComfyUI load.

    ``only`` (component names) keeps just those components' keys, e.g. a UNet alone (``model.diffusion_model.*``,
    what ComfyUI's diffusion-model loader reads); such a file is not a whole checkpoint.
    """
    path = Path(path)
    modules = components.modules()
    if only is not None and (unknown := [n for n in only if n not in modules]):
        raise ValueError(f"unknown component {unknown[0]!r}; choose from {', '.join(modules)}")
    rules = original_layout_rules(components.family, modules)
    if only is not None:
        rules = [r for r in rules if r.component in only]
    state = to_original({n: m.state_dict() for n, m in modules.items() if only is None or n in only}, rules)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    family = components.family
    metadata = {
        "sdtune.family": family.name,
        "sdtune.prediction_type": family.prediction_type,
        "sdtune.configs": json.dumps(components.configs()),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if family.arch == "sdxl"
        else "https://github.com/Stability-AI/stablediffusion",
        "modelspec.prediction_type": "v" if family.prediction_type == "v_prediction" else "epsilon",
        "modelspec.title": title or path.stem,
        "modelspec.resolution": f"{family.resolution}x{family.resolution}",
    }
    if only is not None:
        metadata["sdtune.components"] = ",".join(n for n in modules if n in only)
    write_state_dict(path, state, metadata)
    return path


def detect_single_file(path: str | Path) -> Detection:
    """Decide the family of a single-file checkpoint (reads only the header of a safetensors file)."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        shapes, metadata = read_shapes(path), read_metadata(path)
    else:
        tensors, metadata = read_checkpoint(path)
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    return detect_state_dict(shapes.keys(), shapes.__getitem__, metadata, source=str(path), layout=_layout(path))


def _layout(path: Path) -> str:
    return "safetensors" if path.suffix.lower() in SAFETENSORS_SUFFIXES else "ckpt"


def _upgrade_legacy_keys(tensors: Mapping[str, torch.Tensor], family: ModelFamily) -> Mapping[str, torch.Tensor]:
    """Early SD 1.x checkpoints stored CLIP without the ``text_model.`` level (transformers < 4.19)."""
    prefix = family.text_encoder_prefixes[0]
    if family.arch != "sd1" or f"{prefix}text_model.embeddings.token_embedding.weight" in tensors:
        return tensors
    names = {}
    for key in tensors:
        new = key
        if key.startswith(prefix) and not key.startswith(prefix + "text_model."):
            new = prefix + "text_model." + key[len(prefix) :]
        names[new] = key
    return _View(tensors, names)


class _View(Mapping):
    """``tensors`` read on access, under new names (``names``: new -> old) and cast to ``dtype`` when given, so
    that a tensor's stored copy is dropped as soon as it is converted."""

    def __init__(
        self, tensors: Mapping[str, torch.Tensor], names: dict[str, str] | None = None, dtype: torch.dtype | None = None
    ) -> None:
        self.tensors, self.names, self.dtype = tensors, names, dtype

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor = self.tensors[self.names[key] if self.names is not None else key]
        return tensor.to(self.dtype) if self.dtype is not None and tensor.is_floating_point() else tensor

    def __iter__(self):
        return iter(self.names if self.names is not None else self.tensors)

    def __len__(self) -> int:
        return len(self.names if self.names is not None else self.tensors)
