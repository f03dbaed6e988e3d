"""LoRA by truncated SVD: resize a LoRA file's rank, or extract a LoRA from the difference of two models.

- :func:`resize_lora` mirrors kohya-ss/sd-scripts ``networks/resize_lora.py`` with a fixed rank: per module the
  full update ``up @ down * alpha / rank`` (convolutions flattened to ``[out, in * k * k]``) is decomposed and the
  top ``new_rank`` singular values kept; ``new_conv_rank`` applies to the k x k (not 1 x 1) convolutions, as
  kohya's ``--new_conv_rank``. kohya keeps the old ``alpha / rank`` scale and puts ``S`` into ``up``; here the
  factors are balanced (``up = U S^1/2``, ``down = S^1/2 V^T``) with ``alpha = rank`` (scale 1): the same update.
- :func:`extract_lora` mirrors ``networks/extract_lora_from_models.py``: ``tuned - base`` per targeted layer,
  truncated to ``rank`` (``conv_rank`` for k x k convolutions), ``alpha = rank``. kohya clamps ``U`` and ``V``
  at their 0.99 quantile, which loses accuracy; sdtune does not clamp.

Both report, per module, the Frobenius norm fraction kept: ``sqrt(sum of kept s^2 / sum of s^2)`` (kohya's
``fro_retained``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key

from sdtune.core.errors import ModelError
from sdtune.formats.lora_files import kohya_metadata, peft_diffusers_metadata, save_lora
from sdtune.formats.lora_keys import kohya_module_name
from sdtune.formats.lora_metadata import KOHYA_PARAM_NAMES, PEFT_PARAM_NAMES, module_algo
from sdtune.models.loading import load_model
from sdtune.models.targets import TEXT_ENCODER_TARGETS, UNET_TARGETS
from sdtune.tools.lora_io import group_modules, peft_file_configs, read_file

Tensors = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class ModuleReport:
    """One module of a resized or extracted LoRA: the rank before (resize: the file's; extract: the full rank
    ``min(out, in)``), the rank written, and the fraction of the update's Frobenius norm kept."""

    module: str
    source_rank: int
    rank: int
    retained: float


