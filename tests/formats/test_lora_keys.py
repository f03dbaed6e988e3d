"""LoRA files: kohya names, and what other tools load from the files sdtune writes.

The independent loaders are diffusers (``pipe.load_lora_weights``: kohya LoRA/LoCon and its native PEFT layout)
and LyCORIS (``lycoris.kohya.create_network_from_weights``: LoRA, DoRA, LoHa, LoKr, diag-OFT, BOFT). Each check
compares the model the other tool built with the PEFT-adapted model sdtune trained, and with the base model, so it
fails if the file is ignored or half-read.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from pathlib import Path

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft import set_peft_model_state_dict as set_peft_state
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune.adapters.dora import input_dora_config, is_input_dora
from sdtune.adapters.oft import orthogonal_config
from sdtune.core.errors import ModelError
from sdtune.formats.hashes import addnet_hash
from sdtune.formats.lora_files import (
    detect_lora_layout,
    from_kohya,
    kohya_metadata,
    lora_summary,
    peft_diffusers_metadata,
    save_lora,
    to_kohya,
    to_peft_diffusers,
)
from sdtune.formats.lora_keys import (
    adaptable_module_names,
    kohya_module_name,
    kohya_name_table,
    kohya_prefix,
    module_path_from_kohya,
)
from sdtune.inference.generate import make_pipeline
from sdtune.models.ldm_keys import unet_rules
from sdtune.models.tiny import build_tiny

UNET = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
LOCON = [*UNET, "conv1", "conv2"]
TE = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
TOL = 1e-5
ALGOS = {
    "lora": lambda t, a: LoraConfig(r=4, lora_alpha=a, target_modules=t, init_lora_weights=False),
    # LoCon with kohya's conv_dim/conv_alpha (PEFT rank/alpha patterns) and rsLoRA's alpha/sqrt(r) scale
    "lora-mixed": lambda t, a: LoraConfig(
        r=4,
        lora_alpha=a,
        target_modules=t,
        init_lora_weights=False,
        use_rslora=True,
        **(
            {"rank_pattern": {"conv1": 2, "conv2": 2}, "alpha_pattern": {"conv1": 1, "conv2": 3}}
            if "conv1" in t
            else {}
        ),
    ),
    # sdtune's DoRA (a magnitude per input column) and peft's (per output row: older files, LyCORIS' default)
    "dora": lambda t, a: input_dora_config(r=4, lora_alpha=a, target_modules=t, init_lora_weights=False),
    "dora-out": lambda t, a: LoraConfig(r=4, lora_alpha=a, target_modules=t, init_lora_weights=False, use_dora=True),
    "loha": lambda t, a: LoHaConfig(r=4, alpha=a, target_modules=t, init_weights=False),
    "lokr": lambda t, a: LoKrConfig(r=1, alpha=a, target_modules=t, init_weights=False),  # low-rank w2
    "lokr-full": lambda t, a: LoKrConfig(r=4, alpha=a, target_modules=t, init_weights=False),  # full w1, w2
    # OFT / BOFT (no alpha): COFT active on the random blocks, rescale; block 2 for OFT because LyCORIS' reader
    # rebuilds a module by factorization(width, block), which swaps a block wider than sqrt(width) (8 wide: 4 -> 2)
    "oft": lambda t, a: orthogonal_config("oft", 2, t, constraint=0.05),
    "oft-rescaled": lambda t, a: orthogonal_config("oft", 2, t, rescaled=True),
    "boft": lambda t, a: orthogonal_config("boft", 4, t, constraint=0.05, rescaled=True),
}
ORTHOGONAL_ALGOS = ("oft", "oft-rescaled", "boft")


def components(model) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in model.modules().items() if k != "vae"}


def adapted(family: str, algo: str = "lora", unet_targets=LOCON):
    """A tiny model with a random (non-zero) adapter; UNet alpha 8 and text-encoder alpha 2 at rank 4."""
    torch.manual_seed(1)
    model = build_tiny(family)
    configs = {c: ALGOS[algo](unet_targets if c == "unet" else TE, 8 if c == "unet" else 2) for c in components(model)}
    for c, module in components(model).items():
        inject_adapter_in_model(configs[c], module)
        for name, p in module.named_parameters():
            if "magnitude" in name or "rescale" in name:  # DoRA / OFT rescale start at the base; move away
                p.data.mul_(1 + 0.5 * torch.rand_like(p))
            elif "oft_blocks" in name:  # OFT starts at R = I
                p.data.normal_(0, 0.2)
    states = {c: get_peft_model_state_dict(m) for c, m in components(model).items()}
    return model, states, configs


def outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """UNet noise prediction and text-encoder hidden states for a fixed input."""
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=gen)
    ids = torch.randint(0, 1000, (1, 77), generator=gen)
    with torch.no_grad():
        enc = [te(ids, output_hidden_states=True) for te in model.text_encoders]
        if model.family.arch == "sdxl":
            hidden = torch.cat([e.hidden_states[-2] for e in enc], dim=-1)
            extra = {"added_cond_kwargs": {"text_embeds": enc[1].text_embeds, "time_ids": torch.zeros(1, 6)}}
        else:
            hidden, extra = enc[0].last_hidden_state, {}
        sample = model.unet(latents, 10, encoder_hidden_states=hidden, **extra).sample
    return sample, hidden


def assert_same_model(got, want, base) -> None:
    for g, w, b in zip(outputs(got), outputs(want), outputs(base), strict=True):
        assert (g - w).abs().max() < TOL
        assert (g - b).abs().max() > 100 * TOL  # the adapter changed something, so the check can fail


# --- names -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_module_name_round_trips(family: str) -> None:
    model = build_tiny(family)
    names = {c: adaptable_module_names(m) for c, m in components(model).items()}
    table = kohya_name_table(model.family, names, model.unet.config)
    assert len(table) == sum(len(v) for v in names.values())  # no two modules share a kohya name
    for name, (component, path) in table.items():
        assert name == kohya_module_name(component, path, model.family, model.unet.config)
        assert name.startswith(kohya_prefix(component, model.family) + "_")
    te_names = {c: v for c, v in names.items() if c != "unet"}
    for name in list(table)[:: max(1, len(table) // 12)]:  # the public inverse, on a sample
        assert module_path_from_kohya(name, model.family, model.unet.config, te_names) == table[name]
    unet_names = [n for n in table if n.startswith("lora_unet_")]
    if family == "sdxl":  # SGM layout (sd-scripts sdxl_original_unet.py), never diffusers block names
        assert not any(k in n for n in unet_names for k in ("down_blocks", "up_blocks", "mid_block"))
        assert all(
            any(k in n for k in ("input_blocks", "middle_block", "output_blocks")) for n in unet_names if "attn" in n
        )
    else:
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in table


@pytest.mark.parametrize(
    ("family", "component", "path", "name"),
    [
        ("sd1", "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
        ("sd1", "text_encoder", "encoder.layers.0.self_attn.q_proj",
         "lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
        ("sdxl", "text_encoder", "encoder.layers.0.self_attn.q_proj",
         "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
        ("sdxl", "text_encoder_2", "text_model.encoder.layers.1.mlp.fc2",
         "lora_te2_text_model_encoder_layers_1_mlp_fc2"),
        ("sdxl", "unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
         "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"),
        ("sdxl", "unet", "up_blocks.0.resnets.2.conv1", "lora_unet_output_blocks_2_0_in_layers_2"),
        ("sdxl", "unet", "mid_block.attentions.0.proj_in", "lora_unet_middle_block_1_proj_in"),
    ],
)  # fmt: skip
def test_known_kohya_names(family: str, component: str, path: str, name: str) -> None:
    model = build_tiny(family)
    assert kohya_module_name(component, path, model.family, model.unet.config) == name
    te_names = {c: adaptable_module_names(m) for c, m in components(model).items() if c != "unet"}
    assert module_path_from_kohya(name, model.family, model.unet.config, te_names) == (component, path)


def test_unknown_kohya_name_is_a_model_error() -> None:
    model = build_tiny("sd1")
    te_names = {"text_encoder": adaptable_module_names(model.text_encoders[0])}
    with pytest.raises(ModelError, match="lora_unet_input_blocks_4_1_proj_in"):
        module_path_from_kohya("lora_unet_input_blocks_4_1_proj_in", model.family, model.unet.config, te_names)


# --- diffusers loads what we write -------------------------------------------------------------------


# sdtune's own DoRA reaches diffusers as a dense LoRA: tests/formats/test_tools_apply_exports.py
@pytest.mark.parametrize(("family", "algo"), [("sd1", "lora"), ("sdxl", "lora"), ("sd1", "dora-out")])
def test_diffusers_loads_kohya_and_peft_files(family: str, algo: str, tmp_path: Path) -> None:
    model, states, configs = adapted(family, algo)
    save_lora(tmp_path / "peft.safetensors", to_peft_diffusers(states, model.family), peft_diffusers_metadata(configs))
    files = ["peft.safetensors"]
    if algo == "lora":  # diffusers drops dora_scale from kohya files (with a warning): DoRA goes to LyCORIS
        kohya = to_kohya(states, configs, model.family, model.unet.config)
        save_lora(tmp_path / "kohya.safetensors", kohya, kohya_metadata(model.family, "locon", 4, 8, conv_rank=4))
        files.append("kohya.safetensors")
    for name in files:
        fresh = build_tiny(family)
        make_pipeline(fresh).load_lora_weights(str(tmp_path), weight_name=name)
        assert_same_model(fresh, model, build_tiny(family))


@pytest.mark.parametrize("algo", ["loha", "oft", "boft"])
def test_diffusers_layout_refuses_loha_oft_and_boft(algo: str) -> None:
    model, states, configs = adapted("sd1", algo, UNET)
    with pytest.raises(ModelError, match="diffusers cannot load LoHa/LoKr/OFT/BOFT"):
        to_peft_diffusers(states, model.family)
    with pytest.raises(ModelError, match="diffusers cannot load LoHa/LoKr/OFT/BOFT"):
        peft_diffusers_metadata(configs)


# --- LyCORIS loads what we write ---------------------------------------------------------------------


def named_view(modules: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """A module whose ``named_modules()`` lists ``modules`` under the given paths (the weights are shared)."""
    root = torch.nn.Module()
    for path, module in modules.items():
        node = root
        *parents, leaf = path.split(".")
        for part in parents:
            if part not in node._modules:
                node.add_module(part, torch.nn.Module())
            node = node._modules[part]
        node.add_module(leaf, module)
    return root


def lycoris_apply(model, tensors: dict[str, torch.Tensor], wd_on_out: bool = True) -> None:
    """Build LyCORIS' network from the file's tensors and hook it into ``model``'s modules (forward path)."""
    network, tes, unet = lycoris_network(model, tensors, wd_on_out)
    network.apply_to(tes, unet, apply_text_encoder=True, apply_unet=True)


