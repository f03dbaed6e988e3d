"""Key rules between the original LDM/SGM single-file layout and diffusers/transformers modules.

One rule per original tensor says which diffusers tensor(s) it is and how it is stored. The rules are
generated from a model's own state-dict keys and config, so they cover tiny test models and real
SD 1.x / 2.x / XL alike, and the same rules convert in both directions (load and save).

Operations (original -> diffusers):
  ``copy``       same tensor
  ``conv1x1``    original is a 1x1 conv ``[C, C, 1, 1]``, diffusers a Linear ``[C, C]`` (VAE mid attention)
  ``split3``     original is OpenCLIP's fused ``in_proj`` ``[3C, ...]`` -> q, k, v projections
  ``transpose``  original is OpenCLIP's ``text_projection`` (x @ P), diffusers a Linear weight (P.T)

The block arithmetic follows the original UNet: ``input_blocks`` count resnets (and attentions) of every
down block, plus one downsampler after each block but the last; ``output_blocks`` do the same for the up
blocks, which have one resnet more, with the upsampler in the last sub-block of each up block but the last.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

Op = Literal["copy", "conv1x1", "split3", "transpose"]


@dataclass(frozen=True)
class KeyRule:
    """One original-layout tensor and the diffusers tensor(s) of component ``component`` it holds."""

    original: str
    component: str
    diffusers: tuple[str, ...]
    op: Op = "copy"


# --- UNet ------------------------------------------------------------------------------------------

_RESNET_RENAMES = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)


def _per_block(value: int | Sequence[int], n: int) -> list[int]:
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


def _unet_prefixes(config: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, original prefix, is_resnet) for every block of a UNet2DConditionModel config."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    n = len(down)
    layers = _per_block(config["layers_per_block"], n)
    out: list[tuple[str, str, bool]] = [
        ("conv_in.", "input_blocks.0.0.", False),
        ("time_embedding.linear_1.", "time_embed.0.", False),
        ("time_embedding.linear_2.", "time_embed.2.", False),
        ("add_embedding.linear_1.", "label_emb.0.0.", False),
        ("add_embedding.linear_2.", "label_emb.0.2.", False),
        ("conv_norm_out.", "out.0.", False),
        ("conv_out.", "out.2.", False),
        ("mid_block.resnets.0.", "middle_block.0.", True),
        ("mid_block.attentions.0.", "middle_block.1.", False),
        ("mid_block.resnets.1.", "middle_block.2.", True),
    ]
    idx = 1
    for i in range(n):
        for j in range(layers[i]):
            out.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{idx}.0.", True))
            out.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{idx}.1.", False))
            idx += 1
        if i < n - 1:
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{idx}.0.op.", False))
            idx += 1
    up_layers = [v + 1 for v in reversed(layers)]
    idx = 0
    for i in range(n):
        has_attention = "CrossAttn" in up[i]
        for j in range(up_layers[i]):
            out.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{idx}.0.", True))
            out.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{idx}.1.", False))
            if i < n - 1 and j == up_layers[i] - 1:
                slot = 2 if has_attention else 1
                out.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{idx}.{slot}.conv.", False))
            idx += 1
    return out


def unet_rules(keys: Iterable[str], config: Mapping[str, Any], prefix: str, component: str = "unet") -> list[KeyRule]:
    """Rules for every key of a diffusers ``UNet2DConditionModel`` state dict."""
    prefixes = sorted(_unet_prefixes(config), key=lambda p: -len(p[0]))
    rules = []
    for key in keys:
        for dprefix, oprefix, is_resnet in prefixes:
            if key.startswith(dprefix):
                rest = key[len(dprefix) :]
                if is_resnet:
                    rest = _rename(rest, _RESNET_RENAMES)
                rules.append(KeyRule(prefix + oprefix + rest, component, (key,)))
                break
        else:
            raise KeyError(f"UNet key {key!r} has no original-layout rule")
    return rules


# --- VAE -------------------------------------------------------------------------------------------

_VAE_ATTENTION_RENAMES = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def vae_rules(keys: Iterable[str], config: Mapping[str, Any], prefix: str, component: str = "vae") -> list[KeyRule]:
    """Rules for every key of a diffusers ``AutoencoderKL`` state dict."""
    n = len(config["down_block_types"])
    rules = []
    for key in keys:
        original, op = _vae_key(key, n), "copy"
        if ".mid.attn_1." in original and original.endswith(".weight") and not original.split(".")[-2] == "norm":
            op = "conv1x1"
        rules.append(KeyRule(prefix + original, component, (key,), op))  # type: ignore[arg-type]
    return rules


def _vae_key(key: str, n_blocks: int) -> str:
    key = key.replace("conv_norm_out.", "norm_out.")
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        part, kind, i, rest = m.groups()
        if kind == "attentions":
            return f"{part}.mid.attn_1." + _rename(rest, _VAE_ATTENTION_RENAMES)
        return f"{part}.mid.block_{int(i) + 1}." + rest.replace("conv_shortcut.", "nin_shortcut.")
    m = re.match(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.*)", key)
    if m:
        i, _, j, rest = m.groups()
        if j is None:
            return f"encoder.down.{i}.downsample.{rest}"
        return f"encoder.down.{i}.block.{j}." + rest.replace("conv_shortcut.", "nin_shortcut.")
    m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", key)
    if m:
        i, _, j, rest = m.groups()
        level = n_blocks - 1 - int(i)  # the original decoder numbers its levels from the bottom up
        if j is None:
            return f"decoder.up.{level}.upsample.{rest}"
        return f"decoder.up.{level}.block.{j}." + rest.replace("conv_shortcut.", "nin_shortcut.")
    if re.match(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.|(post_)?quant_conv\.", key):
        return key
    raise KeyError(f"VAE key {key!r} has no original-layout rule")


# --- text encoders ---------------------------------------------------------------------------------

_OPENCLIP_RENAMES = (
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)


def canonical_clip_key(key: str) -> str:
    """The ``text_model.``-rooted name of a CLIP text-model key.

    transformers >= 5 drops the ``text_model.`` level from ``CLIPTextModel`` state dicts; checkpoints on disk
    (and transformers 4, A1111, ComfyUI) keep it, so it is the name sdtune writes and matches on.
    """
    return key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key


def hf_clip_rules(keys: Iterable[str], prefix: str, component: str) -> list[KeyRule]:
    """Rules for a Hugging Face ``CLIPTextModel`` stored as-is under ``prefix`` (SD 1.x, SDXL's CLIP-L)."""
    return [KeyRule(prefix + canonical_clip_key(key), component, (key,)) for key in keys]


def openclip_rules(keys: Iterable[str], prefix: str, component: str) -> list[KeyRule]:
    """Rules for a Hugging Face CLIP text model stored in OpenCLIP's layout (SD 2.x, SDXL's bigG)."""
    rules: list[KeyRule] = []
    module_key = {canonical_clip_key(k): k for k in keys}
    layers = sorted(
        {int(m.group(1)) for k in module_key if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    )
    for i in layers:
        hf = f"text_model.encoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            qkv = tuple(module_key[f"{hf}{p}_proj.{kind}"] for p in ("q", "k", "v"))
            rules.append(KeyRule(f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}", component, qkv, "split3"))
    fixed = {
        "text_model.embeddings.token_embedding.weight": ("token_embedding.weight", "copy"),
        "text_model.embeddings.position_embedding.weight": ("positional_embedding", "copy"),
        "text_model.final_layer_norm.weight": ("ln_final.weight", "copy"),
        "text_model.final_layer_norm.bias": ("ln_final.bias", "copy"),
        "text_projection.weight": ("text_projection", "transpose"),
    }
    for key, real_key in module_key.items():
        if key in fixed:
            original, op = fixed[key]
            rules.append(KeyRule(prefix + original, component, (real_key,), op))  # type: ignore[arg-type]
            continue
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", key)
        if m is None:
            raise KeyError(f"text-encoder key {key!r} has no OpenCLIP-layout rule")
        if m.group(2).startswith("self_attn.") and not m.group(2).startswith("self_attn.out_proj."):
            continue  # q/k/v are covered by the fused in_proj rules above
        original = f"{prefix}transformer.resblocks.{m.group(1)}." + _rename(m.group(2), _OPENCLIP_RENAMES)
        rules.append(KeyRule(original, component, (real_key,)))
    return rules


# --- applying rules --------------------------------------------------------------------------------


def to_diffusers(original: Mapping[str, torch.Tensor], rules: Iterable[KeyRule]) -> dict[str, dict[str, torch.Tensor]]:
    """Convert an original-layout state dict into one state dict per component.

    Raises ``KeyError`` listing the original keys the rules need but the checkpoint lacks.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    missing = []
    for rule in rules:
        tensor = original.get(rule.original)
        if tensor is None:
            missing.append(rule.original)
            continue
        target = out.setdefault(rule.component, {})
        if rule.op == "copy":
            target[rule.diffusers[0]] = tensor
        elif rule.op == "conv1x1":
            target[rule.diffusers[0]] = tensor.reshape(tensor.shape[0], tensor.shape[1])
        elif rule.op == "transpose":
            target[rule.diffusers[0]] = tensor.t().contiguous()
        else:  # split3
            for name, part in zip(rule.diffusers, tensor.chunk(3, dim=0), strict=False):
                target[name] = part.contiguous()
    if missing:
        raise KeyError(f"{len(missing)} tensors missing, e.g. {', '.join(missing[:3])}")
    return out


def to_original(
    components: Mapping[str, Mapping[str, torch.Tensor]], rules: Iterable[KeyRule]
) -> dict[str, torch.Tensor]:
    """Convert per-component diffusers state dicts into one original-layout state dict."""
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        sd = components[rule.component]
        if rule.op == "copy":
            out[rule.original] = sd[rule.diffusers[0]]
        elif rule.op == "conv1x1":
            t = sd[rule.diffusers[0]]
            out[rule.original] = t.reshape(*t.shape, 1, 1)
        elif rule.op == "transpose":
            out[rule.original] = sd[rule.diffusers[0]].t().contiguous()
        else:
            out[rule.original] = torch.cat([sd[k] for k in rule.diffusers], dim=0)
    return out


def _rename(rest: str, renames: Sequence[tuple[str, str]]) -> str:
    for old, new in renames:
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest
