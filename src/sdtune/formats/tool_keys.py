"""Which LoRA tensors each consumer (A1111, ComfyUI, InvokeAI, diffusers) maps onto a model, and which it drops.

Every rule below restates, as a fact, what one tool's loader does with a tensor name; the comment on each rule names
the source file and function it was read from. Nothing is parsed by guessing: a tool's own name for every module of
the model (:class:`ModelModules`, the real model's or a given one's) is built, and a LoRA module name maps iff the
tool's conversion of it lands on one of them. Keys for modules that do not exist (a typo, another model family) are
therefore reported as ignored, exactly as the tools ignore them.

Sources (read at their 2025-2026 heads):

- A1111 ``extensions-builtin/Lora/networks.py`` (``convert_diffusers_name_to_compvis``,
  ``assign_network_names_to_compvis_modules``, ``load_network``, ``network_apply_weights``) and ``network.py``
  (``NetworkModule.apply_weight_decompose``); module types ``network_{lora,hada,ia3,lokr,full,norm,glora,oft}.py``.
- ComfyUI ``comfy/lora.py`` (``model_lora_keys_unet``, ``model_lora_keys_clip``, ``load_lora``) and
  ``comfy/weight_adapter/{__init__,base,lora,loha,lokr,glora,oft,boft}.py`` (``load``, ``weight_decompose``).
- InvokeAI ``invokeai/backend/model_manager/load/model_loaders/lora.py`` (``_load_model``),
  ``invokeai/backend/patches/lora_conversions/{sd,sdxl}_lora_conversion_utils.py``,
  ``invokeai/backend/patches/layers/utils.py`` (``any_lora_layer_from_state_dict``), ``layers/dora_layer.py`` and
  ``invokeai/backend/patches/layer_patcher.py`` (``apply_smart_model_patch``, ``_get_submodule``).
- diffusers 0.42 ``loaders/lora_pipeline.py`` (``StableDiffusionLoraLoaderMixin.lora_state_dict``),
  ``loaders/lora_conversion_utils.py`` (``_maybe_map_sgm_blocks_to_diffusers``,
  ``_convert_non_diffusers_lora_to_diffusers``, ``_convert_unet_lora_key``, ``_convert_text_encoder_lora_key``) and
  the PEFT path (``load_lora_into_unet`` / ``load_lora_into_text_encoder``: keys by component prefix, peft injects
  the named modules and ignores names that match no module).
"""

from __future__ import annotations

import bisect
import collections
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sdtune.core.atomic import write_text
from sdtune.formats.lora_keys import adaptable_module_names, clip_module_path
from sdtune.models.family import ModelFamily
from sdtune.models.ldm_keys import unet_rules

TARGETS = ("a1111", "comfyui", "invoke", "diffusers")
Where = tuple[str, str]  # (component, module path in sdtune's diffusers/transformers naming)
Shape = tuple[int, ...]


@dataclass(frozen=True)
class ModelModules:
    """The model a LoRA is checked against: each adaptable module's weight shape, per component (UNet paths as in
    diffusers, text-encoder paths rooted at ``text_model.``), and each UNet module's original (LDM/SGM) path."""

    family: ModelFamily
    shapes: Mapping[str, Mapping[str, Shape]]
    original: Mapping[str, str]


@dataclass
class TargetReport:
    """What one tool does with a LoRA file: keys mapped (to ``component:module``), keys ignored, kind issues,
    and ``error`` when the tool refuses the whole file."""

    target: str
    mapped: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    issues: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.ignored and not self.issues and self.error is None

    def as_dict(self, examples: int | None = None) -> dict:
        ignored = self.ignored if examples is None else self.ignored[:examples]
        return {
            "ok": self.ok,
            "mapped": len(self.mapped),
            "ignored": len(self.ignored),
            "ignored_keys": ignored,
            "issues": self.issues,
            "error": self.error,
        }


def model_modules(modules: Mapping[str, torch.nn.Module], family: ModelFamily) -> ModelModules:
    """:class:`ModelModules` of built modules (``unet``, ``text_encoder``, ``text_encoder_2``; real, on the meta
    device, or with peft adapters injected: a wrapped layer counts with its base layer's shape)."""
    shapes: dict[str, dict[str, Shape]] = {}
    for component, module in modules.items():
        if component not in ("unet", "text_encoder", "text_encoder_2"):
            continue
        found = {}
        for path in adaptable_module_names(module):
            layer = module.get_submodule(path)
            base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
            found[path if component == "unet" else clip_module_path(path)] = tuple(base.weight.shape)
        shapes[component] = found
    original = {}
    for path in list(shapes.get("unet", {})):
        try:
            (rule,) = unet_rules([path + ".weight"], modules["unet"].config, prefix="")
        except KeyError:  # no original-layout name: no tool that names modules that way can reach it
            del shapes["unet"][path]
            continue
        original[path] = rule.original.removesuffix(".weight")
    return ModelModules(family, shapes, original)