def lycoris_network(model, tensors: dict[str, torch.Tensor], wd_on_out: bool = True):
    """LyCORIS' network built from the file's tensors on ``model``'s modules, and the modules as LyCORIS sees them.

    LyCORIS matches names against ``named_modules()``: SD 1.x's diffusers UNet as is; transformers 5 text
    encoders get their ``text_model.`` root back; the SDXL UNet is shown in its SGM layout (what sd-scripts'
    ``sdxl_original_unet.py`` is), so for SDXL the UNet names are sdtune's rules, checked against diffusers above.
    LyCORIS 4.1.3's ``merge_to`` applies alpha/rank twice for LoHa/LoKr, so the forward path is compared.
    ``wd_on_out=False``: LyCORIS' per-input-column DoRA; its ``create_network_from_weights`` has no way to ask for
    it (``LoConModule.make_module_from_state_dict`` builds with the default ``wd_on_out=True`` and cannot copy a
    ``[1, in]`` scale), so the modules it builds get the flag passed in.
    """
    lycoris_kohya = pytest.importorskip("lycoris.kohya", reason="pip install lycoris-lora==4.1.3")
    network_cls = lycoris_kohya.LycorisNetworkKohya
    tes = [named_view({"text_model": te}) if not hasattr(te, "text_model") else te for te in model.text_encoders]
    if model.family.arch == "sdxl":
        modules = dict(model.unet.named_modules())
        rules = unet_rules([n + ".weight" for n in adaptable_module_names(model.unet)], model.unet.config, prefix="")
        unet = named_view(
            {r.original.removesuffix(".weight"): modules[r.diffusers[0].removesuffix(".weight")] for r in rules}
        )
    else:
        unet, tes = model.unet, tes[0]
    # 4.1.3 targets diffusers' time embedding both by class and by name and asserts on the duplicate.
    saved = list(network_cls.UNET_TARGET_REPLACE_NAME)
    network_cls.apply_preset({"unet_target_name": []})
    logging.getLogger("LyCORIS").setLevel(logging.WARNING)
    from lycoris.modules.locon import LoConModule

    init = LoConModule.__init__
    if not wd_on_out:
        LoConModule.__init__ = functools.partialmethod(init, wd_on_out=False)
    try:
        network, _ = lycoris_kohya.create_network_from_weights(1.0, None, None, tes, unet, weights_sd=dict(tensors))
    finally:
        network_cls.apply_preset({"unet_target_name": saved})
        LoConModule.__init__ = init
    assert len(network.unet_loras) + len(network.text_encoder_loras) == len({k.split(".")[0] for k in tensors})
    return network, tes, unet


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("algo", list(ALGOS))
def test_lycoris_loads_every_algorithm(family: str, algo: str, tmp_path: Path) -> None:
    model, states, configs = adapted(family, algo)
    path = tmp_path / "lyco.safetensors"
    save_lora(path, to_kohya(states, configs, model.family, model.unet.config), {})
    if algo.startswith("dora"):  # per input column [1, in(, 1, 1)] (sdtune's), per output row [out, 1(, 1, 1)]
        tensors = load_file(path)
        scales = {k: v for k, v in tensors.items() if k.endswith(".dora_scale")}
        for key, scale in scales.items():
            up, down = (tensors[key.replace("dora_scale", f"lora_{n}.weight")] for n in ("up", "down"))
            ones = [1] * (up.dim() - 2)
            assert scale.shape == ((up.shape[0], 1, *ones) if algo == "dora-out" else (1, down.shape[1], *ones))
        assert scales
    if algo in ORTHOGONAL_ALGOS:  # LyCORIS built its own OFT / BOFT modules from the file (algo_check on the rank)
        kinds = {"oft": "DiagOFTModule", "oft-rescaled": "DiagOFTModule", "boft": "ButterflyOFTModule"}
        assert all(k.endswith((".oft_blocks", ".alpha", ".rescale")) for k in load_file(path))
        network, _, _ = lycoris_network(build_tiny(family), load_file(path))
        assert {type(m).__name__ for m in network.unet_loras + network.text_encoder_loras} == {kinds[algo]}
    fresh = build_tiny(family)
    lycoris_apply(fresh, load_file(path), wd_on_out=algo != "dora")
    assert_same_model(fresh, model, build_tiny(family))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("algo", ORTHOGONAL_ALGOS)
