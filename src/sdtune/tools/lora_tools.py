"""LoRA files against models: apply, merge, convert; with reading and the family check
(:mod:`sdtune.tools.lora_io`) and resize / extract (:mod:`sdtune.tools.lora_svd`) re-exported: the one API.

What each tool mirrors:

- :func:`merge_loras` / :func:`merge_into`: kohya-ss/sd-scripts ``networks/merge_lora.py`` (``merge_to``: every
  LoRA's delta times its ratio added to the base weights, one file after another, then saved as a model).
  A weight ``w`` means ``W + w * (W_adapted - W)``; for DoRA that is what LyCORIS, A1111, ComfyUI and
  InvokeAI do with a strength, represented exactly in PEFT by rescaling ``lora_A`` columns (per-input-column DoRA)
  or ``lora_B`` rows (per-output-row) and the magnitude. OFT / BOFT (multiplicative: ``W' = R W``) are merged
  exactly by their own layers (:mod:`sdtune.adapters.oft`); there the UIs disagree on what a strength means, so
  ``strength_as="comfyui"`` gives ComfyUI's rule instead of A1111's (the same for every other kind).
- :func:`resize_lora` / :func:`extract_lora` (SVD, in :mod:`sdtune.tools.lora_svd`): ``networks/resize_lora.py``
  and ``networks/extract_lora_from_models.py``.
- :func:`convert_lora`: between the kohya/LyCORIS layout and diffusers' PEFT layout
  (:mod:`sdtune.formats.lora_files`).

Applying goes through PEFT (``inject_adapter_in_model``) and leaves the adapters unmerged, so the unmerged and
merged models can be compared; :func:`merge_into` bakes them in and removes the wrappers.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from peft import set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from sdtune.adapters.dora import INPUT_DORA_LAYERS, MAGNITUDE, column_norm, is_input_dora
from sdtune.adapters.lora import add_adapter
from sdtune.adapters.oft import STRENGTH_RULES, OrthogonalLayer, StrengthRule
from sdtune.core.errors import ModelError
from sdtune.formats.lora_files import (
    dense_lora_from_dora,
    from_kohya,
    kohya_metadata,
    peft_diffusers_metadata,
    save_lora,
    to_peft_diffusers,
)
from sdtune.formats.lora_metadata import KOHYA_PARAM_NAMES, PEFT_PARAM_NAMES, module_algo
from sdtune.models.components import SDComponents
from sdtune.models.loading import load_model, save_model
from sdtune.tools.lora_io import group_modules, keys_meta, kohya_tensors, lora_family_check, names_for, read_lora
from sdtune.tools.lora_svd import ModuleReport, extract_lora, resize_lora

__all__ = [
    "ModuleReport",
    "apply_lora",
    "convert_lora",
    "extract_lora",
    "lora_family_check",
    "merge_into",
    "merge_loras",
    "read_lora",
    "resize_lora",
]

# --- apply and merge ---------------------------------------------------------------------------------


def _adapter_names(layer: BaseTunerLayer) -> list[str]:
    found: set[str] = set()
    for attr in layer.adapter_layer_names:
        found |= set(getattr(layer, attr, {}).keys())
    return sorted(found)


def _scale_dora(layer: BaseTunerLayer, adapter: str, weight: float) -> None:
    """Make DoRA ``adapter`` compute ``W + weight * (W_dora - W)`` (A1111/ComfyUI/InvokeAI/LyCORIS' strength).

    Per input column ``j`` (sdtune's DoRA, :mod:`sdtune.adapters.dora`) that is
    ``k_j * (W_j + s * c_j * weight / k_j * (BA)_j)`` with ``c_j = m_j / |W_j + s (BA)_j|`` and
    ``k_j = 1 - weight + weight * c_j``: again that DoRA, with ``A``'s column ``j`` times ``weight * c_j / k_j``
    and magnitude ``k_j * |W_j + s (BA')_j|``. Per output row (peft's DoRA, older files) the same holds with rows
    for columns and ``B``'s rows scaled. PEFT's scale alone would change the direction only, not interpolate.
    """
    per_input = adapter in getattr(layer, MAGNITUDE, {})
    base = layer.get_base_layer().weight.detach().double()
    b, a = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight
    scaled = a if per_input else b  # the factor whose columns (rows) the strength rescales
    magnitude = getattr(layer, MAGNITUDE)[adapter] if per_input else layer.lora_magnitude_vector[adapter].weight
    s, rank = layer.scaling[adapter], a.shape[0]

    def adapted(factor: torch.Tensor) -> torch.Tensor:
        a_, b_ = (factor, b) if per_input else (a, factor)
        return base + s * (b_.reshape(-1, rank).double() @ a_.reshape(rank, -1).double()).reshape(base.shape)

    def norm(w: torch.Tensor) -> torch.Tensor:
        return column_norm(w) if per_input else torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim())))

    c = magnitude.detach().double().flatten() / norm(adapted(scaled))
    k = 1 - weight + weight * c
    k = torch.where(k.abs() < 1e-8, torch.full_like(k, 1e-8), k)  # a column/row that interpolates to exactly zero
    shape = (1, -1, *[1] * (a.dim() - 2)) if per_input else (-1, *[1] * (b.dim() - 1))
    new = scaled.detach().double() * (weight * c / k).reshape(shape)
    with torch.no_grad():
        scaled.copy_(new.to(scaled.dtype))
        magnitude.copy_((k * norm(adapted(new))).reshape(magnitude.shape).to(magnitude.dtype))


def _check_input_dora_layers(path: str | Path, module: torch.nn.Module, adapter: str) -> None:
    """A per-input-column DoRA added to a layer an earlier file made a plain peft LoRA layer would become peft's
    per-output-row DoRA there (peft reuses the existing layer): refuse instead of applying the wrong formula."""
    for name, layer in module.named_modules():
        if isinstance(layer, LoraLayer) and adapter in layer.lora_A and not isinstance(layer, INPUT_DORA_LAYERS):
            raise ModelError(
                f"{path}: this DoRA (per input column) cannot be applied after another LoRA file that adapts the same "
                f"layer ('{name}'); apply or merge it first"
            )


def apply_lora(
    components: SDComponents, path: str | Path, weight: float = 1.0, strength_as: StrengthRule = "a1111"
) -> None:
    """Add the LoRA at ``path`` to the model's UNet and text encoders through PEFT, scaled by ``weight``, unmerged.

    Several files can be applied (each is its own PEFT adapter, all active); unmerged they act like files merged
    one after another, except a DoRA after another adapter on the same layer (PEFT normalises DoRA by the
    original weight, a merge by the weight so far). The family is checked first. ``strength_as``: how ``weight``
    scales OFT / BOFT modules (``a1111``: ``W + w (W' - W)``; ``comfyui``: ComfyUI's formulas, which also drop an
    OFT's rescale); every other kind is ``W + w (W' - W)`` in every tool.
    """
    if strength_as not in STRENGTH_RULES:
        raise ModelError(f"strength_as '{strength_as}': use one of {', '.join(STRENGTH_RULES)}")
    lora_family_check(path, components.family, components)
    states, configs, _, _ = read_lora(path, components)
    modules = components.modules()
    for component, state in states.items():
        module = modules[component]
        taken = set(getattr(module, "peft_config", {}))
        adapter = next(f"sdtune{i}" for i in range(len(taken) + 1) if f"sdtune{i}" not in taken)
        with warnings.catch_warnings():  # "already found a peft_config": several adapters are what we want
            warnings.simplefilter("ignore")
            add_adapter(module, configs[component], adapter)
        if is_input_dora(configs[component]):
            _check_input_dora_layers(path, module, adapter)
        result = set_peft_model_state_dict(module, state, adapter_name=adapter)
        if result.unexpected_keys:
            raise ModelError(f"{path}: {component} tensors not loaded, e.g. '{result.unexpected_keys[0]}'")
        for layer in module.modules():
            if not isinstance(layer, BaseTunerLayer):
                continue
            # PEFT makes the newest adapter the only active one in every layer, even layers without it
            layer.set_adapter(_adapter_names(layer))
            if isinstance(layer, OrthogonalLayer) and adapter in layer.oft_blocks:
                layer.set_strength(adapter, weight, strength_as)  # the rule matters at 1 too (ComfyUI's rescale)
            elif adapter in _adapter_names(layer) and weight != 1.0:
                if getattr(layer, "use_dora", {}).get(adapter):
                    _scale_dora(layer, adapter, weight)
                else:
                    layer.scaling[adapter] *= weight
        module.requires_grad_(False)


def merge_into(components: SDComponents) -> None:
    """Merge every PEFT adapter into the base weights and put the plain modules back (same state-dict keys)."""
    for root in components.modules().values():
        named = dict(root.named_modules())
        outermost = [
            name
            for name, layer in named.items()
            if isinstance(layer, BaseTunerLayer) and not isinstance(named.get(name.rpartition(".")[0]), BaseTunerLayer)
        ]
        for name in outermost:
            chain = [named[name]]
            while isinstance(chain[-1].base_layer, BaseTunerLayer):  # adapters of different kinds nest
                chain.append(chain[-1].base_layer)
            for layer in reversed(chain):  # innermost first: the order they act in, unmerged
                layer.merge(adapter_names=_adapter_names(layer))
            parent, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent), child, chain[0].get_base_layer())
        if "peft_config" in vars(root):
            del root.peft_config


def merge_loras(
    base: str | Path,
    loras: Sequence[tuple[str | Path, float]],
    out: str | Path,
    layout: Literal["single_file", "diffusers"] = "single_file",
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
    strength_as: StrengthRule = "a1111",
) -> Path:
    """Load ``base``, merge each ``(lora, weight)`` in turn (sd-scripts ``merge_lora.py``), save to ``out``.

    Every file is checked against the model before any is applied; ``strength_as`` as in :func:`apply_lora`.
    """
    if strength_as not in STRENGTH_RULES:
        raise ModelError(f"strength_as '{strength_as}': use one of {', '.join(STRENGTH_RULES)}")
    if layout not in ("single_file", "diffusers"):
        raise ModelError(f"layout '{layout}': use single_file or diffusers")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ModelError(f"{out}: already exists; choose another output path or allow overwriting")
    model = load_model(base)
    for path, _ in loras:
        lora_family_check(path, model.family, model)
    for path, weight in loras:
        apply_lora(model, path, weight, strength_as)
        merge_into(model)
    return save_model(model, out, layout=layout, dtype=dtype, overwrite=overwrite)


# --- convert -----------------------------------------------------------------------------------------


def convert_lora(
    path: str | Path,
    to: Literal["kohya", "peft"],
    out: str | Path,
    base: str | Path | SDComponents | None = None,
) -> Path:
    """Write the LoRA at ``path`` in the kohya/LyCORIS layout or diffusers' PEFT layout (LoRA and DoRA only).

    ``base`` (a model or a model path; only its configs are read) gives the module names; without it, the
    real model of the family the file is for. A per-input-column DoRA (sdtune's) goes to the PEFT layout as the
    exact plain LoRA of its merged delta (:func:`sdtune.formats.lora_files.dense_lora_from_dora`), which needs
    ``base``'s weights.
    """
    path, out = Path(path), Path(out)
    if to not in ("kohya", "peft"):
        raise ModelError(f"--to {to}: use kohya or peft")
    keys, metadata = keys_meta(path)
    algos = {module_algo(p) for p in group_modules(dict.fromkeys(keys), KOHYA_PARAM_NAMES + PEFT_PARAM_NAMES).values()}
    lycoris_only = {"loha", "lokr", "oft", "boft"}  # module_algo on names alone calls a BOFT "oft"
    if to == "peft" and algos & lycoris_only:
        algo = "/".join(sorted(algos & lycoris_only))
        raise ModelError(
            f"{path}: a {algo} file cannot be written in the diffusers/PEFT layout; keep it as kohya/LyCORIS"
        )
    names = names_for(base, path, keys, metadata)
    tensors, metadata, layout = kohya_tensors(path, names)
    metadata = {k: v for k, v in metadata.items() if k != "lora_adapter_metadata"}
    if to == "kohya":
        if layout == "peft" and not any(k.startswith("ss_") for k in metadata):  # LoRA/DoRA: kohya metadata
            modules = group_modules(tensors, KOHYA_PARAM_NAMES).values()
            conv = any(tuple(p["lora_down.weight"].shape[2:]) not in ((), (1, 1)) for p in modules)  # k x k: LoCon
            algo = "dora" if "dora" in algos else "locon" if conv else "lora"
            rank = collections.Counter(int(p["lora_down.weight"].shape[0]) for p in modules).most_common(1)[0][0]
            alpha = collections.Counter(float(p["alpha"]) for p in modules).most_common(1)[0][0]
            metadata |= kohya_metadata(names.family, algo, rank, alpha, dora_on_output=True)  # PEFT: output rows
        save_lora(out, tensors, metadata)
        return out
    try:
        states, configs = from_kohya(tensors, names.family, names.unet_config, names.module_names)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    if any(is_input_dora(c) for c in configs.values()):  # diffusers has no such DoRA: the exact dense LoRA
        if base is None:
            raise ModelError(
                f"{path}: a per-input-column DoRA becomes a plain LoRA of its merged delta in the PEFT layout, which "
                "needs the base model's weights; give the model it was trained on as base"
            )
        model = base if isinstance(base, SDComponents) else load_model(base)
        states, configs = dense_lora_from_dora(states, configs, model.modules())
    save_lora(out, to_peft_diffusers(states, names.family), metadata | peft_diffusers_metadata(configs))
    return out
