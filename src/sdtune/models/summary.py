"""What ``sdtune inspect`` reports about a model, read from file headers without building modules."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sdtune.models.checkpoint_io import SAFETENSORS_SUFFIXES, read_checkpoint, safetensors_header
from sdtune.models.components import TEXT_ENCODER_NAMES
from sdtune.models.family import UNET_PREFIX, VAE_PREFIX, Detection
from sdtune.models.loading import detect, resolve_path

_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I64": "int64", "I32": "int32"}


@dataclass
class ComponentSummary:
    parameters: int = 0
    dtypes: Counter = field(default_factory=Counter)


@dataclass
class ModelSummary:
    path: Path
    detection: Detection
    components: dict[str, ComponentSummary]
    metadata: dict[str, str]


def summarize(path: str | Path) -> ModelSummary:
    """Family, layout, per-component parameter counts and dtypes of a model, from headers only."""
    path = resolve_path(path)
    detection = detect(path)
    components: dict[str, ComponentSummary] = {}
    metadata: dict[str, str] = {}
    if path.is_dir():
        for sub in sorted(p for p in path.iterdir() if p.is_dir()):
            for weights in sorted(sub.glob("*.safetensors")):
                _add(components.setdefault(sub.name, ComponentSummary()), _shapes_dtypes(weights))
    else:
        prefixes = {UNET_PREFIX: "unet", VAE_PREFIX: "vae"}
        prefixes |= dict(zip(detection.family.text_encoder_prefixes, TEXT_ENCODER_NAMES, strict=False))
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:
            header, _ = safetensors_header(path)
            metadata = dict(header.pop("__metadata__", None) or {})
            entries = {k: (tuple(v["shape"]), _ST_DTYPES.get(v["dtype"], v["dtype"])) for k, v in header.items()}
        else:
            tensors, metadata = read_checkpoint(path)
            entries = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()}
        for key, entry in entries.items():
            name = next((n for p, n in prefixes.items() if key.startswith(p)), "other")
            _add(components.setdefault(name, ComponentSummary()), {key: entry})
    return ModelSummary(path, detection, components, metadata)


def _shapes_dtypes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    header, _ = safetensors_header(path)
    header.pop("__metadata__", None)
    return {k: (tuple(v["shape"]), _ST_DTYPES.get(v["dtype"], v["dtype"])) for k, v in header.items()}


def _add(summary: ComponentSummary, entries: dict[str, tuple[tuple[int, ...], str]]) -> None:
    for shape, dtype in entries.values():
        summary.parameters += math.prod(shape)
        summary.dtypes[dtype] += 1