def test_lycoris_merges_oft_and_boft_files_to_sdtunes_merged_weights(family: str, algo: str, tmp_path: Path) -> None:
    """LyCORIS' own merge (``merge_to``: its ``get_merged_weight`` written into each module) of the file sdtune wrote
    gives sdtune's merge of it (``apply_lora`` + ``merge_into``) and the trained model's merged weights."""
    from sdtune.adapters.lora import set_merged
    from sdtune.tools.lora_tools import apply_lora, merge_into

    model, states, configs = adapted(family, algo)
    path = tmp_path / "lyco.safetensors"
    save_lora(path, to_kohya(states, configs, model.family, model.unet.config), {})
    theirs = build_tiny(family)
    network, _, _ = lycoris_network(theirs, load_file(path))
    for module in network.unet_loras + network.text_encoder_loras:
        module.merge_to(1.0)
    ours = build_tiny(family)
    apply_lora(ours, path)
    merge_into(ours)
    for module in components(model).values():
        set_merged(module, True)
    base = build_tiny(family)
    for c in components(base):
        got, want, trained = (components(m)[c].state_dict() for m in (theirs, ours, model))
        trained = {k.replace(".base_layer", ""): v for k, v in trained.items()}
        changed = 0
        for key, before in components(base)[c].state_dict().items():
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(want[key], trained[key], atol=1e-5, rtol=1e-4)
            changed += not torch.allclose(want[key], before, atol=1e-4)
        assert changed  # the file rotates this component's weights