def _peft_scale(config: LoraConfig, path: str, rank: int) -> float:
    alpha = config.alpha_pattern.get(get_pattern_key(list(config.alpha_pattern), path), config.lora_alpha)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def _truncate(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(up, down, retained)``: the best rank-``rank`` factors of 2-D ``delta`` (float64), balanced."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    kept = max(1, min(rank, s.numel()))
    total = float(s.square().sum())
    retained = math.sqrt(float(s[:kept].square().sum()) / total) if total > 0 else 1.0
    root = s[:kept].sqrt()
    return u[:, :kept] * root, root[:, None] * vh[:kept], retained


def _is_kxk(weight_shape: Sequence[int]) -> bool:
    return len(weight_shape) == 4 and tuple(weight_shape[2:]) != (1, 1)


def resize_lora(
    path: str | Path, new_rank: int, out: str | Path, new_conv_rank: int | None = None
) -> list[ModuleReport]:
    """Write the LoRA/LoCon/DoRA file ``path`` at rank ``new_rank`` to ``out`` (kohya or PEFT layout, as read).

    A module keeps at most its current rank; DoRA magnitudes are kept as they are. Metadata is kept, with
    ``ss_network_dim`` / ``ss_network_alpha`` (and ``conv_dim``) updated and the hashes recomputed.
    """
    path = Path(path)
    if new_rank < 1 or (new_conv_rank is not None and new_conv_rank < 1):
        raise ModelError(f"{path}: ranks must be >= 1 (got {new_rank}, conv {new_conv_rank})")
    tensors, metadata, layout = read_file(path)
    peft = layout == "peft"
    modules = group_modules(tensors, PEFT_PARAM_NAMES if peft else KOHYA_PARAM_NAMES)
    other = sorted({module_algo(p) for p in modules.values()} - {"lora", "dora"})
    if other or any("lora_mid.weight" in p for p in modules.values()):
        kind = "/".join(other) or "Tucker (lora_mid)"
        raise ModelError(
            f"{path}: resize handles LoRA, LoCon and DoRA files only (as kohya's resize_lora.py); not {kind}"
        )
    down_key, up_key = ("lora_A.weight", "lora_B.weight") if peft else ("lora_down.weight", "lora_up.weight")
    configs = {}
    if peft:
        by_component: dict[str, Tensors] = collections.defaultdict(dict)
        for key, tensor in tensors.items():
            by_component[key.split(".", 1)[0]][key.split(".", 1)[1]] = tensor
        configs = peft_file_configs(by_component, metadata)
    written: Tensors = {}
    reports = []
    for name, p in modules.items():
        down, up = p[down_key], p[up_key]
        rank = down.shape[0]
        if peft:
            component, module_path = name.split(".", 1)
            scale = _peft_scale(configs[component], module_path, rank)
        else:
            scale = float(p["alpha"]) / rank if "alpha" in p and float(p["alpha"]) else 1.0  # kohya: 0 = rank
        target = new_conv_rank if new_conv_rank and _is_kxk(down.shape) else new_rank
        delta = up.reshape(up.shape[0], rank).double() @ down.reshape(rank, -1).double() * scale
        new_up, new_down, retained = _truncate(delta, min(target, rank))
        kept = new_down.shape[0]
        written |= {f"{name}.{k}": v for k, v in p.items() if k not in (down_key, up_key, "alpha")}  # DoRA scale
        written[f"{name}.{down_key}"] = new_down.reshape(kept, *down.shape[1:]).to(down.dtype)
        written[f"{name}.{up_key}"] = new_up.reshape(up.shape[0], kept, *up.shape[2:]).to(up.dtype)
        if not peft:
            written[f"{name}.alpha"] = torch.tensor(float(kept), dtype=torch.float32)
        reports.append(ModuleReport(name, rank, kept, retained))
    metadata = _resized_metadata(metadata, new_rank, new_conv_rank)
    if peft:
        metadata |= peft_diffusers_metadata(_resized_configs(configs, reports))
    save_lora(out, written, metadata)
    return reports


def _resized_metadata(metadata: Mapping[str, str], new_rank: int, new_conv_rank: int | None) -> dict[str, str]:
    meta = dict(metadata)
    if "ss_network_dim" not in meta:
        return meta
    args = json.loads(meta.get("ss_network_args") or "{}") or {}
    if "conv_dim" in args or new_conv_rank:
        conv = new_conv_rank or new_rank  # kohya: --new_conv_rank defaults to --new_rank
        args |= {"conv_dim": str(conv), "conv_alpha": str(float(conv))}
    meta["ss_training_comment"] = f"dimension is resized from {meta['ss_network_dim']} to {new_rank}"
    meta |= {
        "ss_network_dim": str(new_rank),
        "ss_network_alpha": str(float(new_rank)),
        "ss_network_args": json.dumps(args),
    }
    return meta


def _resized_configs(configs: Mapping[str, LoraConfig], reports: Sequence[ModuleReport]) -> dict[str, LoraConfig]:
    """PEFT configs with scale 1 everywhere: ``r`` the commonest kept rank, the rest as rank/alpha patterns."""
    out = {}
    for component, config in configs.items():
        kept = {
            r.module.split(".", 1)[1].removeprefix("text_model."): r.rank  # a suffix pattern matches either naming
            for r in reports
            if r.module.startswith(component + ".")
        }
        common = collections.Counter(kept.values()).most_common(1)[0][0]
        pattern = {k: v for k, v in kept.items() if v != common}
        out[component] = dataclasses.replace(
            config, r=common, lora_alpha=common, rank_pattern=pattern, alpha_pattern=pattern, use_rslora=False
        )
    return out


def extract_lora(
    base: str | Path,
    tuned: str | Path,
    rank: int,
    out: str | Path,
    conv_rank: int | None = None,
    targets: str | Sequence[str] = "attention_ff",
    min_diff: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> list[ModuleReport]:
    """A kohya LoRA file at ``out`` approximating ``tuned - base`` on the targeted layers of UNet and text encoders.

    ``targets`` is a preset of :mod:`sdtune.models.targets` or module-name suffixes; with ``conv_rank`` the
    UNet's convolutions are added (LoCon). Layers whose largest change is at most ``min_diff`` are left out.
    """
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise ModelError(f"ranks must be >= 1 (got {rank}, conv {conv_rank})")
    if isinstance(targets, str) and targets not in UNET_TARGETS:
        raise ModelError(f"targets '{targets}': use a preset ({', '.join(UNET_TARGETS)}) or module names")
    a, b = load_model(base), load_model(tuned)
    if (a.family.arch, a.family.inpainting) != (b.family.arch, b.family.inpainting):
        raise ModelError(f"{tuned}: a {b.family.name} model cannot be compared with the {a.family.name} base {base}")
    tensors: Tensors = {}
    reports = []
    tuned_modules = b.modules()
    for component, module in a.modules().items():
        if component == "vae":
            continue
        table = UNET_TARGETS if component == "unet" else TEXT_ENCODER_TARGETS
        suffixes = tuple(table[targets]) if isinstance(targets, str) else tuple(targets)
        convs = UNET_TARGETS["all"] if conv_rank and component == "unet" else ()
        other = dict(tuned_modules[component].named_modules())
        for path, layer in module.named_modules():
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            wanted = _matches(path, suffixes) or (isinstance(layer, torch.nn.Conv2d) and _matches(path, convs))
            if not wanted:
                continue
            w0, w1 = layer.weight.detach(), other[path].weight.detach()
            if w0.shape != w1.shape:
                raise ModelError(
                    f"{tuned}: {component} layer '{path}' is {tuple(w1.shape)}, the base's {tuple(w0.shape)}"
                )
            delta = w1.double() - w0.double()
            if float(delta.abs().max()) <= min_diff:
                continue  # unchanged by the fine-tune
            r = conv_rank if conv_rank and _is_kxk(w0.shape) else rank
            up, down, retained = _truncate(delta.reshape(w0.shape[0], -1), r)
            kept = down.shape[0]
            name = kohya_module_name(component, path, a.family, a.unet.config)
            tensors[f"{name}.lora_down.weight"] = down.reshape(kept, *w0.shape[1:]).to(dtype)
            tensors[f"{name}.lora_up.weight"] = up.reshape(w0.shape[0], kept, *[1] * (w0.dim() - 2)).to(dtype)
            tensors[f"{name}.alpha"] = torch.tensor(float(kept), dtype=torch.float32)
            reports.append(ModuleReport(name, min(w0.shape[0], w0[0].numel()), kept, retained))
    if not tensors:
        raise ModelError(f"{tuned}: no targeted layer differs from {base}; nothing to extract")
    comment = {"ss_training_comment": f"extracted from {Path(str(tuned)).name} - {Path(str(base)).name}"}
    algo = "locon" if conv_rank else "lora"
    save_lora(
        out, tensors, kohya_metadata(a.family, algo, rank, rank, comment, conv_rank=conv_rank, conv_alpha=conv_rank)
    )
    return reports


def _matches(path: str, suffixes: Iterable[str]) -> bool:
    return any(path == s or path.endswith("." + s) for s in suffixes)
