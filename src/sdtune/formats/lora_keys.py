"""Module names in LoRA files: sdtune module paths <-> kohya ``lora_unet_*`` / ``lora_te*_*`` names.

A kohya name is ``<prefix>_<module path>`` with every ``.`` replaced by ``_`` (kohya-ss/sd-scripts
``networks/lora.py``, ``LoRANetwork.create_modules``; LyCORIS ``lycoris/kohya.py`` does the same), where

- the prefix is ``lora_unet`` for the UNet, ``lora_te`` for SD 1.x/2.x's text encoder and ``lora_te1`` /
  ``lora_te2`` for SDXL's two (sd-scripts ``LoRANetwork.LORA_PREFIX_TEXT_ENCODER1/2``);
- the UNet path is the diffusers one for SD 1.x/2.x (sd-scripts' ``original_unet.py`` mirrors diffusers
  names) but the original SGM layout (``input_blocks.4.1...``) for SDXL (sd-scripts trains SDXL on its
  ``sdxl_original_unet.py``); the diffusers <-> original rules are :func:`sdtune.models.ldm_keys.unet_rules`;
- text-encoder paths are rooted at ``text_model.`` as in transformers 4, whatever the installed
  transformers calls them (:func:`sdtune.models.ldm_keys.canonical_clip_key`).

``_`` is ambiguous (``to_q`` vs ``to.q``), so names are never parsed: the inverse builds the forward name of
every candidate module and looks the name up (:func:`kohya_name_table`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from sdtune.core.errors import ModelError
from sdtune.models.family import ModelFamily
from sdtune.models.ldm_keys import canonical_clip_key, unet_rules

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# Modules a LoRA file can adapt (what sd-scripts and LyCORIS wrap): weights of these classes.
_ADAPTABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)


def kohya_prefix(component: str, family: ModelFamily) -> str:
    """``lora_unet``, ``lora_te`` (SD 1.x/2.x) or ``lora_te1`` / ``lora_te2`` (SDXL)."""
    if component == "unet":
        return "lora_unet"
    if family.arch == "sdxl" and component in ("text_encoder", "text_encoder_2"):
        return "lora_te1" if component == "text_encoder" else "lora_te2"
    if component == "text_encoder":
        return "lora_te"
    raise ModelError(f"{family.name} has no component '{component}' a LoRA can adapt; use unet or text_encoder")


def clip_module_path(path: str) -> str:
    """The ``text_model.``-rooted path of a CLIP text-encoder module (transformers 5 drops the root)."""
    if path == "text_model" or path == "text_projection":
        return path
    return canonical_clip_key(path)


def kohya_module_name(
    component: str, module_path: str, family: ModelFamily, unet_config: Mapping[str, Any] | None = None
) -> str:
    """The kohya name of module ``module_path`` of ``component`` (as in that module's ``named_modules()``).

    ``unet_config`` (the UNet's config) is needed for SDXL UNet modules, whose names use the original layout.
    """
    prefix = kohya_prefix(component, family)
    if component == "unet":
        path = _sgm_module_path(module_path, unet_config) if family.arch == "sdxl" else module_path
    else:
        path = clip_module_path(module_path)
    return f"{prefix}_{path}".replace(".", "_")


def _sgm_module_path(module_path: str, unet_config: Mapping[str, Any] | None) -> str:
    if unet_config is None:
        raise ValueError("SDXL UNet LoRA names need the UNet config (original-layout block numbering)")
    try:
        (rule,) = unet_rules([module_path + ".weight"], unet_config, prefix="")
    except KeyError as err:
        raise ModelError(f"UNet module '{module_path}' has no original-layout (SGM) name") from err
    return rule.original.removesuffix(".weight")


def kohya_name_table(
    family: ModelFamily, module_names: Mapping[str, Iterable[str]], unet_config: Mapping[str, Any] | None
) -> dict[str, tuple[str, str]]:
    """``{kohya name: (component, module path)}`` for the given candidate modules of each component."""
    table: dict[str, tuple[str, str]] = {}
    for component, names in module_names.items():
        for path in names:
            if not path:
                continue
            try:
                name = kohya_module_name(component, path, family, unet_config)
            except ModelError:
                continue  # containers with no original-layout name cannot hold LoRA weights
            table[name] = (component, path)
    return table


def module_path_from_kohya(
    name: str,
    family: ModelFamily,
    unet_config: Mapping[str, Any],
    text_encoder_module_names: Mapping[str, Iterable[str]],
    unet_module_names: Iterable[str] | None = None,
) -> tuple[str, str]:
    """``(component, module path)`` of kohya module ``name``; the inverse of :func:`kohya_module_name`.

    ``text_encoder_module_names`` maps ``text_encoder`` / ``text_encoder_2`` to their ``named_modules()`` names
    (they say whether the installed transformers roots paths at ``text_model.``); UNet candidates default to
    the modules of a UNet built from ``unet_config`` on the meta device.
    """
    names: dict[str, Iterable[str]] = dict(text_encoder_module_names)
    names["unet"] = list(unet_module_names) if unet_module_names is not None else unet_module_names_for(unet_config)
    found = kohya_name_table(family, names, unet_config).get(name)
    if found is None:
        raise ModelError(f"LoRA module '{name}' matches no module of this {family.name} model; is it for another one?")
    return found


def adaptable_module_names(module: torch.nn.Module) -> list[str]:
    """Names of the Linear / Conv modules of ``module`` (peft-wrapped ones by their own name)."""
    out = []
    for name, sub in module.named_modules():
        base = getattr(sub, "base_layer", None)
        if isinstance(base, _ADAPTABLE):
            out.append(name)
        elif isinstance(sub, _ADAPTABLE) and not _inside_adapter(name):
            out.append(name)
    return out


def _inside_adapter(name: str) -> bool:
    parts = name.split(".")
    return "base_layer" in parts or any(p.startswith(("lora_", "hada_", "lokr_")) for p in parts)


def unet_module_names_for(unet_config: Mapping[str, Any]) -> list[str]:
    """Adaptable module names of a UNet with this config (built once on the meta device, then cached)."""
    return list(_unet_names(json.dumps(dict(unet_config), sort_keys=True, default=str)))


@functools.lru_cache(maxsize=8)
def _unet_names(config_json: str) -> tuple[str, ...]:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    return tuple(adaptable_module_names(unet))