# --- round trips, layout, metadata -------------------------------------------------------------------


@pytest.mark.parametrize("algo", list(ALGOS))
def test_kohya_round_trip(algo: str) -> None:
    model, states, configs = adapted("sdxl", algo)
    tensors = to_kohya(states, configs, model.family, model.unet.config)
    names = {c: adaptable_module_names(m) for c, m in components(build_tiny("sdxl")).items() if c != "unet"}
    states2, configs2 = from_kohya(tensors, model.family, model.unet.config, names)
    again = to_kohya(states2, configs2, model.family, model.unet.config)
    assert again.keys() == tensors.keys()
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)
    # full-matrix LoKr has PEFT's scale multiplied into lokr_w2 (readers use scale 1); COFT is applied to the blocks
    if algo not in ("lokr-full", "oft", "boft"):
        for c in states:
            assert states2[c].keys() == states[c].keys()
            assert all(torch.equal(states2[c][k], states[c][k]) for k in states[c])
    fresh = build_tiny("sdxl")  # the recovered configs rebuild the same adapter in PEFT
    for c, module in components(fresh).items():
        inject_adapter_in_model(copy.deepcopy(configs2[c]), module)
        result = set_peft_state(module, states2[c])
        assert not [k for k in result.unexpected_keys if "lora" in k or "hada" in k or "lokr" in k or "oft" in k]
    assert_same_model(fresh, model, build_tiny("sdxl"))


