"""Every adapter kind sdtune trains, exported, then applied the way each UI applies it, equals sdtune's merge.

For SD 1 and SDXL (tiny models, UNet and text-encoder adapters, random non-zero adapter weights made with
sdtune's own ``peft_config`` / ``inject``), the file sdtune writes is applied module by module with each tool's
restated formula (:mod:`tool_appliers`: A1111, ComfyUI, InvokeAI) at strength 1 and 0.6, and with the real
diffusers loader (``load_lora_weights`` + ``fuse_lora``, strength 0.6) from the PEFT file (and diffusers' kohya
converter for LoRA/LoCon). Each module's weight must
equal sdtune's merge of the same file (``apply_lora`` + ``merge_into``) to a relative error of 1e-4 of its
delta, and every module the file does not name must stay the base's.

OFT / BOFT: each tool's strength is its own (``tool_appliers``), so sdtune's merge is asked for that tool's rule
(``strength_as``); tools that do not apply a kind (A1111: BOFT; InvokeAI and diffusers: both) must be reported so by
``sdtune lora check`` on the same file.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tool_appliers import APPLIERS, SUPPORTS

from sdtune.adapters.lora import adapter_state, inject, peft_config, set_merged
from sdtune.adapters.oft import orthogonal_config
from sdtune.core.dtypes import cast_floats
from sdtune.formats.lora_files import (
    dense_lora_from_dora,
    kohya_metadata,
    one_alpha,
    peft_diffusers_metadata,
    save_lora,
    to_kohya,
    to_peft_diffusers,
)
from sdtune.formats.lora_keys import adaptable_module_names, kohya_name_table
from sdtune.formats.lora_metadata import KOHYA_PARAM_NAMES, split_param
from sdtune.inference.generate import make_pipeline
from sdtune.methods.lora import CONV_TARGETS
from sdtune.models.targets import TEXT_ENCODER_TARGETS, UNET_TARGETS
from sdtune.tools.lora_check import check_file
from sdtune.tools.lora_tools import apply_lora, merge_into

REL_TOL = 1e-4
STRENGTHS = (1.0, 0.6)
# kind -> (sdtune adapter, UNet target preset); conv rank 2 on the convolutions (kohya's conv_dim)
KINDS = {
    "lora": ("lora", "attention_ff"),
    "locon": ("lora", "all"),
    "dora": ("dora", "all"),
    "loha": ("loha", "all"),
    "lokr": ("lokr", "all"),
    "oft": ("oft", "all"),  # COFT on (the random blocks exceed it: the file carries the constrained blocks)
    "oft-rescaled": ("oft", "all"),  # ComfyUI ignores an OFT's rescale: its rule drops it, lora check says so
    "boft": ("boft", "all"),
}
# The OFT / BOFT settings of each kind: (block size, constraint, rescaled), and the kind each is in a file.
ORTHOGONAL = {"oft": (4, 0.05, False), "oft-rescaled": (4, 0.0, True), "boft": (4, 0.05, True)}
FILE_KIND = {"oft-rescaled": "oft"}
# the appliers' tool names as sdtune lora check names them, and the strength rule each tool follows
CHECK_NAME = {"a1111": "a1111", "comfyui": "comfyui", "invokeai": "invoke"}
STRENGTH_AS = {"a1111": "a1111", "comfyui": "comfyui", "invokeai": "a1111"}
# Which file each tool reads for which kind: the kohya/LyCORIS file for the UIs (tool_appliers.SUPPORTS), the
# PEFT file for diffusers (a DoRA as its exact dense LoRA), and the kohya file through diffusers' converter.
DIFFUSERS_PEFT = ("lora", "locon", "dora")
DIFFUSERS_KOHYA = ("lora", "locon")


def parts(model) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in model.modules().items() if k != "vae"}


def adapted(base, kind: str, block_ranks: bool = False):
    """A copy of ``base`` with a random sdtune adapter of ``kind`` on the UNet and text encoders, and its configs.

    ``block_ranks``: the configs of the LoRA recipe itself (``methods.lora.adapter_configs``) with kohya's per-block
    ranks and alphas on the UNet (``block_dims`` 1, 2, 3, 1, ..., one block at 0; ``block_alphas`` 1.5 x rank)."""
    adapter, preset = KINDS[kind]
    model = copy.deepcopy(base)
    torch.manual_seed(3)
    configs = {}
    if block_ranks:
        from sdtune.config import LoraConfig
        from sdtune.methods.lora import adapter_configs
        from sdtune.models.unet_blocks import UNetBlocks

        size = UNetBlocks.of(model.family, model.unet.config).size
        dims = [i % 3 + 1 for i in range(size)]
        dims[size // 2] = 0
        raw = {"method": "lora", "name": "x", "data": {"path": "."}, "adapter": adapter, "targets": preset,
               "rank": 4, "alpha": 8.0, "conv_rank": 2, "conv_alpha": 3.0, "train_text_encoder": True,
               "block_dims": dims, "block_alphas": [1.5 * d for d in dims]}  # fmt: skip
        configs = adapter_configs(LoraConfig.model_validate(raw), parts(model), model.family)
        assert "to_q" not in configs["unet"].target_modules  # the rank-0 block left out: the targets are full paths
    for component, module in parts(model).items():
        targets = list(UNET_TARGETS[preset] if component == "unet" else TEXT_ENCODER_TARGETS["attention_ff"])
        convs = [t for t in targets if t in CONV_TARGETS]
        if kind in ORTHOGONAL:
            block, constraint, rescaled = ORTHOGONAL[kind]
            configs[component] = orthogonal_config(adapter, block, targets, constraint, rescaled)
        elif not block_ranks:
            alpha = 8.0 if component == "unet" else 2.0
            configs[component] = peft_config(adapter, 4, alpha, targets, 0.0, 2, 3.0, convs)
        inject(module, configs[component])
        with torch.no_grad():
            for name, p in module.named_parameters():
                if not p.requires_grad:
                    continue
                if "magnitude" in name or "rescale" in name:  # a DoRA magnitude / OFT rescale away from the base
                    p.mul_(1 + 0.5 * torch.rand_like(p))
                else:  # every factor (and OFT block) non-zero
                    p.normal_(0, 0.3)
    return model, configs


def write_kohya(model, configs, kind: str, path: Path, dtype: torch.dtype, block_ranks: bool = False) -> Path:
    """The file sdtune's LoRA recipe writes (``methods/lora.py`` ``export``, kohya/LyCORIS layout; OFT / BOFT: rank
    = block size; with per-block ranks: one alpha, each module's scale folded into its ``lora_up``)."""
    states = {
        c: adapter_state(m) if block_ranks else cast_floats(adapter_state(m), dtype) for c, m in parts(model).items()
    }
    algo = "locon" if kind == "locon" else KINDS[kind][0]
    tensors = to_kohya(states, configs, model.family, model.unet.config)
    if block_ranks:
        tensors = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in one_alpha(tensors).items()}
    save_lora(path, tensors, kohya_metadata(model.family, algo, 4, 8))
    return path


