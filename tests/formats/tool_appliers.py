"""How each UI applies one module of a kohya/LyCORIS LoRA file to a base weight, restated as test oracles.

Each function returns the weight the tool runs with, ``W + strength * (W_tool - W)``, from the module's file
tensors (``lora_up.weight``, ``hada_w1_a``, ``lokr_w1``, ``alpha``, ``dora_scale``, ...) and the base weight ``W``.
The formulas are written here from the facts in each tool's source (file and function named at each step), in
float64, so a test can compare a file sdtune wrote with what that tool makes of it. The tools' code is not used.

Which adapter kinds each tool applies from the kohya/LyCORIS file is :data:`SUPPORTS`; diffusers reads the kohya
file for LoRA/LoCon only (``loaders/lora_conversion_utils.py`` refuses ``hada_``/``lokr_`` keys and drops
``dora_scale``), so its DoRA goes through the PEFT file (tested with the real loader, not restated).

OFT / BOFT are multiplicative (the weight's rows rotated), and the UIs differ in how a strength scales them, so each
restatement below keeps its tool's own rule: A1111 interpolates the weight (``W + s (W' - W)``), ComfyUI scales the
rotation and then the difference again. A1111 reads no BOFT file with ``oft_blocks`` (its BOFT branch wants
``oft_diag``) and InvokeAI no OFT at all (``layers/utils.py`` ``any_lora_layer_from_state_dict`` has no OFT layer).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

Params = Mapping[str, torch.Tensor]

SUPPORTS: dict[str, tuple[str, ...]] = {
    "a1111": ("lora", "locon", "dora", "loha", "lokr", "oft"),
    "comfyui": ("lora", "locon", "dora", "loha", "lokr", "oft", "boft"),
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


def _cayley(q: torch.Tensor) -> torch.Tensor:
    """``(I + Q)(I - Q)^-1`` per block: what all three write as ``(I + q) @ (I - q).float().inverse()``."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


# --- A1111: extensions-builtin/Lora/network*.py ------------------------------------------------------


def _a1111_oft(w: torch.Tensor, p: Params, strength: float) -> torch.Tensor:
    """``network_oft.py`` ``NetworkModuleOFT`` with ``oft_blocks`` (its kohya branch; LyCORIS diag-OFT writes the
    same key and layout): ``num_blocks = oft_blocks.shape[0]``, ``block_size = out // num_blocks``, constraint
    ``alpha * out``; ``calc_updown``: ``block_Q = B - B^T``, ``block_Q *= (min(|Q|, constraint) + 1e-8) / (|Q| +
    1e-8)``, ``R = (I + Q)(I - Q)^-1``, rows rotated by einsum ``k n m, k n ... -> k m ...`` (``R^T`` on each block of
    rows), times ``rescale`` (reshaped ``[-1, 1, ...]``) when present, ``updown = merged - W``. ``__init__`` sets
    ``self.scale = 1.0``, so ``network.py`` ``finalize_updown`` returns ``updown * multiplier``."""
    blocks = p["oft_blocks"]
    k = blocks.shape[0]
    out = w.shape[0]
    q = blocks - blocks.transpose(1, 2)
    norm = q.flatten().norm()
    q = q * ((torch.clamp(norm, max=float(p["alpha"]) * out) + 1e-8) / (norm + 1e-8))
    r = _cayley(q)
    merged = torch.einsum("knm,kn...->km...", r, w.reshape(k, out // k, *w.shape[1:])).reshape(w.shape)
    if "rescale" in p:
        merged = p["rescale"].reshape(-1, *[1] * (w.dim() - 1)) * merged
    return w + (merged - w) * strength


def a1111(weight: torch.Tensor, params: Params, strength: float) -> torch.Tensor:
    """A1111 built-in Lora extension (OFT: :func:`_a1111_oft`).

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
    if "oft_blocks" in p:
        return _a1111_oft(w, p, strength)
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


# --- ComfyUI: comfy/weight_adapter/{lora,loha,lokr,oft,boft,base}.py ---------------------------------


def _comfyui_q(p: Params) -> torch.Tensor:
    """``q = blocks - blocks.transpose(-1, -2)``; ``if alpha > 0`` and ``|q| + 1e-8 > alpha``: ``q * alpha / (|q| +
    1e-8)`` (``alpha`` itself, not times the width; a missing alpha is 0 in ``oft.py``)."""
    blocks = p["oft_blocks"]
    q = blocks - blocks.transpose(-1, -2)
    alpha = float(p["alpha"]) if "alpha" in p else 0.0
    norm = q.norm() + 1e-8
    return q * alpha / norm if alpha > 0 and norm > alpha else q


def _comfyui_oft(w: torch.Tensor, p: Params, strength: float) -> torch.Tensor:
    """``oft.py`` ``OFTAdapter.calculate_weight`` (3-D ``oft_blocks``): ``lora_diff = einsum("k n m, k n ... -> k m
    ...", r * strength - strength * I, W.view(block_num, block_size, ...))``, ``weight += strength * lora_diff``;
    ``rescale`` is loaded but never used."""
    n, b, _ = p["oft_blocks"].shape
    r = _cayley(_comfyui_q(p))
    eye = torch.eye(b, dtype=r.dtype)
    diff = torch.einsum("knm,kn...->km...", r * strength - strength * eye, w.reshape(n, b, *w.shape[1:]))
    return w + strength * diff.reshape(w.shape)


def _comfyui_boft(w: torch.Tensor, p: Params, strength: float) -> torch.Tensor:
    """``boft.py`` ``BOFTAdapter.calculate_weight`` (4-D ``oft_blocks`` ``[m, n, b, b]``): for stage ``i``, ``bi =
    r[i]`` (times ``strength`` plus ``(1 - strength) I`` when ``strength != 1``), rows unflattened to ``(-1, 2,
    2^i b/2)``, axes 1 and 2 swapped, grouped by ``b``, einsum ``b i j, b j ... -> b i ...`` (``R_i`` on each group),
    and the rows put back the same way; then ``* rescale``, ``lora_diff = inp - W``, ``weight += strength *
    lora_diff``."""
    m, _, b, _ = p["oft_blocks"].shape
    r = _cayley(_comfyui_q(p))
    eye = torch.eye(b, dtype=r.dtype)
    rows = w
    for i in range(m):
        bi = r[i] * strength + (1 - strength) * eye if strength != 1 else r[i]
        k = 2**i * (b // 2)
        rows = rows.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        rows = torch.einsum("bij,bj...->bi...", bi, rows)
        rows = rows.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    if "rescale" in p:
        rows = rows * p["rescale"]
    return w + strength * (rows - w)


def comfyui(weight: torch.Tensor, params: Params, strength: float) -> torch.Tensor:
    """ComfyUI ``calculate_weight`` of its weight adapters (OFT / BOFT: :func:`_comfyui_oft`, :func:`_comfyui_boft`).

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
    if "oft_blocks" in p:
        return (_comfyui_boft if p["oft_blocks"].dim() == 4 else _comfyui_oft)(w, p, strength)
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
