"""LoRA-family adapters between sdtune's PEFT state and the files other tools load.

sdtune holds an adapter, per component (``unet``, ``text_encoder``, ``text_encoder_2``), as PEFT's adapter
state dict (``peft.get_peft_model_state_dict``) plus its PEFT config. This module converts that to and from

- the kohya / LyCORIS layout (``lora_unet_<module>.lora_down.weight`` ...; names in
  :mod:`sdtune.formats.lora_keys`) that A1111, ComfyUI, sd-scripts, LyCORIS and diffusers' kohya converter
  (``diffusers/loaders/lora_conversion_utils.py``) read, and
- the diffusers PEFT layout (``unet.<module>.lora_A.weight`` with ``lora_adapter_metadata``) that
  ``pipe.load_lora_weights`` reads natively.

Tensor conventions (kohya ``networks/lora.py``; LyCORIS ``lycoris/modules/{locon,loha,lokr}.py``):

- LoRA/LoCon: ``lora_down`` = PEFT ``lora_A`` (``[r, in]`` or conv ``[r, in, k, k]``), ``lora_up`` = ``lora_B``
  (``[out, r]`` or ``[out, r, 1, 1]``), ``alpha`` a 0-dim float; the update is ``alpha / r * up @ down``, so a
  PEFT scale ``s`` (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA) is written as ``alpha = s * r``.
- DoRA: ``dora_scale`` is the magnitude of each *input column*, shape ``[1, in]`` (conv ``[1, in, 1, 1]``), what
  A1111, ComfyUI and InvokeAI apply and LyCORIS with ``wd_on_output=False`` (sdtune's ``lora_input_magnitude``,
  :mod:`sdtune.adapters.dora`). Files with a per-*output*-row ``[out, 1]`` (conv ``[out, 1, 1, 1]``) scale
  (LyCORIS' default ``wd_on_output=True``, sdtune before the change) still load, as peft's ``use_dora``
  (``lora_magnitude_vector``); the shape tells the two apart.
  diffusers/peft know only the output-row DoRA, and a per-input-column DoRA's merged delta
  ``W (D - I) + s B A D`` is not low-rank, so the PEFT layout gets it as a plain LoRA whose ``B @ A`` is that
  delta exactly (:func:`dense_lora_from_dora`; rank ``min(out, in * k * k)``, a larger file).
- LoHa: ``hada_w1_a [out, r]``, ``hada_w1_b [r, in*k*k]`` (same for ``w2``): PEFT's names and shapes.
- LoKr: ``lokr_w1`` or ``lokr_w1_a/b``, ``lokr_w2`` or ``lokr_w2_a/b`` with PEFT's (= LyCORIS') factorisation.
  When both factors are full matrices, LyCORIS, A1111 and ComfyUI ignore ``alpha`` (scale 1), so the PEFT scale
  is multiplied into ``lokr_w2`` and ``alpha`` is written as 1.
- OFT / BOFT (:mod:`sdtune.adapters.oft`, LyCORIS ``diag_oft.py`` / ``boft.py``): ``oft_blocks`` ``[n, b, b]`` /
  ``[m, n, b, b]`` and ``rescale`` ``[out, 1(, 1, 1)]`` are sdtune's tensors; ``alpha`` is the COFT constraint, and
  the readers disagree on it: LyCORIS and A1111 (``network_oft.py``, its kohya-OFT branch for ``oft_blocks``) limit
  ``||Q||`` to ``alpha * out`` and A1111 turns ``alpha = 0`` into no rotation at all (it clamps to 0); ComfyUI
  (``weight_adapter/oft.py``, ``boft.py``) limits it to ``alpha`` itself and takes 0 as none. So the constraint is
  applied to the blocks before writing (``Q`` scales with ``B``) and ``alpha`` is written as ``max(1, 2 ||Q||)``,
  a bound no reader clamps at: all of them then rotate by exactly the trained ``R``. Reading applies LyCORIS' rule.
"""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig
from peft.tuners.lokr.layer import factorization
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import get_pattern_key
from torch import nn

