"""LoRA file metadata, writing and inspection: kohya ``ss_*`` / ``modelspec.*`` keys, hashes, layout detection.

Conventions and where they come from:

- ``ss_*`` training metadata: kohya-ss/sd-scripts ``train_network.py`` (``ss_network_module``,
  ``ss_network_dim``, ``ss_network_alpha``, ``ss_network_args`` as ``json.dumps`` of the ``--network_args``
  strings, ``ss_base_model_version``, ``ss_v2``). LyCORIS files are trained through the same script with
  ``--network_module lycoris.kohya`` (LyCORIS ``README``), e.g. ``{"algo": "loha"}``; DoRA is LyCORIS'
  ``dora_wd=True`` (``lycoris/kohya.py``), with ``wd_on_output`` saying which axis ``dora_scale`` normalises:
  sdtune's DoRA is per input column (``False``, what A1111/ComfyUI/InvokeAI apply); LyCORIS' default and
  peft's are per output row (``True``).
- ``modelspec.*``: Stability's model-spec 1.0.0 as sd-scripts' ``library/sai_model_spec.py`` writes it
  (``<architecture>/lora``; sdtune writes ``/lycoris`` for algorithms only LyCORIS readers load).
- ``sshs_model_hash`` / ``sshs_legacy_hash``: sd-scripts ``train_util.precalculate_safetensors_hashes``: the
  sha256 of the tensor payload (the additional-networks hash, :func:`sdtune.formats.hashes.addnet_hash`) and
  the 8-hex sha256 of 64 KiB at 1 MiB of the file written with only the ``ss_*`` metadata.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdtune.core.atomic import atomic_path
from sdtune.core.errors import ModelError
from sdtune.formats.hashes import a1111_legacy_hash, addnet_hash
from sdtune.models.family import ModelFamily

Layout = Literal["kohya", "lycoris", "peft"]
Algo = Literal["lora", "locon", "dora", "loha", "lokr", "oft", "boft"]
ALGOS: tuple[str, ...] = ("lora", "locon", "dora", "loha", "lokr", "oft", "boft")
# LyCORIS' algo names (lycoris/kohya.py, wrapper.py) where they differ from sdtune's.
_LYCORIS_ALGO = {"dora": "lora", "oft": "diag-oft"}

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
PEFT_COMPONENTS = ("unet.", "text_encoder.", "text_encoder_2.")
# Tensor names after the module name, per algorithm (sd-scripts networks/lora.py; LyCORIS lycoris/modules/*.py).
LORA_KEYS = ("lora_down.weight", "lora_up.weight")
LYCORIS_ONLY_KEYS = (
    "dora_scale", "lora_mid.weight",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2",
    "oft_blocks", "rescale",  # OFT [n, b, b] and BOFT [m, n, b, b] (lycoris/modules/diag_oft.py, boft.py)
)  # fmt: skip
KOHYA_PARAM_NAMES = (*LORA_KEYS, "alpha", *LYCORIS_ONLY_KEYS)
# PEFT adapter state-dict names after the module path (peft get_peft_model_state_dict).
PEFT_PARAM_NAMES = (
    "lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_magnitude_vector.weight",
    "lora_input_magnitude",  # sdtune's per-input-column DoRA (sdtune.adapters.dora)
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "oft_blocks", "oft_rescale",  # sdtune's OFT / BOFT layers (sdtune.adapters.oft)
)  # fmt: skip


def split_param(key: str, param_names: Iterable[str]) -> tuple[str, str]:
    """``("a.b.to_q", "lora_A.weight")`` from ``"a.b.to_q.lora_A.weight"``; ModelError for unknown tensors."""
    for param in param_names:
        if key.endswith("." + param):
            return key[: -len(param) - 1], param
    raise ModelError(f"LoRA tensor '{key}' is of no supported kind (LoRA, LoCon, DoRA, LoHa, LoKr, OFT, BOFT)")


def module_algo(params: Iterable[str] | Mapping[str, Any]) -> Algo:
    """The algorithm of one module from its tensor names (kohya/LyCORIS or PEFT names); a mapping of names to
    tensors or shapes also tells BOFT (4-D ``oft_blocks``) from OFT (3-D), which names alone cannot."""
    names = set(params)
    if names & {"hada_w1_a", "hada_w1_b"}:
        return "loha"
    if any(n.startswith("lokr_") for n in names):
        return "lokr"
    if "oft_blocks" in names:
        blocks = params["oft_blocks"] if isinstance(params, Mapping) else None
        return "boft" if blocks is not None and len(getattr(blocks, "shape", blocks)) == 4 else "oft"
    if names & {"dora_scale", "lora_magnitude_vector", "lora_magnitude_vector.weight", "lora_input_magnitude"}:
        return "dora"
    return "lora"


def detect_lora_layout(keys: Iterable[str]) -> Layout:
    """``kohya`` (sd-scripts LoRA/LoCon), ``lycoris`` (kohya names with LyCORIS tensors) or ``peft`` (diffusers)."""
    keys = list(keys)
    if keys and all(k.startswith(KOHYA_PREFIXES) for k in keys):
        lycoris = any(k.split(".", 1)[-1] in LYCORIS_ONLY_KEYS for k in keys)
        return "lycoris" if lycoris else "kohya"
    if keys and all(k.startswith(PEFT_COMPONENTS) for k in keys):
        return "peft"
    example = next((k for k in keys if not k.startswith(KOHYA_PREFIXES + PEFT_COMPONENTS)), "no tensors")
    raise ModelError(f"not a LoRA file of a known layout (kohya, LyCORIS, diffusers/PEFT): e.g. '{example}'")


def kohya_metadata(
    family: ModelFamily,
    algo: Algo,
    rank: int,
    alpha: float,
    extra: Mapping[str, Any] | None = None,
    *,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    title: str = "",
    dora_on_output: bool = False,
    network_args: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The ``ss_*`` and ``modelspec.*`` metadata sd-scripts writes, plus ``extra`` (all values strings).

    ``dora_on_output``: the DoRA magnitude is per output row (peft's, old sdtune files) instead of per input column.
    ``network_args``: more of sd-scripts' ``--network_args`` for ``ss_network_args`` (e.g. ``block_dims``).
    OFT / BOFT: ``rank`` is the block size (LyCORIS' ``network_dim`` for them), ``alpha`` the constraint, and
    ``network_args`` adds LyCORIS' ``constraint`` / ``rescaled`` to ``ss_network_args``.
    """
    if algo not in ALGOS:
        raise ModelError(f"unknown LoRA algorithm '{algo}'; use one of {', '.join(ALGOS)}")
    lycoris = algo in ("dora", "loha", "lokr", "oft", "boft")
    args: dict[str, str] = {}
    if lycoris:
        args["algo"] = _LYCORIS_ALGO.get(algo, algo)
    if conv_rank:
        args["conv_dim"] = str(conv_rank)
        args["conv_alpha"] = str(float(conv_alpha if conv_alpha is not None else conv_rank))
    if algo == "dora":
        args |= {"dora_wd": "True", "wd_on_output": str(dora_on_output)}
    args |= dict(network_args or {})
    arch = family.modelspec_architecture + ("/lycoris" if lycoris else "/lora")
    resolution = family.resolution
    meta = {
        "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": family.a1111_base_model_version,
        "ss_v2": str(family.arch == "sd2"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": (
            "https://github.com/Stability-AI/generative-models" if family.arch == "sdxl" else "diffusers"
        ),
        "modelspec.title": title or f"sdtune {algo}",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if family.prediction_type == "v_prediction" else "epsilon",
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    }
    for key, value in (extra or {}).items():
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return meta


