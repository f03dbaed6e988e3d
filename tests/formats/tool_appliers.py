"""How each UI applies one module of a kohya/LyCORIS LoRA file to a base weight, restated as test oracles.

Each function returns the weight the tool runs with, ``W + strength * (W_tool - W)``, from the module's file
tensors (``lora_up.weight``, ``hada_w1_a``, ``lokr_w1``, ``alpha``, ``dora_scale``, ...) and the base weight ``W``.
The formulas are written here from the facts in each tool's source (file and function named at each step), in
float64, so a test can compare a file sdtune wrote with what that tool makes of it. The tools' code is not used.

Which adapter kinds each tool applies from the kohya/LyCORIS file is :data:`SUPPORTS`; diffusers reads the kohya
file for LoRA/LoCon only (``loaders/lora_conversion_utils.py`` refuses ``hada_``/``lokr_`` keys and drops
``dora_scale``), so its DoRA goes through the PEFT file (tested with the real loader, not restated).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

Params = Mapping[str, torch.Tensor]

SUPPORTS: dict[str, tuple[str, ...]] = {
    "a1111": ("lora", "locon", "dora", "loha", "lokr"),
    "comfyui": ("lora", "locon", "dora", "loha", "lokr"),
    "invokeai": ("lora", "locon", "dora", "loha", "lokr"),
}


def _f64(params: Params) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in params.items()}


def _alpha(p: Params) -> float | None:
    return float(p["alpha"]) if "alpha" in p else None


def _input_column_norm(weight: torch.Tensor) -> torch.Tensor:
    """``weight.transpose(0, 1).reshape(in, -1).norm(dim=1)`` shaped ``[1, in, 1, ...]``: the norm all three UIs
    take (A1111 ``apply_weight_decompose``, ComfyUI ``weight_decompose``, InvokeAI ``DoRALayer.get_weight``)."""
    norm = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1, keepdim=True)
    return norm.reshape(weight.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1)


# --- A1111: extensions-builtin/Lora/network*.py ------------------------------------------------------


def a1111(weight: torch.Tensor, params: Params, strength: float) -> torch.Tensor:
    """A1111 built-in Lora extension.

    ``network_lora.py`` ``NetworkModuleLora.calc_updown``: ``up @ down`` (a k x k conv down merged by
    ``conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)``), ``dim = down.shape[0]``.
    ``network_hada.py``: ``(w1a @ w1b) * (w2a @ w2b)``, ``dim = w1b.shape[0]``.
    ``network_lokr.py``: ``kron(w1, w2)`` (``w1 = w1a @ w1b`` when low-rank, same for ``w2``), ``dim`` =
    ``w2b.shape[0]`` if present, else ``w1b.shape[0]``, else none (full factors: scale 1).
    ``network.py`` ``NetworkModule.finalize_updown``: ``updown *= calc_scale()`` (``alpha / dim``, 1 without alpha
    or dim), then with ``dora_scale`` ``apply_weight_decompose``: ``W' = (W + updown) * dora_scale /
    ||W + updown||_col`` and ``updown = W' - W``; finally ``updown * multiplier()`` (the strength).
    """
    p, w = _f64(params), weight.double()
    if "lora_up.weight" in p:
        up, down = p["lora_up.weight"], p["lora_down.weight"]
        if down.dim() == 4 and down.shape[2:] != (1, 1):
            updown = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        else:
            updown = up.flatten(1) @ down.flatten(1)
        dim = down.shape[0]
    elif "hada_w1_a" in p:
        updown = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
        dim = p["hada_w1_b"].shape[0]
    else:
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        dim = p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else None
        dim = p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else dim
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        updown = torch.kron(w1, w2)
    updown = updown.reshape(w.shape)
    alpha = _alpha(p)
    updown = updown * (alpha / dim if alpha is not None and dim is not None else 1.0)
    if "dora_scale" in p:
        merged = w + updown
        updown = merged * (p["dora_scale"] / _input_column_norm(merged)) - w
    return w + updown * strength


# --- ComfyUI: comfy/weight_adapter/{lora,loha,lokr,base}.py ------------------------------------------


def comfyui(weight: torch.Tensor, params: Params, strength: float) -> torch.Tensor:
    """ComfyUI ``calculate_weight`` of its weight adapters.

    ``lora.py`` ``LoRAAdapter``: ``alpha = alpha / mat2.shape[0]`` (``mat2`` = down), ``lora_diff =
    mat1.flatten(1) @ mat2.flatten(1)`` reshaped to the weight. ``loha.py``: ``alpha / w1b.shape[0]``,
    ``(w1a @ w1b) * (w2a @ w2b)``. ``lokr.py``: ``dim`` = ``w1_b.shape[0]``, then ``w2_b.shape[0]`` if low-rank,
    ``alpha / dim`` or 1.0 with no low-rank factor; ``kron(w1, w2)``.
    Without ``dora_scale``: ``weight += strength * alpha * lora_diff``. With it, ``base.py`` ``weight_decompose``:
    ``weight_calc = W + alpha * lora_diff``, divided per input column by its norm and times ``dora_scale``;
    ``weight += strength * (weight_calc - W)``. (Newer ComfyUI also has a per-output-row branch, taken when
    ``dora_scale.shape[0] == W.shape[0]``; a ``[1, in]`` scale never takes it.)
    """
    p, w = _f64(params), weight.double()
    alpha = _alpha(p)
    if "lora_up.weight" in p:
        mat1, mat2 = p["lora_up.weight"], p["lora_down.weight"]
        scale = alpha / mat2.shape[0] if alpha is not None else 1.0
        diff = (mat1.flatten(1) @ mat2.flatten(1)).reshape(w.shape)
    elif "hada_w1_a" in p:
        scale = alpha / p["hada_w1_b"].shape[0] if alpha is not None else 1.0
        diff = ((p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])).reshape(w.shape)
    else:
        dim = None
        if "lokr_w1" in p:
            w1 = p["lokr_w1"]
        else:
            dim, w1 = p["lokr_w1_b"].shape[0], p["lokr_w1_a"] @ p["lokr_w1_b"]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        else:
            dim, w2 = p["lokr_w2_b"].shape[0], p["lokr_w2_a"] @ p["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        diff = torch.kron(w1, w2).reshape(w.shape)
    if "dora_scale" not in p:
        return w + strength * scale * diff
    calc = w + diff * scale
    calc = calc * (p["dora_scale"] / _input_column_norm(calc))
    return w + strength * (calc - w)


# --- InvokeAI: invokeai/backend/patches/layers/*.py --------------------------------------------------


def invokeai(weight: torch.Tensor, params: Params, strength: float) -> torch.Tensor:
    """InvokeAI's patch layers (``get_parameters(orig, weight)``: the returned delta times the patch weight).

    ``lora_layer_base.py`` ``LoRALayerBase.scale``: ``alpha / rank``, 1.0 without alpha or rank.
    ``lora_layer.py`` ``LoRALayer.get_weight``: ``up.reshape(out, -1) @ down.reshape(rank, -1)``, rank
    ``down.shape[0]``. ``loha_layer.py``: ``(w1_a @ w1_b) * (w2_a @ w2_b)``, rank ``w1_b.shape[0]``.
    ``lokr_layer.py``: ``kron(w1, w2)``, rank ``w1_b.shape[0]``, else ``w2_b.shape[0]``, else none (scale 1).
    ``dora_layer.py`` ``DoRALayer.get_weight``: ``out = W + scale * up @ down``, ``out *= dora_scale /
    ||out||_col``, delta ``out - W`` (the scale inside; ``get_parameters`` multiplies by the weight only).
    """
    p, w = _f64(params), weight.double()
    alpha = _alpha(p)
    if "lora_up.weight" in p:
        up, down = p["lora_up.weight"], p["lora_down.weight"]
        rank = down.shape[0]
        delta = (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)).reshape(w.shape)
    elif "hada_w1_a" in p:
        rank = p["hada_w1_b"].shape[0]
        delta = ((p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])).reshape(w.shape)
    else:
        rank = p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else None
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2).reshape(w.shape)
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    if "dora_scale" not in p:
        return w + delta * (strength * scale)
    out = w + delta * scale
    out = out * (p["dora_scale"] / _input_column_norm(out))
    return w + (out - w) * strength


APPLIERS: dict[str, Callable[[torch.Tensor, Params, float], torch.Tensor]] = {
    "a1111": a1111,
    "comfyui": comfyui,
    "invokeai": invokeai,
}