def header_shapes(path: str) -> dict[str, Shape]:
    """``{tensor name: shape}`` of a safetensors file from its header (no tensor is read)."""
    with safe_open(str(path), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


def _flat(path: str) -> str:
    return path.replace(".", "_")


# --- tensor names after the module name -----------------------------------------------------------------------

# The tensors one module of each adapter kind holds, as kohya / LyCORIS write them.
KOHYA_PARAMS = (
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale", "scale",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2",
    "a1.weight", "a2.weight", "b1.weight", "b2.weight", "oft_blocks", "oft_diag", "rescale",
    "diff", "diff_b", "w_norm", "b_norm", "on_input", "weight", "bias",
)  # fmt: skip
# PEFT / diffusers names (peft ``get_peft_model_state_dict``; diffusers' older ``lora.down`` / ``_lora.down``).
PEFT_PARAMS = (
    "lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_magnitude_vector.weight",
    "lora.down.weight", "lora.up.weight", "lora_linear_layer.down.weight", "lora_linear_layer.up.weight",
    "alpha", *KOHYA_PARAMS[6:20],
)  # fmt: skip


def kind_of(params: Iterable[str] | Mapping[str, Shape]) -> str:
    """The adapter kind of one module from its tensor names (LyCORIS' own detection order); given the shapes too,
    a 4-D ``oft_blocks`` is BOFT (LyCORIS ``ButterflyOFTModule.algo_check``, ComfyUI ``BOFTAdapter.load``)."""
    names = set(params)
    if names & {"hada_w1_a", "hada_w1_b"}:
        return "loha"
    if any(n.startswith("lokr_") for n in names):
        return "lokr"
    if "a1.weight" in names:
        return "glora"
    if names & {"oft_blocks", "oft_diag"}:
        blocks = params.get("oft_blocks", params.get("oft_diag")) if isinstance(params, Mapping) else None
        return "boft" if blocks is not None and len(blocks) == 4 else "oft"
    if "on_input" in names:
        return "ia3"
    if "diff" in names:
        return "full"
    if "w_norm" in names:
        return "norm"
    return "lora"


def split_key(key: str, params: Iterable[str] = KOHYA_PARAMS) -> tuple[str, str]:
    """``(module name, tensor name)`` by the longest known tensor-name suffix, else at the first dot."""
    for param in sorted(params, key=len, reverse=True):
        if key.endswith("." + param):
            return key[: -len(param) - 1], param
    module, _, param = key.partition(".")
    return module, param


# --- A1111 --------------------------------------------------------------------------------------------------

# networks.py suffix_conversion: diffusers resnet member -> LDM resnet member.
_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                 "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}  # fmt: skip
_OPENCLIP_MEMBER = (("mlp_fc1", "mlp_c_fc"), ("mlp_fc2", "mlp_c_proj"), ("self_attn", "attn"))


def _a1111_unet_name(name: str, table: Mapping[str, Where], per_block: int = 2) -> str:
    """networks.py ``convert_diffusers_name_to_compvis``, UNet part: diffusers-path kohya names -> LDM names.

    A1111 writes the block stride as 3 and the upsampler's slot as ``2 if block > 0 else 1``: ``layers_per_block + 1``
    and "the up block has attentions" of every SD model it runs; both are read from the model here, so tiny test
    models with other block counts get the numbering A1111 would give their real-size counterparts."""
    n = per_block + 1
    if m := re.match(r"lora_unet_conv_in(.*)", name):
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    if m := re.match(r"lora_unet_conv_out(.*)", name):
        return f"diffusion_model_out_2{m[1]}"
    if m := re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", name):
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        rest = _A1111_RESNET.get(m[4], m[4]) if m[2] == "resnets" else m[4]
        return f"diffusion_model_input_blocks_{1 + int(m[1]) * n + int(m[3])}_{int(m[2] == 'attentions')}_{rest}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", name):
        rest = _A1111_RESNET.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{rest}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        rest = _A1111_RESNET.get(m[4], m[4]) if m[2] == "resnets" else m[4]
        return f"diffusion_model_output_blocks_{int(m[1]) * n + int(m[3])}_{int(m[2] == 'attentions')}_{rest}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", name):
        return f"diffusion_model_input_blocks_{n + int(m[1]) * n}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", name):
        block = n - 1 + int(m[1]) * n
        with_attention = f"diffusion_model_output_blocks_{block}_2_conv"
        return with_attention if with_attention in table else f"diffusion_model_output_blocks_{block}_1_conv"
    return name