def test_from_kohya_rejects_another_family() -> None:
    model, states, configs = adapted("sdxl", "lora", UNET)
    tensors = to_kohya(states, configs, model.family, model.unet.config)
    sd1 = build_tiny("sd1")
    with pytest.raises(ModelError, match="match no module of this sd1 model"):
        from_kohya(tensors, sd1.family, sd1.unet.config, {"text_encoder": adaptable_module_names(sd1.text_encoders[0])})


def test_from_kohya_reads_both_dora_axes_and_refuses_other_scales() -> None:
    model, states, configs = adapted("sd1", "dora", UNET)
    tensors = to_kohya(states, configs, model.family, model.unet.config)
    names = {"text_encoder": adaptable_module_names(model.text_encoders[0])}
    _, read = from_kohya(tensors, model.family, model.unet.config, names)
    assert all(is_input_dora(c) for c in read.values())  # [1, in]: sdtune's per-input-column DoRA
    old = to_kohya(*adapted("sd1", "dora-out", UNET)[1:], model.family, model.unet.config)
    _, read = from_kohya(old, model.family, model.unet.config, names)
    assert all(c.use_dora and not is_input_dora(c) for c in read.values())  # [out, 1]: peft's
    key = next(k for k in tensors if k.startswith("lora_unet") and k.endswith("to_q.dora_scale"))
    mixed = dict(tensors) | {key: old[key]}
    with pytest.raises(ModelError, match="mixes per-input-column and per-output-row"):
        from_kohya(mixed, model.family, model.unet.config, names)
    wrong = dict(tensors) | {key: torch.ones(1, tensors[key].shape[1] * 2)}
    with pytest.raises(ModelError, match=r"dora_scale of shape \(1, 16\)"):
        from_kohya(wrong, model.family, model.unet.config, names)