def write_peft(model, configs, path: Path, dtype: torch.dtype) -> Path:
    """The PEFT/diffusers file sdtune's LoRA recipe writes (a DoRA as its dense LoRA)."""
    states, configs = dense_lora_from_dora(
        {c: adapter_state(m) for c, m in parts(model).items()}, configs, parts(model)
    )
    states = {c: cast_floats(s, dtype) for c, s in states.items()}
    save_lora(path, to_peft_diffusers(states, model.family), peft_diffusers_metadata(configs))
    return path


def weights(model) -> dict[tuple[str, str], torch.Tensor]:
    """Every Linear/Conv2d weight of UNet and text encoders by (component, module path), adapters merged."""
    out = {}
    for component, module in parts(model).items():
        for path in adaptable_module_names(module):
            layer = module.get_submodule(path)
            layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
            out[component, path] = layer.weight.detach().double().clone()
    return out


def sdtune_merge(base, path: Path, strength: float, strength_as: str = "a1111") -> dict[tuple[str, str], torch.Tensor]:
    model = copy.deepcopy(base)
    apply_lora(model, path, strength, strength_as)  # type: ignore[arg-type]
    merge_into(model)
    return weights(model)


def file_modules(base, path: Path) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """The file's tensors per (component, module path), by the kohya names of ``formats.lora_keys``."""
    from safetensors.torch import load_file

    names = {c: adaptable_module_names(m) for c, m in parts(base).items()}
    table = kohya_name_table(base.family, names, base.unet.config)
    out: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        name, param = split_param(key, KOHYA_PARAM_NAMES)
        out.setdefault(table[name], {})[param] = tensor
    return out


def assert_same_weights(got: dict, want: dict, base: dict, adapted: set, label: str) -> None:
    assert adapted, label
    for key, w in want.items():
        if key not in adapted:
            assert torch.equal(got[key], base[key]) and torch.equal(w, base[key]), (label, key)
            continue
        delta = (w - base[key]).norm()
        assert delta > 1e-3 * base[key].norm(), (label, key)  # the adapter changes this module
        error = float((got[key] - w).norm() / delta)
        assert error <= REL_TOL, f"{label} {key}: relative error {error:.2e}"


@pytest.mark.parametrize(("family", "dtype"), [("sd1", torch.float32), ("sdxl", torch.float16)])
@pytest.mark.parametrize("kind", list(KINDS))
def test_ui_formulas_on_the_exported_file_equal_sdtunes_merge(tiny_model, tmp_path, family, dtype, kind) -> None:
    check_ui_formulas(tiny_model(family), tmp_path, dtype, kind, block_ranks=False)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("kind", ["locon", "loha"])