def _openclip(rest: str) -> str:
    for hf, oc in _OPENCLIP_MEMBER:
        rest = rest.replace(hf, oc)
    return rest


def a1111_table(model: ModelModules) -> dict[str, Where]:
    """A1111's ``network_layer_mapping`` restricted to adaptable modules: LDM module names with ``.`` -> ``_``.

    (networks.py ``assign_network_names_to_compvis_modules``: the UNet as ``diffusion_model_*``; SD 1.x's CLIP as
    ``transformer_text_model_*``; SDXL's embedders as ``0_transformer_text_model_*`` and
    ``1_model_transformer_resblocks_*``; SD 2.x's OpenCLIP as ``model_transformer_resblocks_*``. OpenCLIP's q/k/v
    live in one ``attn`` (MultiheadAttention) module, which ``re_x_proj`` finds for ``attn_{q,k,v}_proj`` names.)
    """
    table: dict[str, Where] = {}
    for path in model.shapes.get("unet", {}):
        table["diffusion_model_" + _flat(model.original[path])] = ("unet", path)
    arch = model.family.arch
    for component in ("text_encoder", "text_encoder_2"):
        openclip = arch == "sd2" or component == "text_encoder_2"
        prefix = {"sd1": "", "sd2": "", "sdxl": "0_" if component == "text_encoder" else "1_"}[arch]
        for path in model.shapes.get(component, {}):
            if not openclip:
                table[f"{prefix}transformer_{_flat(path)}"] = (component, path)
            elif m := re.match(r"text_model_encoder_layers_(\d+)_(.+)", _flat(path)):
                table[f"{prefix}model_transformer_resblocks_{m[1]}_{_openclip(m[2])}"] = (component, path)
    return table


def _a1111_resolve(name: str, table: Mapping[str, Where], arch: str, per_block: int) -> str | None:
    """networks.py ``load_network``: the LDM module name a LoRA module name ends at, or None (dropped)."""
    key = _a1111_unet_name(name, table, per_block)
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", name):
        key = (
            f"model_transformer_resblocks_{m[1]}_{_openclip(m[2])}"
            if arch == "sd2"  # is_sd2: a module named exactly model_transformer_resblocks exists
            else f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
        )
    elif m := re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", name):
        key = f"1_model_transformer_resblocks_{m[1]}_{_openclip(m[2])}"
    if key in table:
        return key
    if "lora_unet" in name:  # SGM-named (SDXL) files: already LDM names
        key = name.replace("lora_unet", "diffusion_model")
    elif "lora_te1_text_model" in name:
        key = name.replace("lora_te1_text_model", "0_transformer_text_model")
        if key not in table:
            key = name.replace("lora_te1_text_model", "transformer_text_model")
    return key if key in table else None


# network_*.py ModuleType.create_module: the tensors that make each module type accept a module.
_A1111_ACCEPTS = (
    {"lora_up.weight", "lora_down.weight"}, {"lora_A.weight", "lora_B.weight"}, {"hada_w1_a"}, {"weight", "on_input"},
    {"lokr_w1"}, {"lokr_w1_a"}, {"lokr_w2"}, {"lokr_w2_a"}, {"diff"}, {"w_norm"}, {"a1.weight"}, {"oft_blocks"},
    {"oft_diag"},
)  # fmt: skip


def _check_a1111(
    modules: Mapping[str, dict[str, Shape]], model: ModelModules, report: TargetReport, per_block: int
) -> None:
    table = a1111_table(model)
    found: dict[str, tuple[str, str]] = {}  # LoRA module name -> LDM name
    for name, params in modules.items():
        if "." in name:  # split at the first dot: a PEFT name's module is its component ("unet"), never a layer
            report.ignored += [f"{name}.{p}" for p in params]
            continue
        ldm = _a1111_resolve(name, table, model.family.arch, per_block)
        if ldm is None:
            report.ignored += [f"{name}.{p}" for p in params]
            continue
        if not any(need <= params.keys() for need in _A1111_ACCEPTS):
            report.error = f"'{name}' has tensors no A1111 module type accepts ({', '.join(params)}): the file fails"
            return
        found[name] = (ldm, params)
    # network_apply_weights: OpenCLIP's fused q/k/v are patched only when q, k, v and out_proj of a layer all are
    for name, (ldm, params) in found.items():
        if m := re.match(r"(.*_attn)_[qkv]_proj$", ldm):
            layer = m[1]
            siblings = {f"{layer}_{p}_proj" for p in "qkv"} | {f"{layer}_out_proj"}
            if not siblings <= {v[0] for v in found.values()}:
                report.ignored += [f"{name}.{p}" for p in params]
                continue
        report.mapped.update({f"{name}.{p}": "{}:{}".format(*table[ldm]) for p in params})
        _dora_axis(name, params, table[ldm], model, report, "A1111 (network.py apply_weight_decompose)")


