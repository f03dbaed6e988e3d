"""Real-width SD 1.5, SD 2.1 and SDXL architectures: every original-layout key maps to a diffusers key and back.

The modules are built on the meta device (no memory), converted to the original layout with sdtune's rules,
and read back both by sdtune and by diffusers' own single-file converters, the independent reference.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders import single_file_utils as dsf

from sdtune.models.components import TEXT_ENCODER_NAMES, build_modules
from sdtune.models.family import ModelFamily
from sdtune.models.ldm_keys import canonical_clip_key, to_diffusers, to_original
from sdtune.models.shipped import shipped_configs
from sdtune.models.single_file import original_layout_rules

# Module counts a kohya-style tool sees are a cheap regression check; these are tensor counts.
FAMILIES = ["sd1", "sd2-v", "sdxl"]


def _meta_model(name: str):
    family = ModelFamily.parse(name)
    modules = build_modules(shipped_configs(family), empty=True)
    return family, modules


@pytest.mark.parametrize("name", FAMILIES)
def test_rules_are_a_bijection(name):
    family, modules = _meta_model(name)
    rules = original_layout_rules(family, modules)
    originals = [r.original for r in rules]
    assert len(originals) == len(set(originals)), "two rules write the same original key"
    covered = {(r.component, k) for r in rules for k in r.diffusers}
    expected = {(n, k) for n, m in modules.items() for k in m.state_dict()}
    assert covered == expected
    assert sum(len(r.diffusers) for r in rules) == len(expected), "a module tensor is used twice"


@pytest.mark.parametrize("name", FAMILIES)
def test_round_trip_through_original_layout_keeps_every_key_and_shape(name):
    family, modules = _meta_model(name)
    rules = original_layout_rules(family, modules)
    states = {n: m.state_dict() for n, m in modules.items()}
    original = to_original(states, rules)
    back = to_diffusers(original, rules)
    for component, state in states.items():
        assert set(back[component]) == set(state)
        for key, tensor in state.items():
            assert back[component][key].shape == tensor.shape, key


@pytest.mark.parametrize("name", FAMILIES)
def test_diffusers_converters_read_our_original_layout(name):
    """diffusers' single-file converters turn what sdtune writes into exactly the modules' keys and shapes."""
    family, modules = _meta_model(name)
    rules = original_layout_rules(family, modules)
    states = {n: m.state_dict() for n, m in modules.items()}
    original = to_original(states, rules)
    configs = shipped_configs(family)

    unet = dsf.convert_ldm_unet_checkpoint(original, configs["unet"])
    vae = dsf.convert_ldm_vae_checkpoint(original, configs["vae"])
    assert {k: tuple(v.shape) for k, v in unet.items()} == {k: tuple(v.shape) for k, v in states["unet"].items()}
    assert {k: tuple(v.shape) for k, v in vae.items()} == {k: tuple(v.shape) for k, v in states["vae"].items()}

    for te_name, prefix, style in zip(
        TEXT_ENCODER_NAMES, family.text_encoder_prefixes, family.text_encoder_styles, strict=False
    ):
        if style == "hf":
            sub = {k: v for k, v in original.items() if k.startswith(prefix)}
            converted = dsf.convert_ldm_clip_checkpoint(sub, remove_prefix=prefix)
        else:
            converted = dsf.convert_open_clip_checkpoint(modules[te_name], original, prefix=prefix)
        ours = {canonical_clip_key(k): tuple(v.shape) for k, v in states[te_name].items()}
        theirs = {canonical_clip_key(k): tuple(v.shape) for k, v in converted.items()}
        assert theirs == ours, te_name


def test_real_size_counts_match_the_published_architectures():
    """Parameter counts of the shipped configs are those of the released models (guards the configs)."""
    expected = {  # millions of parameters, rounded
        "sd1": {"unet": 860, "vae": 84, "text_encoder": 123},
        "sd2-v": {"unet": 866, "vae": 84, "text_encoder": 340},
        "sdxl": {"unet": 2567, "vae": 84, "text_encoder": 123, "text_encoder_2": 695},
    }
    for name, counts in expected.items():
        _, modules = _meta_model(name)
        got = {n: round(sum(p.numel() for p in m.parameters()) / 1e6) for n, m in modules.items()}
        assert got == counts, name


def test_meta_build_uses_no_memory():
    _, modules = _meta_model("sdxl")
    assert all(p.device == torch.device("meta") for m in modules.values() for p in m.parameters())
