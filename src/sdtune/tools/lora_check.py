"""``sdtune lora check``: would A1111, ComfyUI, InvokeAI and diffusers load every tensor of this LoRA file?

"lora key not loaded" is the complaint in every tool's tracker. This reads only a file's header (tensor names and
shapes), builds the model it is for (the real model of its family from the shipped configs on the meta device, or a
given model), and asks :func:`sdtune.formats.tool_keys.check_keys` which keys each tool maps, drops or misapplies.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sdtune.core.errors import ModelError
from sdtune.formats.lora_metadata import KOHYA_PARAM_NAMES, detect_lora_layout, module_algo, split_param
from sdtune.formats.tool_keys import (  # re-exported: the check's report helpers
    TARGETS,
    ModelModules,
    as_json,
    check_keys,
    header_shapes,
    model_modules,
    warnings_of,
    write_compatibility,
)
from sdtune.models.components import SDComponents, build_modules
from sdtune.models.family import ModelFamily
from sdtune.models.shipped import shipped_configs
from sdtune.tools.lora_io import claimed_family, keys_meta


def parse_targets(value: str) -> tuple[str, ...]:
    """``a1111,comfyui`` / ``all`` -> the target names; a one-line ModelError for anything else."""
    if value.strip() == "all":
        return TARGETS
    names = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    bad = [n for n in names if n not in TARGETS]
    if bad or not names:
        raise ModelError(f"--for {value}: use one of {', '.join(TARGETS)} or all (comma-separated for several)")
    return names


@functools.lru_cache(maxsize=4)
def real_model_modules(family: ModelFamily) -> tuple[ModelModules, int]:
    """The real model of ``family`` (shipped configs, built on the meta device: names and shapes, no weights)."""
    configs = shipped_configs(family)
    modules = build_modules({k: v for k, v in configs.items() if k != "scheduler"}, empty=True)
    return model_modules(modules, family), int(modules["unet"].config.layers_per_block)


def modules_of(model: SDComponents) -> tuple[ModelModules, int]:
    """:class:`ModelModules` of a loaded model (e.g. a tiny test model or the model a run trains)."""
    return model_modules(model.modules(), model.family), int(model.unet.config.layers_per_block)


def check_file(path: str | Path, targets: Iterable[str] = TARGETS, model: SDComponents | None = None) -> dict[str, Any]:
    """Check one LoRA file for ``targets``: ``{"file", "family", "layout", "algo", "ok", "targets": {name:
    TargetReport}}``. Module names come from ``model``, else from the real model of the family the file claims."""
    path = Path(path)
    keys, metadata = keys_meta(path)  # one-line errors for missing / unreadable files
    layout = detect_lora_layout(keys)
    if model is not None:
        modules, per_block = modules_of(model)
    else:
        modules, per_block = real_model_modules(claimed_family(path, keys, metadata))
    shapes = header_shapes(path)
    reports = check_keys(shapes, modules, targets, per_block)
    return {
        "file": str(path),
        "family": modules.family.name,
        "layout": layout,
        "algo": _algo(shapes, layout),
        "ok": all(r.ok for r in reports.values()),
        "targets": reports,
    }


def _algo(shapes: dict[str, tuple[int, ...]], layout: str) -> str:
    """The file's algorithm(s) from its tensor names and shapes (the shapes tell BOFT from OFT)."""
    if layout == "peft":
        return "dora" if any("magnitude" in k for k in shapes) else "lora"
    params: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        try:
            module, param = split_param(key, KOHYA_PARAM_NAMES)
        except ModelError:
            module, param = key.split(".", 1)[0], key.split(".", 1)[-1]
        params.setdefault(module, {})[param] = shape
    return "+".join(sorted({module_algo(p) for p in params.values()}))


__all__ = [
    "as_json",
    "check_file",
    "parse_targets",
    "real_model_modules",
    "modules_of",
    "warnings_of",
    "write_compatibility",
]
