"""DoRA with a magnitude per *input* column: the convention A1111, ComfyUI and InvokeAI apply.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") splits a weight into a magnitude and a
direction. The UIs that load kohya/LyCORIS files all normalise per input column (``dora_scale`` ``[1, in]``,
conv ``[1, in, 1, 1]``): A1111 ``extensions-builtin/Lora/network.py`` ``NetworkModule.apply_weight_decompose``,
ComfyUI ``comfy/weight_adapter/base.py`` ``weight_decompose`` and InvokeAI
``invokeai/backend/patches/layers/dora_layer.py`` ``DoRALayer.get_weight`` all take
``(W + s B A).transpose(0, 1).reshape(in, -1).norm(dim=1)``. peft's ``use_dora`` (and diffusers, LyCORIS'
``wd_on_output=True``) normalise output rows instead, which those UIs apply wrongly, so sdtune trains this one:

    W' = (W + s B A) diag(c),   c_j = m_j / ||(W + s B A)[:, j]||       (conv: the norm over out, kh, kw)

so ``y = (W + s B A) (c * x)``: the input channels are scaled. ``m`` starts at the column norms of ``W``
(``B = 0``), so the adapted model starts as the base. As the paper (section 4.3) and peft do, the norm is
detached in the backward pass: it is treated as a constant, which saves memory; the forward value is exact.

The layers subclass peft's ``lora.Linear`` / ``lora.Conv2d`` (registered on a ``LoraConfig`` with
``use_dora=True`` through ``_register_custom_module``) and replace peft's DoRA variant with this one, so peft's
inject / state dict / merge vocabulary works unchanged. The magnitude is the adapter parameter
``lora_input_magnitude`` (state-dict key ``<module>.lora_input_magnitude``): a name apart from peft's
``lora_magnitude_vector``, so a state or file never leaves the axis to be guessed from shapes.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import layer as lora_layer
from peft.tuners.lora import variants
from torch import nn

MAGNITUDE = "lora_input_magnitude"


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each input column of a Linear ``[out, in]`` or Conv2d ``[out, in, kh, kw]`` weight: ``[in]``."""
    return torch.linalg.vector_norm(weight, dim=[d for d in range(weight.dim()) if d != 1])


def _per_input(vector: torch.Tensor, dims: int) -> torch.Tensor:
    """``[in]`` shaped to broadcast over a weight (``[1, in]``, ``[1, in, 1, 1]``) or an input (same layout)."""
    return vector.reshape(1, -1, *[1] * (dims - 2))


def input_dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """The adapted weight ``(W + delta) * m / ||W + delta||_col`` (``delta`` = ``s B A`` in ``W``'s shape)."""
    adapted = weight + delta
    return adapted * _per_input(magnitude.flatten() / column_norm(adapted), adapted.dim())