def test_a_file_with_per_block_ranks_applies_in_every_ui_as_sdtunes_merge(tiny_model, tmp_path, family, kind) -> None:
    check_ui_formulas(tiny_model(family), tmp_path, torch.float32, kind, block_ranks=True)


def check_ui_formulas(base, tmp_path: Path, dtype: torch.dtype, kind: str, block_ranks: bool) -> None:
    model, configs = adapted(base, kind, block_ranks)
    path = write_kohya(model, configs, kind, tmp_path / "lora.safetensors", dtype, block_ranks)
    if block_ranks:  # the file really has per-block ranks: several ranks among the UNet's modules
        ranks = {p["lora_down.weight" if kind != "loha" else "hada_w1_b"].shape[0]
                 for (c, _), p in file_modules(base, path).items() if c == "unet"}  # fmt: skip
        assert {1, 2, 3} <= ranks
    before = weights(base)
    modules = file_modules(base, path)
    if kind == "dora":  # per input column, as the UIs apply it: [1, in] / [1, in, 1, 1]
        for (component, module_path), p in modules.items():
            assert p["dora_scale"].shape == (
                1,
                before[component, module_path].shape[1],
                *[1] * (p["lora_up.weight"].dim() - 2),
            )
    if dtype == torch.float32:  # the file is the trained adapter: its merge is the adapted model's
        set_merged_model = copy.deepcopy(model)
        for module in parts(set_merged_model).values():
            set_merged(module, True)
        assert_same_weights(weights(set_merged_model), sdtune_merge(base, path, 1.0), before, set(modules), "trained")
    file_kind = FILE_KIND.get(kind, kind)
    applying = [tool for tool in APPLIERS if file_kind in SUPPORTS[tool]]
    checked = check_file(path, model=base)["targets"]  # sdtune lora check, on the tiny model's modules
    for tool in APPLIERS:
        assert checked[CHECK_NAME[tool]].mapped if tool in applying else not checked[CHECK_NAME[tool]].ok, tool
    if kind in ORTHOGONAL:  # diffusers loads neither; InvokeAI neither (it refuses the whole file)
        assert checked["diffusers"].error and checked["invoke"].error
        rescale_issue = [i for i in checked["comfyui"].issues if "ignores the rescale" in i]
        assert bool(rescale_issue) == (kind == "oft-rescaled"), checked["comfyui"].issues
    for strength in STRENGTHS:
        rules = {"a1111", "comfyui"} if kind in ORTHOGONAL else {"a1111"}  # the rule changes nothing else
        ours = {rule: sdtune_merge(base, path, strength, rule) for rule in sorted(rules)}
        if kind in ORTHOGONAL and strength != 1:  # the rules differ (so the rule is what makes each tool match)
            assert max(float((ours["a1111"][k] - ours["comfyui"][k]).abs().max()) for k in modules) > 1e-3
        for tool in applying:
            theirs = dict(before)
            for key, params in modules.items():
                theirs[key] = APPLIERS[tool](before[key], params, strength)
            want = ours.get(STRENGTH_AS[tool], ours["a1111"])
            assert_same_weights(theirs, want, before, set(modules), f"{tool} at {strength}")


def diffusers_weights(base, path: Path, strength: float) -> dict[tuple[str, str], torch.Tensor]:
    """What ``pipe.load_lora_weights`` + ``fuse_lora(lora_scale=strength)`` make of the file (real diffusers)."""
    fresh = copy.deepcopy(base)
    pipe = make_pipeline(fresh)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    pipe.fuse_lora(components=[c for c in ("unet", "text_encoder", "text_encoder_2") if c in parts(fresh)],
                   lora_scale=strength)  # fmt: skip
    return weights(fresh)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("kind", [*DIFFUSERS_PEFT, "locon-blocks"])
def test_diffusers_loads_the_exported_peft_file_as_sdtunes_merge(tiny_model, tmp_path, family, kind) -> None:
    base = tiny_model(family)
    block_ranks = kind.endswith("-blocks")  # a file with per-block ranks (kohya's block_dims)
    kind = kind.removesuffix("-blocks")
    model, configs = adapted(base, kind, block_ranks)
    kohya = write_kohya(model, configs, kind, tmp_path / "kohya.safetensors", torch.float32, block_ranks)
    peft = write_peft(model, configs, tmp_path / "peft.safetensors", torch.float32)
    before = weights(base)
    adapted_modules = set(file_modules(base, kohya))
    files = [peft] + ([kohya] if kind in DIFFUSERS_KOHYA else [])
    for strength in (0.6,):  # diffusers' strength scales a plain LoRA's delta: one strength tells it
        ours = sdtune_merge(base, kohya, strength)
        for path in files:
            theirs = diffusers_weights(base, path, strength)
            assert_same_weights(theirs, ours, before, adapted_modules, f"diffusers {path.name} at {strength}")
