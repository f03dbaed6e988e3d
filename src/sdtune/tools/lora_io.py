"""Reading LoRA files against a model: any layout sdtune writes, module names, and the family check.

The one internal form is the kohya/LyCORIS tensor layout (:mod:`sdtune.formats.lora_files`): a diffusers PEFT
file (``unet.<path>.lora_A.weight`` + ``lora_adapter_metadata``) is turned into it with ``to_kohya``, so every
tool reads one layout; ``from_kohya`` then gives PEFT states and configs for the model's module names.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune.core.errors import ModelError
from sdtune.formats.lora_files import from_kohya, to_kohya
from sdtune.formats.lora_keys import adaptable_module_names, kohya_name_table
from sdtune.formats.lora_metadata import KOHYA_PARAM_NAMES, detect_lora_layout, split_param
from sdtune.models.components import SDComponents, build_modules
from sdtune.models.family import ModelFamily
from sdtune.models.loading import detect, resolve_path
from sdtune.models.shipped import shipped_configs

Tensors = dict[str, torch.Tensor]


def group_modules(tensors: Mapping[str, object], names: Iterable[str]) -> dict[str, dict[str, object]]:
    """``{module: {param: value}}`` of a LoRA file's keys (kohya or PEFT parameter names)."""
    names = tuple(names)
    out: dict[str, dict[str, object]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        module, param = split_param(key, names)
        out[module][param] = value
    return dict(out)


def peft_file_configs(states: Mapping[str, Mapping[str, torch.Tensor]], metadata: Mapping[str, str]) -> dict:
    """Each component's ``LoraConfig`` from diffusers' ``lora_adapter_metadata`` (without it: alpha = rank)."""
    packed = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init} - {"peft_type", "task_type"}
    configs = {}
    for component, state in states.items():
        kwargs = {k.split(".", 1)[1]: v for k, v in packed.items() if k.startswith(component + ".")}
        if not kwargs:  # diffusers' default without metadata: alpha = rank
            r = next(t.shape[0] for k, t in state.items() if k.endswith("lora_A.weight"))
            kwargs = {"r": r, "lora_alpha": r, "use_dora": any("magnitude" in k for k in state)}
        kwargs["target_modules"] = sorted({k.rsplit(".lora_", 1)[0] for k in state})
        configs[component] = LoraConfig(**{k: v for k, v in kwargs.items() if k in fields})
    return configs


@dataclasses.dataclass(frozen=True)
class Names:
    """What turns kohya names into module paths: the family, the UNet config, each component's module names."""

    family: ModelFamily
    unet_config: dict[str, Any]
    module_names: dict[str, list[str]]


def names_of(model: SDComponents) -> Names:
    modules = {c: adaptable_module_names(m) for c, m in model.modules().items() if c != "vae"}
    return Names(model.family, dict(model.unet.config), modules)


def _names_from_configs(family: ModelFamily, configs: Mapping[str, dict[str, Any]]) -> Names:
    modules = build_modules(dict(configs), empty=True)  # meta device: names only, no memory
    names = {c: adaptable_module_names(m) for c, m in modules.items() if c != "vae"}
    return Names(family, dict(modules["unet"].config), names)


def names_for(base: str | Path | SDComponents | None, path: Path, keys: list[str], meta: dict) -> Names:
    """The name context of ``base`` (a model, or a model path read without its weights), else the real model
    of the family the LoRA file says it is for (its shipped configs)."""
    if isinstance(base, SDComponents):
        return names_of(base)
    if base is None:
        family = claimed_family(path, keys, meta)
        return _names_from_configs(family, shipped_configs(family))
    root = resolve_path(base)
    family = detect(root).family
    if root.is_dir():
        configs = {
            c: json.loads((root / c / "config.json").read_text(encoding="utf-8"))
            for c in ("unet", "vae", "text_encoder", "text_encoder_2")
            if (root / c / "config.json").is_file()
        }
    else:
        stored = _metadata(root) if root.suffix == ".safetensors" else {}
        configs = json.loads(stored["sdtune.configs"]) if "sdtune.configs" in stored else shipped_configs(family)
    return _names_from_configs(family, configs)