class InputDoraVariant(lora_layer.LoraVariant):
    """peft's variant hooks (``peft/tuners/lora/layer.py`` ``LoraVariant``) for per-input-column DoRA."""

    def supports_lora_conversion(self) -> bool:
        return False  # its merged delta is not low-rank

    @staticmethod
    def init(module: lora_layer.LoraLayer, adapter_name: str, **kwargs: Any) -> None:
        base = module.get_base_layer()
        if getattr(base, "groups", 1) != 1:
            raise ValueError("DoRA on a grouped convolution is not supported")
        with torch.no_grad():
            weight = base.weight.float() + module.get_delta_weight(adapter_name).float()
            norm = column_norm(weight).to(module.lora_A[adapter_name].weight.dtype)
        getattr(module, MAGNITUDE)[adapter_name] = nn.Parameter(norm)

    @staticmethod
    def _scale(module: lora_layer.LoraLayer, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        """``c = m / ||W + s B A||_col`` for base weight ``weight``, the norm detached."""
        delta = module.get_delta_weight(adapter)
        norm = column_norm(weight.to(delta.dtype) + delta).detach()
        return getattr(module, MAGNITUDE)[adapter] / norm

    @staticmethod
    def merge_safe(module: lora_layer.LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        scale = InputDoraVariant._scale(module, active_adapter, orig_weight).detach()
        module._cache_store(f"{active_adapter}-input-dora-scale", scale)
        merged = (orig_weight + module.get_delta_weight(active_adapter)) * _per_input(scale, orig_weight.dim())
        return merged.to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: lora_layer.LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data = InputDoraVariant.merge_safe(module, active_adapter, orig_weight.data)

    @staticmethod
    def unmerge(module: lora_layer.LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        scale = module._cache_pop(f"{active_adapter}-input-dora-scale")
        weight = orig_weight.data / _per_input(scale, orig_weight.dim()) - module.get_delta_weight(active_adapter)
        return weight.to(orig_weight.dtype)

    @staticmethod
    def forward(
        module: lora_layer.LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """``result + W((c - 1) x) + s B A (c x)``: the adapted layer's output minus the base's, added."""
        base = module.get_base_layer()
        scale = InputDoraVariant._scale(module, active_adapter, base.weight)  # [in]: a Linear's last input axis
        if isinstance(base, nn.Conv2d):
            scale = _per_input(scale, x.dim())  # a convolution's channel axis 1
        x = module.lora_dropout[active_adapter](x)
        lora = module.lora_B[active_adapter](module.lora_A[active_adapter](x * scale))
        shifted = (x * (scale - 1)).to(base.weight.dtype)
        if isinstance(base, nn.Conv2d):
            through_base = base._conv_forward(shifted, base.weight, None)
        else:
            through_base = nn.functional.linear(shifted, base.weight)
        return result + through_base + lora * module.scaling[active_adapter]


class _InputDoraLayer:
    """What both layer kinds add to peft's: the magnitude container and the variant for ``use_dora``.

    An adapter from a config without these layers (e.g. an older per-output-row DoRA file applied to the same
    layer) keeps peft's own variant, so one layer can hold both kinds.
    """

    adapter_layer_names = (*lora_layer.LoraLayer.adapter_layer_names, MAGNITUDE)
    _output_dora: type[lora_layer.LoraVariant]

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> lora_layer.LoraVariant | None:
        if config.use_dora and not is_input_dora(config):
            return self._output_dora()
        return super().resolve_lora_variant(config=config, **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        if MAGNITUDE not in self._modules:
            self.add_module(MAGNITUDE, nn.ParameterDict())
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    @property
    def lora_variants(self) -> dict:
        return {(): None, ("use_dora",): InputDoraVariant}


class InputDoraLinear(_InputDoraLayer, lora_layer.Linear):
    """peft's ``lora.Linear`` with per-input-column DoRA for ``use_dora`` adapters."""

    _output_dora = variants.DoraLinearVariant


class InputDoraConv2d(_InputDoraLayer, lora_layer.Conv2d):
    """peft's ``lora.Conv2d`` with per-input-channel DoRA (norm over out, kh, kw) for ``use_dora`` adapters."""

    conv_fn = staticmethod(nn.functional.conv2d)  # peft sets it after ``update_layer``; the init needs it
    _output_dora = variants.DoraConv2dVariant

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``s * B @ A`` as a ``[out, in, kh, kw]`` weight: the matrix product of the flattened factors, which
        equals peft's ``conv2d(A^T, B)`` (groups are 1 here) and is much faster on CPU; DoRA needs it per step."""
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        weight = self.get_base_layer().weight
        return (b.flatten(1) @ a.flatten(1)).reshape(weight.shape) * self.scaling[adapter]


INPUT_DORA_LAYERS = (InputDoraLinear, InputDoraConv2d)


def input_dora_config(**kwargs: Any) -> LoraConfig:
    """A ``LoraConfig`` (``use_dora=True``) whose Linear/Conv2d layers are the per-input-column DoRA layers."""
    config = LoraConfig(**kwargs, use_dora=True)
    config._register_custom_module({nn.Linear: InputDoraLinear, nn.Conv2d: InputDoraConv2d})
    return config


def is_input_dora(config: object) -> bool:
    """Whether ``config`` builds the per-input-column DoRA layers (else peft's own, per output row, if DoRA)."""
    custom = getattr(config, "_custom_modules", None) or {}
    return InputDoraLinear in custom.values()