from sdtune.adapters.dora import MAGNITUDE, input_dora_config, input_dora_weight, is_input_dora
from sdtune.adapters.oft import OrthogonalConfig, blocks_shape, constrained, is_orthogonal, orthogonal_config, skew
from sdtune.core.errors import ModelError
from sdtune.formats.lora_keys import clip_module_path, kohya_module_name, kohya_name_table, unet_module_names_for
from sdtune.formats.lora_metadata import (  # re-exported: the LoRA file API lives here
    KOHYA_PARAM_NAMES,
    PEFT_PARAM_NAMES,
    detect_lora_layout,
    kohya_metadata,
    lora_summary,
    module_algo,
    save_lora,
    split_param,
)
from sdtune.models.family import ModelFamily

__all__ = [
    "dense_lora_from_dora",
    "one_alpha",
    "detect_lora_layout",
    "from_kohya",
    "kohya_metadata",
    "lora_summary",
    "peft_diffusers_metadata",
    "save_lora",
    "to_kohya",
    "to_peft_diffusers",
]

PeftConfig = LoraConfig | LoHaConfig | LoKrConfig | OrthogonalConfig
States = dict[str, dict[str, torch.Tensor]]


def _group(state: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
    names = tuple(names)
    out: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, tensor in state.items():
        module, param = split_param(key, names)
        out[module][param] = tensor
    return out


def _peft_scale(config: PeftConfig, path: str, rank: int) -> float:
    """The scale PEFT applies to module ``path`` (``peft/tuners/*/layer.py`` ``update_layer``)."""
    alpha_default = config.lora_alpha if isinstance(config, LoraConfig) else config.alpha
    alpha = config.alpha_pattern.get(get_pattern_key(list(config.alpha_pattern), path), alpha_default)
    if isinstance(config, LoKrConfig):  # LoKr's scale uses the configured rank even for full-matrix factors
        rank = config.rank_pattern.get(get_pattern_key(list(config.rank_pattern), path), config.r)
    if isinstance(config, LoraConfig) and config.use_rslora:
        return alpha / math.sqrt(rank)
    return alpha / rank


def to_kohya(
    states: Mapping[str, Mapping[str, torch.Tensor]],
    configs: Mapping[str, PeftConfig],
    family: ModelFamily,
    unet_config: Mapping[str, Any] | None,
) -> dict[str, torch.Tensor]:
    """kohya/LyCORIS tensors of PEFT adapter states (one state dict and config per component)."""
    out: dict[str, torch.Tensor] = {}
    for component, state in states.items():
        config = configs[component]
        for path, p in _group(state, PEFT_PARAM_NAMES).items():
            name = kohya_module_name(component, path, family, unet_config)
            algo = module_algo(p)
            if {"hada_t1", "lokr_t2"} & p.keys():
                raise ModelError(f"'{path}' uses PEFT's use_effective_conv2d (Tucker), which sdtune does not export")
            if algo in ("lora", "dora"):
                rank = p["lora_A.weight"].shape[0]
                out[f"{name}.lora_down.weight"] = p["lora_A.weight"]
                out[f"{name}.lora_up.weight"] = p["lora_B.weight"]
                alpha = _peft_scale(config, path, rank) * rank
                if algo == "dora":
                    out[f"{name}.dora_scale"] = _dora_scale(p)
            elif algo in ("oft", "boft"):
                constraint = config.oft_constraint if isinstance(config, OrthogonalConfig) else 0.0
                out[f"{name}.oft_blocks"], alpha = oft_file_blocks(p["oft_blocks"], constraint)
                if "oft_rescale" in p:
                    out[f"{name}.rescale"] = p["oft_rescale"]
            elif algo == "loha":
                rank = p["hada_w1_b"].shape[0]
                out.update({f"{name}.{k}": v for k, v in p.items()})
                alpha = _peft_scale(config, path, rank) * rank
            else:
                scale = _peft_scale(config, path, 1)  # LoKr: alpha / configured r
                low_rank = p.get("lokr_w2_a", p.get("lokr_w1_a"))
                out.update({f"{name}.{k}": v for k, v in p.items()})
                if low_rank is None:  # both factors full: readers use scale 1, so bake PEFT's scale in
                    out[f"{name}.lokr_w2"] = p["lokr_w2"] * scale
                    alpha = 1.0
                else:
                    alpha = scale * low_rank.shape[1]
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def one_alpha(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya tensors whose LoRA / DoRA modules all carry one ``alpha`` (the most common one), each module's own scale
    ``alpha / rank`` kept by multiplying its ``lora_up`` by ``alpha / common``: the same weights in every tool.

    For files with per-module alphas (per-block ranks and alphas): diffusers' kohya converter (0.42,
    ``get_peft_kwargs``) builds its ``alpha_pattern`` from old attention-processor names (``...attn1.processor.
    to_k_lora.down.weight``) that match no module, so attention layers whose alpha is not the most common one get
    the wrong scale; with one alpha there is no pattern to get wrong. LoHa / LoKr modules are left as they are
    (diffusers does not load them)."""
    out = dict(tensors)
    alphas = {k: float(v) for k, v in tensors.items() if k.endswith(".alpha") and f"{k[:-6]}.lora_up.weight" in tensors}
    if len(set(alphas.values())) <= 1:
        return out
    common = collections.Counter(alphas.values()).most_common(1)[0][0]
    for key, alpha in alphas.items():
        if alpha != common:
            up = f"{key[:-6]}.lora_up.weight"
            out[up] = (tensors[up].double() * (alpha / common)).to(tensors[up].dtype)
            out[key] = torch.tensor(common, dtype=tensors[key].dtype)
    return out


def _oft_width(blocks: torch.Tensor) -> int:
    """The output width ``n * b`` an OFT ``[n, b, b]`` or BOFT ``[m, n, b, b]`` tensor rotates."""
    return blocks.shape[-3] * blocks.shape[-1]


def _limit_blocks(blocks: torch.Tensor, limit: float) -> torch.Tensor:
    """``blocks`` scaled so that ``Q = B - B^T`` meets COFT's ``||Q|| <= limit`` (the same ``R`` without it)."""
    q = skew(blocks.double())
    norm = torch.linalg.vector_norm(q)
    if limit <= 0 or norm == 0:
        return blocks
    factor = torch.linalg.vector_norm(constrained(q, limit)) / norm
    return (blocks.double() * factor).to(blocks.dtype)


def oft_file_blocks(blocks: torch.Tensor, constraint: float) -> tuple[torch.Tensor, float]:
    """``(oft_blocks, alpha)`` to write: the constraint (``||Q|| <= constraint * out``) applied to the blocks, and an
    ``alpha`` of ``max(1, 2 ||Q||)`` that neither LyCORIS / A1111 (``alpha * out``) nor ComfyUI (``alpha``) clamp at."""
    written = _limit_blocks(blocks, constraint * _oft_width(blocks))
    norm = float(torch.linalg.vector_norm(skew(written.double())))
    return written, max(1.0, 2.0 * norm)


def _dora_scale(p: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """kohya ``dora_scale`` of one module's PEFT DoRA tensors: ``[1, in(, 1, 1)]`` per input column (sdtune's),
    ``[out, 1(, 1, 1)]`` per output row (peft's ``lora_magnitude_vector``, ``[out]`` or conv ``[1, out, 1, 1]``)."""
    dims = p["lora_B.weight"].dim()
    if MAGNITUDE in p:
        return p[MAGNITUDE].reshape(1, -1, *[1] * (dims - 2))
    magnitude = p.get("lora_magnitude_vector", p.get("lora_magnitude_vector.weight"))
    return magnitude.reshape(-1, *[1] * (dims - 1))


def from_kohya(
    tensors: Mapping[str, torch.Tensor],
    family: ModelFamily,
    unet_config: Mapping[str, Any],
    module_names: Mapping[str, Iterable[str]],
) -> tuple[States, dict[str, PeftConfig]]:
    """PEFT adapter states and configs per component from kohya/LyCORIS tensors; the inverse of :func:`to_kohya`.

    ``module_names`` gives each text encoder's adaptable module names (``named_modules()`` of the loaded model,
    e.g. :func:`sdtune.formats.lora_keys.adaptable_module_names`); the UNet's default to its config's.
    """
    names = dict(module_names)
    names.setdefault("unet", unet_module_names_for(unet_config))
    table = kohya_name_table(family, names, unet_config)
    grouped: dict[str, dict[str, dict[str, torch.Tensor]]] = collections.defaultdict(dict)
    unknown = []
    for name, params in _group(tensors, KOHYA_PARAM_NAMES).items():
        if name not in table:
            unknown.append(name)
            continue
        component, path = table[name]
        grouped[component][path] = params
    if unknown:
        raise ModelError(
            f"{len(unknown)} LoRA modules match no module of this {family.name} model, e.g. '{unknown[0]}'; "
            "is the file for another model family?"
        )
    states: States = {}
    configs: dict[str, PeftConfig] = {}
    for component, modules in grouped.items():
        algos = {module_algo(p) for p in modules.values()}
        if len(algos) > 1:
            raise ModelError(f"{component} LoRA mixes algorithms ({', '.join(sorted(algos))}); PEFT needs one")
        algo = algos.pop()
        readers = {"lokr": _lokr_from_kohya, "oft": _oft_from_kohya, "boft": _oft_from_kohya}
        convert = readers.get(algo, _lora_from_kohya)
        states[component], configs[component] = convert(modules, algo)
    return states, configs


def _alpha(params: Mapping[str, torch.Tensor], rank: int) -> float:
    # kohya networks/lora.py: a missing or zero alpha means alpha = rank (scale 1).
    alpha = float(params["alpha"]) if "alpha" in params else 0.0
    return alpha or float(rank)


def _config_kwargs(ranks: Mapping[str, int], alphas: Mapping[str, float]) -> dict[str, Any]:
    """Most common rank/alpha as defaults, the rest as PEFT ``rank_pattern`` / ``alpha_pattern`` (full paths)."""
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {p: v for p, v in ranks.items() if v != r},
        "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha},
    }


def _lora_from_kohya(modules: Mapping[str, Mapping[str, torch.Tensor]], algo: str) -> tuple[dict, PeftConfig]:
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    axes: set[str] = set()
    for path, p in modules.items():
        if any(k in p for k in ("lora_mid.weight", "hada_t1")):
            raise ModelError(f"'{path}' uses LyCORIS' Tucker (CP) decomposition, which sdtune does not convert")
        if algo == "loha":
            ranks[path] = p["hada_w1_b"].shape[0]
            state.update({f"{path}.{k}": p[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")})
        else:
            up = p["lora_up.weight"]
            ranks[path] = p["lora_down.weight"].shape[0]
            state[f"{path}.lora_A.weight"] = p["lora_down.weight"]
            state[f"{path}.lora_B.weight"] = up
            if algo == "dora":
                axis = _dora_param(path, p)
                state[f"{path}.{axis}"] = _dora_magnitude(path, p)
                axes.add(axis)
        alphas[path] = _alpha(p, ranks[path])
    kwargs = _config_kwargs(ranks, alphas)
    if algo == "loha":
        return state, LoHaConfig(**kwargs)
    kwargs["lora_alpha"] = kwargs.pop("alpha")
    if len(axes) > 1:
        raise ModelError("the file mixes per-input-column and per-output-row dora_scale; PEFT needs one per model part")
    if axes == {MAGNITUDE}:
        return state, input_dora_config(**kwargs)
    return state, LoraConfig(**kwargs, use_dora=algo == "dora")


def _dora_param(path: str, p: Mapping[str, torch.Tensor]) -> str:
    """Which DoRA a kohya ``dora_scale`` is: ``[1, in(, 1, 1)]`` per input column (sdtune's DoRA, A1111, ComfyUI,
    InvokeAI, LyCORIS ``wd_on_output=False``) or ``[out, 1(, 1, 1)]`` per output row (peft, LyCORIS' default)."""
    scale, up, down = p["dora_scale"], p["lora_up.weight"], p["lora_down.weight"]
    ones = [1] * (up.dim() - 2)
    if tuple(scale.shape) == (1, down.shape[1], *ones):
        return MAGNITUDE
    if tuple(scale.shape) == (up.shape[0], 1, *ones):
        return "lora_magnitude_vector"
    raise ModelError(
        f"'{path}' has a dora_scale of shape {tuple(scale.shape)}; expected {(1, down.shape[1], *ones)} (per input "
        f"column) or {(up.shape[0], 1, *ones)} (per output row)"
    )


def _dora_magnitude(path: str, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The PEFT magnitude tensor of a kohya ``dora_scale``: ``[in]`` (sdtune's), or peft's ``[out]`` / conv
    ``[1, out, 1, 1]``."""
    scale, dims = p["dora_scale"], p["lora_up.weight"].dim()
    if _dora_param(path, p) == MAGNITUDE:
        return scale.flatten()
    return scale.reshape((-1,) if dims == 2 else (1, -1, *[1] * (dims - 2)))


def _lokr_from_kohya(modules: Mapping[str, Mapping[str, torch.Tensor]], algo: str) -> tuple[dict, PeftConfig]:
    """LoKr: pick PEFT's ``r``, ``decompose_both`` and ``decompose_factor`` so it rebuilds the same factors.

    PEFT (``peft/tuners/lokr/layer.py`` ``update_layer``) and LyCORIS (``lycoris/modules/lokr.py``) share the
    rules: ``w1`` is low-rank iff ``decompose_both and r < max(w1 dims) / 2``, ``w2`` iff ``r < max(w2 dims) / 2``,
    and the dimensions are split by ``factorization(dim, decompose_factor)``.
    """
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    factors: set[int] | None = None
    decompose_both = any("lokr_w1_a" in p for p in modules.values())
    for path, p in modules.items():
        if "lokr_t2" in p or "lokr_t1" in p:
            raise ModelError(f"'{path}' uses LyCORIS' Tucker (CP) decomposition, which sdtune does not convert")
        a, c = p["lokr_w1"].shape if "lokr_w1" in p else (p["lokr_w1_a"].shape[0], p["lokr_w1_b"].shape[1])
        b = p["lokr_w2"].shape[0] if "lokr_w2" in p else p["lokr_w2_a"].shape[0]
        low = p.get("lokr_w2_a", p.get("lokr_w1_a"))
        if low is not None:
            ranks[path], alphas[path] = low.shape[1], _alpha(p, low.shape[1])
        else:  # both full: the smallest r for which PEFT keeps both full; LyCORIS' scale is 1 (alpha = r)
            d = p["lokr_w2"].shape[1]
            ranks[path] = max(math.ceil(max(a, c, b, d) / 2), 1)
            alphas[path] = float(ranks[path])
        if ("lokr_w1" in p) == (decompose_both and ranks[path] < max(a, c) / 2):
            raise ModelError(f"LoKr module '{path}' has factors PEFT would not build for rank {ranks[path]}")
        # The out dimension tells the factor; the in one only when w2 is full (a conv's w2_b folds in k*k).
        found = {f for f in {-1, a, b, c} if factorization(a * b, f)[0] == a}
        if "lokr_w2" in p:
            found = {f for f in found if factorization(c * p["lokr_w2"].shape[1], f)[0] == c}
        factors = found if factors is None else factors & found
        state.update({f"{path}.{k}": v for k, v in p.items() if k != "alpha"})
    if not factors:
        raise ModelError("LoKr factor shapes differ between modules in a way PEFT cannot rebuild (decompose_factor)")
    kwargs = _config_kwargs(ranks, alphas)
    factor = -1 if -1 in factors else min(factors)
    return state, LoKrConfig(**kwargs, decompose_both=decompose_both, decompose_factor=factor)


def _oft_from_kohya(modules: Mapping[str, Mapping[str, torch.Tensor]], algo: str) -> tuple[dict, PeftConfig]:
    """OFT / BOFT: the blocks with LyCORIS' constraint applied (``||Q|| <= alpha * out``, ``alpha = 0``: none), the
    rescale as it is, and an :func:`~sdtune.adapters.oft.orthogonal_config` that rebuilds the same block layout."""
    state: dict[str, torch.Tensor] = {}
    sizes: dict[str, int] = {}
    stages: dict[str, int | None] = {}
    for path, p in modules.items():
        blocks = p["oft_blocks"]
        width = _oft_width(blocks)
        alpha = float(p["alpha"]) if "alpha" in p else 0.0
        state[f"{path}.oft_blocks"] = _limit_blocks(blocks, alpha * width)
        if "rescale" in p:
            state[f"{path}.oft_rescale"] = p["rescale"]
        sizes[path] = blocks.shape[-1]
        if algo == "boft":
            n = blocks.shape[1]
            full = n & (n - 1) == 0 and blocks.shape[0] == n.bit_length()  # log2(n) + 1: LyCORIS' only choice
            stages[path] = None if full else blocks.shape[0]
    factors = set(stages.values()) - {None}  # a layer with all its factors fits any setting that reaches them
    if len(factors) > 1:
        raise ModelError("the BOFT modules use different numbers of butterfly factors; sdtune's layers need one")
    factor = factors.pop() if factors else None
    for path, p in modules.items():
        want = blocks_shape(algo, _oft_width(p["oft_blocks"]), sizes[path], factor)  # type: ignore[arg-type]
        if tuple(p["oft_blocks"].shape) != want:
            raise ModelError(f"{algo.upper()} module '{path}' has blocks {tuple(p['oft_blocks'].shape)}, not {want}")
    common = collections.Counter(sizes.values()).most_common(1)[0][0]
    config = orthogonal_config(
        algo,  # type: ignore[arg-type]
        common,
        sorted(modules),
        rescaled=any("rescale" in p for p in modules.values()),
        butterfly_factors=factor,
        block_pattern={path: b for path, b in sizes.items() if b != common},
    )
    return state, config


def to_peft_diffusers(states: Mapping[str, Mapping[str, torch.Tensor]], family: ModelFamily) -> dict[str, torch.Tensor]:
    """The diffusers PEFT layout ``pipe.load_lora_weights`` reads natively (LoRA and DoRA only).

    Keys are ``<component>.<module path>.<PEFT param>`` with text-encoder paths rooted at ``text_model.``
    (diffusers strips that root for transformers versions without it: ``loaders/lora_base.py``). Write the
    file with :func:`peft_diffusers_metadata` so diffusers uses each component's alpha.
    """
    out: dict[str, torch.Tensor] = {}
    allowed = ("unet", "text_encoder", "text_encoder_2")[: 1 + family.num_text_encoders]
    for component, state in states.items():
        if component not in allowed:
            raise ModelError(f"{family.name} has no component '{component}'; use one of {', '.join(allowed)}")
        for key, tensor in state.items():
            path, param = split_param(key, PEFT_PARAM_NAMES)
            if param.startswith(("hada_", "lokr_", "oft_")):
                raise ModelError("diffusers cannot load LoHa/LoKr/OFT/BOFT files; use the kohya/LyCORIS layout")
            if param == MAGNITUDE:
                raise ModelError(
                    "diffusers' DoRA normalises output rows, sdtune's input columns: write the PEFT layout from "
                    "dense_lora_from_dora (an exact plain LoRA)"
                )
            if param == "lora_magnitude_vector":
                # PEFT files name it without ``.weight`` and peft adds it on load; transformers 5's
                # ``load_adapter`` (diffusers' text-encoder path) does not, and peft accepts both.
                param += ".weight"
            path = path if component == "unet" else clip_module_path(path)
            out[f"{component}.{path}.{param}"] = tensor
    return out


def peft_diffusers_metadata(configs: Mapping[str, PeftConfig]) -> dict[str, str]:
    """``lora_adapter_metadata``: each component's PEFT config as ``<component>.<field>`` (diffusers
    ``LoraBaseMixin._save_lora_weights``); ``load_lora_weights`` builds its ``LoraConfig`` from it."""
    packed: dict[str, Any] = {}
    for component, config in configs.items():
        if not isinstance(config, LoraConfig) or is_orthogonal(config):
            raise ModelError("diffusers cannot load LoHa/LoKr/OFT/BOFT files; use the kohya/LyCORIS layout")
        if is_input_dora(config):
            raise ModelError(
                "a per-input-column DoRA config would load as diffusers' output-row DoRA; use the "
                "configs of dense_lora_from_dora"
            )
        for key, value in config.to_dict().items():
            packed[f"{component}.{key}"] = sorted(value) if isinstance(value, set) else value
    return {"lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True, default=str)}


def dense_lora_from_dora(
    states: Mapping[str, Mapping[str, torch.Tensor]],
    configs: Mapping[str, PeftConfig],
    base: Mapping[str, nn.Module],
) -> tuple[States, dict[str, PeftConfig]]:
    """Per-input-column DoRA states as plain-LoRA states and configs for diffusers' PEFT layout, exactly.

    Per module the merged delta ``(W + s B A) diag(m / ||W + s B A||_col) - W`` (float64, ``W`` the base weight of
    that module in ``base[component]``) is written as ``B @ A`` with scale 1: ``B`` the identity and ``A`` the
    delta, or ``A`` the identity and ``B`` the delta, whichever is smaller (rank ``min(out, in * k * k)``), so
    ``pipe.load_lora_weights`` gives sdtune's merged weights. Components without that DoRA pass unchanged.
    """
    out_states: States = {}
    out_configs: dict[str, PeftConfig] = {}
    for component, state in states.items():
        config = configs[component]
        if not is_input_dora(config):
            out_states[component], out_configs[component] = dict(state), config
            continue
        dense: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        for path, p in _group(state, PEFT_PARAM_NAMES).items():
            layer = base[component].get_submodule(path)
            weight = (layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer).weight.detach()
            weight = weight.double().cpu()
            a, b = p["lora_A.weight"].double(), p["lora_B.weight"].double()
            rank = a.shape[0]
            delta = _peft_scale(config, path, rank) * (b.reshape(-1, rank) @ a.reshape(rank, -1))
            merged = input_dora_weight(weight, delta.reshape(weight.shape), p[MAGNITUDE].double())
            full = (merged - weight).reshape(weight.shape[0], -1)
            r = min(full.shape)
            down, up = (full, torch.eye(r)) if full.shape[0] == r else (torch.eye(r), full)
            kernel = [1] * (weight.dim() - 2)
            dtype = p["lora_A.weight"].dtype
            dense[f"{path}.lora_A.weight"] = down.reshape(r, *weight.shape[1:]).to(dtype)
            dense[f"{path}.lora_B.weight"] = up.reshape(weight.shape[0], r, *kernel).to(dtype)
            ranks[path.removeprefix("text_model.")] = r  # a suffix pattern matches with or without the root
        common = collections.Counter(ranks.values()).most_common(1)[0][0]
        pattern = {k: v for k, v in ranks.items() if v != common}
        out_states[component] = dense
        out_configs[component] = LoraConfig(
            r=common, lora_alpha=common, target_modules=config.target_modules, rank_pattern=pattern,
            alpha_pattern=pattern,
        )  # fmt: skip
    return out_states, out_configs