def claimed_family(path: Path, keys: Sequence[str], meta: Mapping[str, str]) -> ModelFamily:
    """The family a LoRA file is for: its metadata, else its key names (SD 1.x vs 2.x by the context width);
    a file that says nothing is taken for SD 1.x."""
    arch = _claimed_arch(keys, meta) or "sd1"
    if arch not in ("sd1", "sd2", "sdxl", "sd1/sd2"):
        raise ModelError(f"{path}: a LoRA for {arch}, which sdtune does not support")
    if arch == "sd1/sd2":  # SD 2.x's text and cross-attention width is 1024, SD 1.x's 768
        arch = "sd2" if _context_width(path) == 1024 else "sd1"
    return ModelFamily.parse(arch)


def _context_width(path: Path) -> int:
    """Cross-attention / text width of an SD 1.x-or-2.x file without metadata: 768 (SD 1.x) or 1024 (SD 2.x)."""
    with safe_open(str(path), framework="pt") as fh:
        for key in fh.keys():
            if key.endswith(("attn2_to_k.lora_down.weight", "attn2.to_k.lora_A.weight", "q_proj.lora_down.weight")):
                return fh.get_slice(key).get_shape()[1]
    return 768


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def read_file(path: str | Path) -> tuple[Tensors, dict[str, str], str]:
    """``(tensors, metadata, layout)`` of a LoRA file; one-line errors for missing or unreadable files."""
    _, metadata, layout = _peek(path)
    return load_file(str(path)), metadata, layout


def keys_meta(path: str | Path) -> tuple[list[str], dict[str, str]]:
    """Tensor names and metadata of a LoRA file, without reading the tensors."""
    keys, metadata, _ = _peek(path)
    return keys, metadata


def _peek(path: str | Path) -> tuple[list[str], dict[str, str], str]:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such LoRA file; give a .safetensors LoRA")
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys, metadata = list(fh.keys()), dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for any unreadable file
        raise ModelError(f"{path}: not a readable .safetensors LoRA ({str(exc)[:120]})") from None
    try:
        return keys, metadata, detect_lora_layout(keys)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None


def kohya_tensors(path: str | Path, names: Names) -> tuple[Tensors, dict[str, str], str]:
    """The file's tensors in the kohya/LyCORIS layout (a diffusers PEFT file converted), metadata, layout."""
    tensors, metadata, layout = read_file(path)
    if layout != "peft":
        return tensors, metadata, layout
    states: dict[str, Tensors] = collections.defaultdict(dict)
    for key, tensor in tensors.items():
        component, rest = key.split(".", 1)
        states[component][rest] = tensor
    try:
        return to_kohya(states, peft_file_configs(states, metadata), names.family, names.unet_config), metadata, layout
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}; is the LoRA for another model family?") from None


def read_lora(path: str | Path, model: SDComponents | None = None) -> tuple[dict, dict, dict[str, str], str]:
    """``(states, configs, metadata, layout)`` of any LoRA file sdtune writes: PEFT states and configs per
    component (``unet``, ``text_encoder``, ``text_encoder_2``), the file's metadata and its layout.

    Module paths are those of ``model``; without one, of the real model of the family the file is for.
    """
    path = Path(path)
    names = names_of(model) if model is not None else names_for(None, path, *keys_meta(path))
    tensors, metadata, layout = kohya_tensors(path, names)
    try:
        states, configs = from_kohya(tensors, names.family, names.unet_config, names.module_names)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    return states, configs, metadata, layout


# --- family check ------------------------------------------------------------------------------------