@pytest.mark.parametrize(
    ("algo", "layout", "module"),
    [("lora", "kohya", "networks.lora"), ("dora", "lycoris", "lycoris.kohya"), ("loha", "lycoris", "lycoris.kohya"),
     ("lokr", "lycoris", "lycoris.kohya"), ("oft", "lycoris", "lycoris.kohya"), ("boft", "lycoris", "lycoris.kohya")],
)  # fmt: skip
def test_layout_metadata_and_hash(algo: str, layout: str, module: str, tmp_path: Path) -> None:
    model, states, configs = adapted("sdxl", algo, UNET)
    path = tmp_path / f"{algo}.safetensors"
    meta = kohya_metadata(model.family, algo, 4, 8.0, {"ss_steps": 100, "ss_tag_frequency": {"a": {"cat": 2}}})
    written = save_lora(path, to_kohya(states, configs, model.family, model.unet.config), meta)
    with safe_open(str(path), framework="pt") as fh:
        on_disk, keys = fh.metadata(), list(fh.keys())
    assert on_disk == written
    assert detect_lora_layout(keys) == layout
    assert on_disk["sshs_model_hash"] == addnet_hash(path)
    assert len(on_disk["sshs_legacy_hash"]) == 8
    assert on_disk["ss_network_module"] == module
    assert (on_disk["ss_network_dim"], on_disk["ss_network_alpha"]) == ("4", "8.0")
    assert on_disk["ss_base_model_version"] == "sdxl_base_v1-0" and on_disk["ss_v2"] == "False"
    assert on_disk["modelspec.sai_model_spec"] == "1.0.0"
    assert on_disk["modelspec.architecture"] == "stable-diffusion-xl-v1-base/" + (
        "lora" if algo == "lora" else "lycoris"
    )
    assert json.loads(on_disk["ss_tag_frequency"]) == {"a": {"cat": 2}} and on_disk["ss_steps"] == "100"
    args = json.loads(on_disk["ss_network_args"])
    assert args.get("algo") == {"lora": None, "dora": "lora", "oft": "diag-oft"}.get(algo, algo)  # LyCORIS' names
    if algo == "dora":  # sdtune's DoRA is per input column
        assert args["dora_wd"] == "True" and args["wd_on_output"] == "False"
    summary = lora_summary(path)
    assert summary["layout"] == layout and summary["algo"] == algo
    assert summary["modules"] == len({k.split(".")[0] for k in keys})
    assert set(summary["components"]) == {"unet", "text_encoder", "text_encoder_2"}
    if algo != "lokr":
        assert summary["ranks"] == [{"oft": 2}.get(algo, 4)]  # OFT / BOFT: the block size


def test_peft_layout_is_detected(tmp_path: Path) -> None:
    model, states, configs = adapted("sd1", "lora", UNET)
    path = tmp_path / "p.safetensors"
    save_file(to_peft_diffusers(states, model.family), str(path), peft_diffusers_metadata(configs))
    summary = lora_summary(path)
    assert (summary["layout"], summary["algo"], summary["ranks"]) == ("peft", "lora", [4])
    assert all(k.startswith(("unet.", "text_encoder.text_model.")) for k in load_file(path))
    with pytest.raises(ModelError, match="not a LoRA file"):
        detect_lora_layout(["model.diffusion_model.out.2.weight"])