# --- ComfyUI ------------------------------------------------------------------------------------------------

# comfy/lora.py LORA_CLIP_MAP: the text-encoder members ComfyUI maps, diffusers name -> kohya member name.
_COMFY_CLIP = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")
# comfy/weight_adapter/*.py ``load`` and comfy/lora.py ``load_lora``: tensor names after the module name ``x``.
_COMFY_PARAMS = {
    "lora": (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", "_lora.up.weight", "_lora.down.weight",
             ".lora_B.weight", ".lora_A.weight", ".lora.up.weight", ".lora.down.weight", ".lora_B", ".lora_A",
             ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", ".lora_B.default.weight",
             ".lora_A.default.weight", ".reshape_weight"),
    "loha": (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2"),
    "lokr": (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2"),
    "glora": (".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight"),
    "oft": (".oft_blocks", ".rescale"),
    "other": (".alpha", ".dora_scale", ".w_norm", ".b_norm", ".diff", ".diff_b", ".set_weight"),
}  # fmt: skip


def comfyui_table(model: ModelModules) -> dict[str, Where]:
    """comfy/lora.py ``model_lora_keys_unet`` + ``model_lora_keys_clip`` for an SD 1.x / 2.x / XL model."""
    table: dict[str, Where] = {}
    for path in model.shapes.get("unet", {}):
        where = ("unet", path)
        original = model.original[path]
        table[f"lora_unet_{_flat(original)}"] = where  # every diffusion_model.* weight, kohya style
        table[f"diffusion_model.{original}"] = where  # "generic lora format"
        table[f"lora_unet_{_flat(path)}"] = where  # unet_to_diffusers: diffusers names, kohya style
        table[f"lycoris_{_flat(path)}"] = where  # SimpleTuner LyCORIS
        # diffusers attention processors: ".to_" -> ".processor.to_", "to_out.0" -> "to_out"; bare and "unet."
        legacy = path.replace(".to_", ".processor.to_")
        legacy = legacy[:-2] if legacy.endswith(".to_out.0") else legacy
        table[legacy] = table[f"unet.{legacy}"] = where
    sdxl = model.family.arch == "sdxl"
    for component in ("text_encoder", "text_encoder_2"):
        clip = {"sd1": "clip_l", "sd2": "clip_h", "sdxl": "clip_l" if component == "text_encoder" else "clip_g"}
        for path in model.shapes.get(component, {}):
            where = (component, path)
            table[f"text_encoders.{clip[model.family.arch]}.transformer.{path}"] = where
            m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)$", path)
            if m and m[2] in _COMFY_CLIP:
                member = f"text_model_encoder_layers_{m[1]}_{_flat(m[2])}"
                if component == "text_encoder":
                    table[f"lora_te_{member}"] = table[f"lora_te1_{member}"] = where
                    table[f"text_encoder.{path}"] = where
                else:
                    table[f"lora_te2_{member}"] = table[f"text_encoder_2.{path}"] = where
            elif sdxl and path == "text_projection":
                table["lora_te1_text_projection" if component == "text_encoder" else "lora_te2_text_projection"] = where
    return table


def _check_comfyui(keys: Mapping[str, Shape], model: ModelModules, report: TargetReport) -> None:
    table = comfyui_table(model)
    suffixes = sorted((s for group in _COMFY_PARAMS.values() for s in group), key=len, reverse=True)
    modules: dict[str, dict[str, Shape]] = collections.defaultdict(dict)
    for key, shape in keys.items():
        for suffix in suffixes:
            if key.endswith(suffix) and key[: -len(suffix)] in table:
                modules[key[: -len(suffix)]][suffix.lstrip("._")] = shape
                break
        else:  # load_lora: "lora key not loaded"
            report.ignored.append(key)
    for name, params in modules.items():
        known = set().union(*(_COMFY_PARAMS[k] for k in ("lora", "loha", "lokr", "glora", "oft")))
        if not any(("." + p) in known or ("_" + p) in known for p in params if p not in ("alpha", "dora_scale")):
            report.ignored += [f"{name}.{p}" for p in params]  # only alpha / dora_scale: no adapter loads them
            continue
        where = table[name]
        report.mapped.update({f"{name}.{p}": "{}:{}".format(*where) for p in params})
        _dora_axis(name, params, where, model, report, "ComfyUI (comfy/weight_adapter/base.py weight_decompose)")


# --- InvokeAI -----------------------------------------------------------------------------------------------

# layers/utils.py any_lora_layer_from_state_dict: the tensors that select a layer type (in this order).
_INVOKE_LAYERS = (("dora_scale", "dora"), ("lora_up.weight", "lora"), ("hada_w1_a", "loha"), ("lokr_w1", "lokr"),
                  ("lokr_w1_a", "lokr"), ("diff", "full"), ("on_input", "ia3"), ("w_norm", "norm"))  # fmt: skip


def _sgm_prefix_map(model: ModelModules) -> dict[str, str]:
    """SGM -> diffusers name *prefixes* (``input_blocks_4_1`` -> ``down_blocks_1_attentions_0``): what
    sdxl_lora_conversion_utils.py ``SDXL_UNET_STABILITY_TO_DIFFUSERS_MAP`` holds, derived from the model's own
    module names (their common tail, not starting at a block index, is left out)."""
    out = {}
    for path, original in model.original.items():
        d, s = path.split("."), original.split(".")
        n = 0
        while n < min(len(d), len(s)) - 1 and d[-1 - n] == s[-1 - n]:
            n += 1
        while n and d[-n].isdigit():
            n -= 1
        out[_flat(".".join(s[: len(s) - n]))] = _flat(".".join(d[: len(d) - n]))
    return out


def _check_invoke(modules: Mapping[str, dict[str, Shape]], model: ModelModules, report: TargetReport) -> None:
    sdxl = model.family.arch == "sdxl"
    names = dict(modules)
    if sdxl:  # model_loaders/lora.py: convert_sdxl_keys_to_diffusers_format before building layers
        prefix_map = _sgm_prefix_map(model)
        ordered = sorted(prefix_map)
        converted, kept, renamed = 0, 0, {}
        for name in names:
            if name.startswith("lora_unet_"):
                rest = name[len("lora_unet_") :]
                i = bisect.bisect_right(ordered, rest)  # the greatest map key <= rest, if it is a prefix of it
                if i and rest.startswith(ordered[i - 1]):
                    renamed[name] = name.replace(ordered[i - 1], prefix_map[ordered[i - 1]], 1)
                    converted += 1
                    continue
                kept += 1
            elif not name.startswith(("lora_te1_", "lora_te2_")):
                report.error = f"InvokeAI refuses the file: unrecognized SDXL LoRA key prefix in '{name}'"
                return
            renamed[name] = name
        if converted and kept:
            report.error = "InvokeAI refuses the file: it mixes SGM and diffusers UNet names (partial conversion)"
            return
    else:
        renamed = {name: name for name in names}
    # compel.py / denoise_latents.py: layers are applied by prefix onto the diffusers UNet / transformers CLIP,
    # the rest of the name flattened (layer_patcher.py _get_submodule walks "_"-joined names greedily).
    prefixes = {"lora_unet_": "unet"} | (
        {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"} if sdxl else {"lora_te_": "text_encoder"}
    )
    flat = {(c, _flat(p)): p for c, paths in model.shapes.items() for p in paths}
    for name, params in names.items():
        layer = next((kind for tensor, kind in _INVOKE_LAYERS if tensor in params), None)
        if layer is None or (layer == "dora" and "lora_up.weight" not in params):
            report.error = f"InvokeAI refuses the file: '{name}' is of no layer type it loads ({', '.join(params)})"
            return
        new = renamed[name]
        prefix = next((p for p in prefixes if new.startswith(p)), None)
        path = flat.get((prefixes[prefix], new[len(prefix) :])) if prefix else None
        if path is None:  # "Failed to find module for LoRA layer key" (or a prefix no model part uses)
            report.ignored += [f"{name}.{p}" for p in params]
            continue
        where = (prefixes[prefix], path)
        report.mapped.update({f"{name}.{p}": "{}:{}".format(*where) for p in params})
        _dora_axis(name, params, where, model, report, "InvokeAI (patches/layers/dora_layer.py)")


# --- diffusers ----------------------------------------------------------------------------------------------

_KOHYA_PREFIXES = ("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_")
_SGM = ("input_blocks", "middle_block", "output_blocks")
_NOT_SGM = ("down_blocks", "mid_block", "up_blocks")


def _diffusers_sgm_renumber(name: str, layers_per_block: int) -> str:
    """lora_conversion_utils.py ``_maybe_map_sgm_blocks_to_diffusers`` for one SGM-named UNet module."""
    parts = name.split("_")
    if "text" in name or not any(p in name for p in _SGM) or "input_blocks_0_0" in name:
        return name  # passed through (conv_in, time_embed, label_emb, out)
    i = int(parts[4])
    kinds = ("resnets", "attentions", "upsamplers")
    if "middle_block" in name:
        kind, index = {0: ("resnets", "0"), 1: ("attentions", "0"), 2: ("resnets", "1")}[i]
        return "_".join([*parts[:4], kind, index, *parts[5:]])
    inner = int(parts[5])
    if "input_blocks" in name:
        block, layer = divmod(i - 1, layers_per_block + 1)
        inner_kind, inner_layer = (kinds[inner], str(layer)) if "op" not in name else ("downsamplers", "0")
        return "_".join([*parts[:4], str(block), inner_kind, inner_layer, *parts[6:]])
    block, layer = divmod(i, layers_per_block + 1)
    return "_".join([*parts[:4], str(block), kinds[inner], str(layer) if inner < 2 else "0", *parts[6:]])


def _diffusers_unet_path(name: str) -> str:
    """lora_conversion_utils.py ``_convert_unet_lora_key``: a kohya UNet module name -> a diffusers module path."""
    n = name.removeprefix("lora_unet_").replace("_", ".")
    n = n.replace("input.blocks.0.0", "conv_in").replace("out.2", "conv_out")
    for old, new in (("input.blocks", "down_blocks"), ("down.blocks", "down_blocks"), ("middle.block", "mid_block"),
                     ("mid.block", "mid_block"), ("output.blocks", "up_blocks"), ("up.blocks", "up_blocks"),
                     ("transformer.blocks", "transformer_blocks"), ("to.q", "to_q"), ("to.k", "to_k"),
                     ("to.v", "to_v"), ("to.out", "to_out"), ("proj.in", "proj_in"), ("proj.out", "proj_out"),
                     ("emb.layers", "time_emb_proj"), ("conv.in", "conv_in"), ("conv.out", "conv_out"),
                     ("time.embed.0", "time_embedding.linear_1"), ("time.embed.2", "time_embedding.linear_2"),
                     ("label.emb.0.0", "add_embedding.linear_1"), ("label.emb.0.2", "add_embedding.linear_2"),
                     ("time.embedding.linear.1", "time_embedding.linear_1"),
                     ("time.embedding.linear.2", "time_embedding.linear_2")):  # fmt: skip
        n = n.replace(old, new)
    if "emb" in n and "time.emb.proj" not in n:  # "SDXL specific": drop the last ".<digits>" index
        n = re.sub(r"\.\d+(?=\D*$)", "", n, count=1)
    if ".in." in n + ".":
        n = n.replace("in.layers.2", "conv1")
    if ".out." in n + ".":
        n = n.replace("out.layers.3", "conv2")
    if "downsamplers" in n or "upsamplers" in n:
        n = n.replace("op", "conv")
    n = n.replace("skip.connection", "conv_shortcut").replace("time.emb.proj", "time_emb_proj")
    return n.replace("conv.shortcut", "conv_shortcut")


def _diffusers_te_path(name: str) -> str:
    """lora_conversion_utils.py ``_convert_text_encoder_lora_key`` (then diffusers' old->PEFT renames)."""
    n = re.sub(r"^lora_te[12]?_", "", name).replace("_", ".")
    for old, new in (("text.model", "text_model"), ("self.attn", "self_attn"), ("q.proj", "q_proj"),
                     ("k.proj", "k_proj"), ("v.proj", "v_proj"), ("out.proj", "out_proj"),
                     ("text.projection", "text_projection")):  # fmt: skip
        n = n.replace(old, new)
    return n


def _check_diffusers(keys: Mapping[str, Shape], model: ModelModules, report: TargetReport, lpb: int) -> None:
    # lora_pipeline.py lora_state_dict: dora_scale keys are dropped (with a warning) before anything else
    dora = [k for k in keys if "dora_scale" in k]
    if dora:
        report.ignored += dora
        report.issues.append(
            f"diffusers drops the {len(dora)} dora_scale tensors of a kohya/LyCORIS DoRA file and applies it as a "
            "plain LoRA (lora_pipeline.py lora_state_dict); give diffusers the PEFT-layout file"
        )
    keys = {k: v for k, v in keys.items() if "dora_scale" not in k}
    where_of = {(c, p): (c, p) for c, paths in model.shapes.items() for p in paths}
    if keys and all(k.startswith(_KOHYA_PREFIXES) for k in keys):
        names = {k: k.split(".", 1) for k in keys}
        has_sgm = any(any(p in k for p in _SGM) for k in keys)
        has_diffusers = any(any(p in k for p in _NOT_SGM) and not any(p in k for p in _SGM) for k in keys)
        left = [k for k, (_, param) in names.items() if param not in ("lora_down.weight", "lora_up.weight", "alpha")]
        if left:  # _convert_non_diffusers_lora_to_diffusers: "keys have not been correctly renamed"
            report.error = (
                f"diffusers refuses the file: {len(left)} tensors are not LoRA down/up/alpha (e.g. '{left[0]}'); "
                "it converts kohya LoRA/LoCon only"
            )
            return
        # load_lora_into_text_encoder -> state_dict_utils.convert_state_dict_to_diffusers infers the format per
        # text encoder: the converted attention names ("self_attn.to_q_lora") are renamed to q/k/v/out_proj only
        # when a "to_out_lora" (an out_proj LoRA) is among them; with MLP LoRAs only they stay and are dropped;
        # with neither, "Could not automatically infer state dict type" fails the load.
        te_attention_kept = {}
        for te in ("lora_te2_", ("lora_te_", "lora_te1_")):
            te_names = [n for n, _ in names.values() if n.startswith(te)]
            has_out = any("self_attn_out_proj" in n for n in te_names)
            if te_names and not has_out and not any("_mlp_" in n for n in te_names):
                report.error = "diffusers refuses the file: its text-encoder LoRA has neither out_proj nor MLP tensors"
                return
            te_attention_kept[te] = has_out
        for key, (name, _) in names.items():
            te = "lora_te2_" if name.startswith("lora_te2_") else ("lora_te_", "lora_te1_")
            if name.startswith(te) and "_self_attn_" in name and not te_attention_kept[te]:
                report.ignored.append(key)
                continue
            if has_sgm and has_diffusers and any(p in name for p in _SGM):
                report.ignored.append(key)  # both naming schemes: the SGM-named keys are removed
                continue
            if name.startswith("lora_unet_"):
                where = ("unet", _diffusers_unet_path(_diffusers_sgm_renumber(name, lpb) if has_sgm else name))
            else:
                component = "text_encoder_2" if name.startswith("lora_te2_") else "text_encoder"
                where = (component, _diffusers_te_path(name))
            if where in where_of:
                report.mapped[key] = "{}:{}".format(*where)
            else:  # peft injects the named modules; a name that matches none is ignored
                report.ignored.append(key)
        return
    # the PEFT path: keys by component prefix; lora_A / lora_B / lora_magnitude_vector of existing modules
    for key in keys:
        component, _, rest = key.partition(".")
        module, param = split_key(rest, PEFT_PARAMS)
        path = module.replace(".processor.", ".").replace("_lora", "")
        if param.startswith(("hada_", "lokr_")):
            report.error = "diffusers loads no LoHa/LoKr files (its loaders convert LoRA only)"
            return
        if (component, path) in where_of and param != "alpha":
            report.mapped[key] = f"{component}:{path}"
        else:
            report.ignored.append(key)


# --- kinds and DoRA -------------------------------------------------------------------------------------------


def _dora_axis(name: str, params: Mapping[str, Shape], where: Where, model: ModelModules, report, who: str) -> None:
    """The three UIs apply ``dora_scale`` per *input* column (shape ``(1, in)``, conv ``(1, in, 1, 1)``): each
    normalises ``W + dW`` over its input axis (A1111, InvokeAI), and ComfyUI sends a scale whose first dimension is
    the output width down a branch that divides by the norm of the original weight. An output-axis ``(out, 1)``
    scale is therefore misapplied by all three."""
    scale = params.get("dora_scale")
    if scale is None:
        return
    weight = model.shapes[where[0]][where[1]]
    inputs = 1
    for d in weight[1:]:
        inputs *= d
    if not (scale[0] == 1 and _prod(scale) in (weight[1], inputs)):
        report.issues.append(
            f"{who} applies dora_scale per input column; '{name}' has an output-axis dora_scale {tuple(scale)} "
            f"(weight {tuple(weight)}), so its DoRA is misapplied"
        )


def _prod(shape: Shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def check_keys(
    keys: Mapping[str, Shape], model: ModelModules, targets: Iterable[str] = TARGETS, layers_per_block: int = 2
) -> dict[str, TargetReport]:
    """Per target tool: which of a LoRA file's tensors (``{name: shape}``, from the file header) it maps onto
    ``model``, which it drops, and what it would misapply. ``layers_per_block`` is the UNet's (diffusers renumbers
    SGM names with it)."""
    grouped: dict[str, dict[str, Shape]] = collections.defaultdict(dict)
    for key, shape in keys.items():
        module, param = split_key(key)
        grouped[module][param] = tuple(shape)
    out = {}
    for target in targets:
        report = TargetReport(target)
        if target == "a1111":
            _check_a1111(grouped, model, report, layers_per_block)
        elif target == "comfyui":
            _check_comfyui(keys, model, report)
        elif target == "invoke":
            _check_invoke(grouped, model, report)
        elif target == "diffusers":
            _check_diffusers(keys, model, report, layers_per_block)
        else:
            raise ValueError(f"unknown target '{target}'; use one of {', '.join(TARGETS)}")
        _kind_issues(grouped, target, report)
        if report.error:
            report.ignored, report.mapped = sorted(keys), {}
        report.issues = list(dict.fromkeys(report.issues))
        out[target] = report
    return out


# Adapter kinds each tool applies (A1111 networks.py module_types; ComfyUI weight_adapter.adapters; InvokeAI
# any_lora_layer_from_state_dict; diffusers: LoRA only, DoRA in the PEFT layout).
# OFT / BOFT: A1111's network_oft.py reads ``oft_blocks`` as kohya's OFT (3-D: ``(num_blocks, block_size,
# block_size)``, what LyCORIS' diag-OFT writes too) and LyCORIS BOFT only under the older name ``oft_diag``; a 4-D
# ``oft_blocks`` goes down the kohya branch, whose ``transpose(1, 2)`` / block identity do not fit it, so A1111
# fails on BOFT files as LyCORIS and ComfyUI write them. ComfyUI applies both (oft.py: 3-D, boft.py: 4-D).
SUPPORTED_KINDS = {
    "a1111": {"lora", "loha", "lokr", "glora", "oft", "ia3", "full", "norm"},
    "comfyui": {"lora", "loha", "lokr", "glora", "oft", "boft", "full", "norm"},
    "invoke": {"lora", "loha", "lokr", "ia3", "full", "norm"},
    "diffusers": {"lora"},
}


def _kind_issues(grouped: Mapping[str, Mapping[str, Shape]], target: str, report: TargetReport) -> None:
    kinds = collections.Counter(kind_of(params) for params in grouped.values())
    for kind, n in sorted(kinds.items()):
        if kind not in SUPPORTED_KINDS[target]:
            report.issues.append(f"{target} does not apply {kind} ({n} modules)")
    # comfy/weight_adapter/oft.py OFTAdapter.calculate_weight loads ``rescale`` but never multiplies it in (boft.py
    # does); A1111's network_oft.py applies it for both.
    rescaled = sum(1 for p in grouped.values() if kind_of(p) == "oft" and "rescale" in p)
    if target == "comfyui" and rescaled:
        report.issues.append(f"ComfyUI ignores the rescale of {rescaled} OFT modules (its oft.py never applies it)")
    if target == "invoke" and any("dora_scale" in p and kind_of(p) != "lora" for p in grouped.values()):
        report.issues.append("InvokeAI applies DoRA to LoRA/LoCon modules only (its DoRA layer needs lora_up/down)")


# --- reports ------------------------------------------------------------------------------------------------


def as_json(result: Mapping[str, Any], examples: int | None = None) -> dict[str, Any]:
    """The check result as plain JSON data (``examples`` caps each target's list of ignored keys)."""
    reports: Mapping[str, TargetReport] = result["targets"]
    return {**result, "targets": {t: r.as_dict(examples) for t, r in reports.items()}}


def warnings_of(result: Mapping[str, Any]) -> list[str]:
    """One line per target that would drop or misapply something (for a run's events)."""
    lines = []
    for target, report in result["targets"].items():
        if report.ok:
            continue
        what = report.error or "; ".join(
            [f"drops {len(report.ignored)} of {len(report.ignored) + len(report.mapped)} keys"] * bool(report.ignored)
            + report.issues
        )
        lines.append(f"{Path(result['file']).name}: {target}: {what}")
    return lines


def write_compatibility(out_dir: Path, results: Iterable[Mapping[str, Any]], examples: int = 20) -> Path:
    """``compatibility.json`` in ``out_dir``: per file, per target: ok, the dropped keys and the kind issues."""
    data = {Path(r["file"]).name: as_json(r, examples) for r in results}
    for entry in data.values():
        entry["file"] = Path(entry["file"]).name
    path = Path(out_dir) / "compatibility.json"
    write_text(path, json.dumps(data, indent=2) + "\n")
    return path