def _claimed_arch(keys: Sequence[str], metadata: Mapping[str, str]) -> str | None:
    """The architecture a file says it is for: metadata first (kohya ``ss_base_model_version``, model-spec
    ``modelspec.architecture``), else the key names (SDXL: ``lora_te1_``/``lora_te2_``, SGM UNet names)."""
    version = metadata.get("ss_base_model_version", "")
    if version:
        return next(
            (a for p, a in (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1")) if version.startswith(p)), version
        )
    spec = metadata.get("modelspec.architecture", "").split("/")[0]
    if spec:
        known = (("stable-diffusion-xl-v1", "sdxl"), ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1"))
        return next((a for p, a in known if spec.startswith(p)), spec)
    sgm = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.", *sgm)) for k in keys):
        return "sdxl"
    if any(
        k.startswith(("lora_te_", "lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_"))
        for k in keys
    ):
        return "sd1/sd2"
    return None


def _dims(p: Mapping[str, torch.Size]) -> tuple[int, int | None]:
    """``(out, in * k * k)`` of the weight a module's LoRA tensors update (LoRA, LoHa, LoKr); OFT / BOFT rotate the
    rows only, so their ``in`` is not known (``None``)."""
    if "oft_blocks" in p:
        return p["oft_blocks"][-3] * p["oft_blocks"][-1], None
    if "lora_up.weight" in p:
        return p["lora_up.weight"][0], math.prod(p["lora_down.weight"][1:])
    if "hada_w1_a" in p:
        return p["hada_w1_a"][0], math.prod(p["hada_w1_b"][1:])
    a, c = (p["lokr_w1"][0], p["lokr_w1"][1]) if "lokr_w1" in p else (p["lokr_w1_a"][0], p["lokr_w1_b"][1])
    b, d = (p["lokr_w2"][0], math.prod(p["lokr_w2"][1:])) if "lokr_w2" in p else (
        p["lokr_w2_a"][0], math.prod(p["lokr_w2_b"][1:]))  # fmt: skip
    return a * b, c * d


def lora_family_check(path: str | Path, family: ModelFamily | str, model: SDComponents | None = None) -> None:
    """A one-line ``ModelError`` if the LoRA at ``path`` is for another model family; nothing is changed.

    Decided from the metadata when present, else from the key names; with ``model`` also every module must
    exist in the model with the shape the LoRA updates (a missing or misshapen module means another model).
    """
    path = Path(path)
    family = ModelFamily.parse(family) if isinstance(family, str) else family
    keys, metadata = keys_meta(path)
    claimed = _claimed_arch(keys, metadata)
    if claimed is not None and family.arch not in claimed.split("/"):
        raise ModelError(f"{path}: a LoRA for {claimed} cannot be merged into an {family.arch} model")
    if model is None:
        return
    names = names_of(model)
    tensors, _, _ = kohya_tensors(path, names)
    table = kohya_name_table(model.family, names.module_names, names.unet_config)
    modules = model.modules()
    for name, params in group_modules(tensors, KOHYA_PARAM_NAMES).items():
        found = table.get(name)
        if found is None:
            raise ModelError(f"{path}: LoRA module '{name}' is not in this {family.arch} model; is it for another one?")
        layer = modules[found[0]].get_submodule(found[1])
        weight = (layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer).weight
        got = _dims({k: v.shape for k, v in params.items()})
        want = (weight.shape[0], weight[0].numel() if got[1] is not None else None)
        down = params.get("lora_down.weight", params.get("rescale"))
        if want != got or (down is not None and down.dim() != weight.dim()):  # e.g. a Linear LoRA on a 1x1 conv
            shape = (got[0], *down.shape[1:]) if down is not None else got
            what = f"rotates {got[0]} output channels" if got[1] is None else f"updates a {tuple(shape)} weight"
            raise ModelError(
                f"{path}: LoRA module '{name}' {what} but this {family.arch} model's is "
                f"{tuple(weight.shape)}; is the LoRA for another model?"
            )
