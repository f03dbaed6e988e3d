"""The LoRA family through peft: one vocabulary (build config, inject, check, state) for every adapter kind.

- ``lora``: low-rank ``B @ A`` on Linear layers (Hu et al. 2021)
- ``dora``: LoRA with a learned magnitude per *input column* (Liu et al. 2024), the convention A1111, ComfyUI and
  InvokeAI apply (``dora_scale`` ``[1, in]``); peft's ``use_dora`` normalises output rows instead, so the layers
  are sdtune's (:mod:`sdtune.adapters.dora`) inside peft's LoRA machinery
- ``locon``: LoRA on the convolutions too (LyCORIS' name for it); the targets decide, see ``models.targets``
- ``loha``: Hadamard product of two low-rank products (LyCORIS LoHa), peft ``LoHaConfig``
- ``lokr``: Kronecker product with a low-rank factor (LyCORIS LoKr), peft ``LoKrConfig``
- ``oft`` / ``boft``: multiplicative, a rotation of each layer's output channels (LyCORIS diag-OFT / BOFT); peft's
  OFT/BOFT rotate the input instead, so the layers are sdtune's (:mod:`sdtune.adapters.oft`), built by
  :func:`sdtune.adapters.oft.orthogonal_config` (they have no rank); the functions below work for them too
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from sdtune.adapters.dora import input_dora_config
from sdtune.adapters.oft import inject_orthogonal, is_orthogonal

AdapterKind = Literal["lora", "dora", "locon", "loha", "lokr"]


def peft_config(
    kind: AdapterKind,
    rank: int,
    alpha: float,
    targets: Sequence[str],
    dropout: float = 0.0,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    conv_modules: Sequence[str] = (),
    *,
    ranks: Mapping[str, int] | None = None,
    alphas: Mapping[str, float] | None = None,
):
    """A peft config for ``kind``; ``conv_rank``/``conv_alpha`` apply to the modules named in ``conv_modules``.

    ``ranks`` / ``alphas`` give single modules (full paths, e.g. per-block ranks) their own rank and alpha; they take
    precedence over the suffix patterns (peft uses the first pattern that matches)."""
    rank_pattern = {name: conv_rank for name in conv_modules} if conv_rank else {}
    alpha_pattern = {name: conv_alpha for name in conv_modules} if conv_alpha else {}
    rank_pattern = {**(ranks or {}), **{k: v for k, v in rank_pattern.items() if k not in (ranks or {})}}
    alpha_pattern = {**(alphas or {}), **{k: v for k, v in alpha_pattern.items() if k not in (alphas or {})}}
    common = {"r": rank, "target_modules": list(targets), "rank_pattern": rank_pattern}
    if kind in ("lora", "dora", "locon"):
        make = input_dora_config if kind == "dora" else LoraConfig
        return make(
            lora_alpha=alpha, lora_dropout=dropout, alpha_pattern=alpha_pattern, init_lora_weights=True, **common
        )
    if kind == "loha":
        return LoHaConfig(alpha=alpha, module_dropout=dropout, alpha_pattern=alpha_pattern, init_weights=True, **common)
    return LoKrConfig(alpha=alpha, module_dropout=dropout, alpha_pattern=alpha_pattern, init_weights=True, **common)


def matching_modules(module: nn.Module, suffixes: Sequence[str]) -> dict[str, list[str]]:
    """For each target suffix, the Linear/Conv2d module names it matches (as peft matches: whole dotted parts)."""
    layers = [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return {s: [n for n in layers if n == s or n.endswith("." + s)] for s in suffixes}


def check_targets(modules: dict[str, nn.Module], suffixes: Sequence[str]) -> None:
    """Every target must match a layer in one of ``modules``; else name the nearest real module names."""
    found = {s: [] for s in suffixes}
    for module in modules.values():
        for suffix, names in matching_modules(module, suffixes).items():
            found[suffix] += names
    for suffix, names in found.items():
        if not names:
            candidates = sorted({n.split(".")[-1] for m in modules.values() for n, _ in m.named_modules() if n})
            near = difflib.get_close_matches(suffix.split(".")[-1], candidates, n=3, cutoff=0.5)
            hint = f"; nearest module names: {', '.join(near)}" if near else ""
            raise ValueError(f"'{suffix}' matches no Linear or Conv2d layer{hint}")


def check_rank(module: nn.Module, suffixes: Sequence[str], rank: int, ranks: Mapping[str, int] | None = None) -> None:
    """A rank above a targeted layer's smaller side adds parameters that can learn nothing more. ``ranks`` gives
    single modules (full paths) their own rank."""
    for names in matching_modules(module, suffixes).values():
        for name in names:
            layer = module.get_submodule(name)
            width = (
                min(layer.in_features, layer.out_features)
                if isinstance(layer, nn.Linear)
                else min(layer.in_channels, layer.out_channels)
            )
            wanted = (ranks or {}).get(name, rank)
            if wanted > width:
                raise ValueError(f"rank {wanted} exceeds the width {width} of layer '{name}'; use a rank <= {width}")


def add_adapter(module: nn.Module, config, adapter_name: str = "default") -> None:
    """Add adapter ``adapter_name`` of ``config`` to ``module``: through peft, OFT / BOFT through their own
    :func:`~sdtune.adapters.oft.inject_orthogonal` (peft's LoRA tuner would not wrap an existing LoRA layer)."""
    if is_orthogonal(config):
        inject_orthogonal(module, config, adapter_name)
    else:
        inject_adapter_in_model(config, module, adapter_name=adapter_name)


def inject(module: nn.Module, config) -> list[nn.Parameter]:
    """Add the adapter to ``module`` (frozen beforehand) and return its trainable parameters."""
    add_adapter(module, config)
    return [p for p in module.parameters() if p.requires_grad]


def adapter_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's names (what :mod:`sdtune.formats.lora_files` converts)."""
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(module).items()}


def set_merged(module: nn.Module, merged: bool) -> None:
    """Merge the adapter into the base weights (for export or fast inference) or take it out again. Nested adapter
    layers (a second file on the same layer) merge innermost first, the order they act in, and unmerge outermost
    first: OFT's rotation does not commute with what it wraps."""
    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]  # parents before their children
    for layer in reversed(layers) if merged else layers:
        if merged and not layer.merged:
            layer.merge()
        elif not merged and layer.merged:
            layer.unmerge()