def save_lora(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """Write a LoRA safetensors file atomically, with ``sshs_model_hash`` / ``sshs_legacy_hash`` added.

    The file is written once with only the ``ss_*`` metadata (what sd-scripts hashes), hashed, and rewritten
    with all metadata: the model hash covers the tensor payload only, so it stays valid. Returns the metadata.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in metadata.items() if not k.startswith("sshs_")}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
        meta["sshs_model_hash"] = addnet_hash(tmp)
        meta["sshs_legacy_hash"] = a1111_legacy_hash(tmp)
        save_file(tensors, str(tmp), metadata=meta)
    return meta


def lora_summary(path: str | Path) -> dict[str, Any]:
    """What a LoRA file holds, for ``sdtune inspect``: layout, algorithm(s), ranks, modules, metadata."""
    with safe_open(str(path), framework="pt") as fh:
        keys = list(fh.keys())
        metadata = dict(fh.metadata() or {})
        layout = detect_lora_layout(keys)
        names = KOHYA_PARAM_NAMES if layout != "peft" else PEFT_PARAM_NAMES
        modules: dict[str, dict[str, list[int]]] = collections.defaultdict(dict)
        for key in keys:
            module, param = split_param(key, names)
            modules[module][param] = list(fh.get_slice(key).get_shape())
        alphas = sorted({float(fh.get_tensor(f"{m}.alpha")) for m in modules if "alpha" in modules[m]})
    algos = collections.Counter(module_algo(params) for params in modules.values())
    ranks = sorted({r for params in modules.values() if (r := _rank(params)) is not None})
    components = collections.Counter(_component(m, layout) for m in modules)
    return {
        "layout": layout,
        "algo": "+".join(sorted(algos)),
        "algos": dict(algos),
        "ranks": ranks,
        "alphas": alphas,
        "modules": len(modules),
        "components": dict(components),
        "tensors": len(keys),
        "metadata": metadata,
    }


def _rank(params: Mapping[str, list[int]]) -> int | None:
    # OFT / BOFT: the block size, what LyCORIS calls their dim
    for name, axis in (("lora_down.weight", 0), ("lora_A.weight", 0), ("hada_w1_b", 0), ("lokr_w2_a", 1),
                       ("oft_blocks", -1)):  # fmt: skip
        if name in params:
            return params[name][axis]
    if "lokr_w1_a" in params:
        return params["lokr_w1_a"][1]
    return None  # LoKr with full matrices has no rank


def _component(module: str, layout: Layout) -> str:
    if layout == "peft":
        return module.split(".", 1)[0]
    prefix = module.split("_", 2)[1]  # unet, te, te1, te2
    return {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}[prefix]
