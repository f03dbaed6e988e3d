"""LoRA tools: apply/merge, merge_loras, resize, extract, convert and the family check, on tiny models.

Adapters are made with peft (non-zero init) on tiny models and written with the real writers, as in
``tests/formats/test_lora_keys.py``; each check compares against the base model too, so it can fail.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune.adapters.dora import input_dora_config
from sdtune.adapters.oft import orthogonal_config
from sdtune.core.errors import ModelError
from sdtune.formats.lora_files import (
    kohya_metadata,
    lora_summary,
    peft_diffusers_metadata,
    save_lora,
    to_kohya,
    to_peft_diffusers,
)
from sdtune.models.loading import load_model, save_model
from sdtune.models.targets import TEXT_ENCODER_TARGETS, UNET_TARGETS
from sdtune.tools.lora_tools import (
    apply_lora,
    convert_lora,
    extract_lora,
    merge_into,
    merge_loras,
    read_lora,
    resize_lora,
)

UNET = list(UNET_TARGETS["attention_ff"])
LOCON = [*UNET, "conv1", "conv2"]
TE = list(TEXT_ENCODER_TARGETS["attention_ff"])
TOL = 1e-5
KINDS = {  # (peft config from targets and alpha, UNet targets)
    "lora": (lambda t, a: LoraConfig(r=4, lora_alpha=a, target_modules=t, init_lora_weights=False), UNET),
    "locon": (lambda t, a: LoraConfig(r=4, lora_alpha=a, target_modules=t, init_lora_weights=False), LOCON),
    "dora": (  # sdtune's DoRA: a magnitude per input column
        lambda t, a: input_dora_config(r=4, lora_alpha=a, target_modules=t, init_lora_weights=False),
        LOCON,
    ),
    "dora-out": (  # peft's DoRA, per output row: older sdtune files and LyCORIS' default
        lambda t, a: LoraConfig(r=4, lora_alpha=a, target_modules=t, init_lora_weights=False, use_dora=True),
        LOCON,
    ),
    "loha": (lambda t, a: LoHaConfig(r=4, alpha=a, target_modules=t, init_weights=False), LOCON),
    "lokr": (lambda t, a: LoKrConfig(r=1, alpha=a, target_modules=t, init_weights=False), LOCON),
    # multiplicative: OFT with COFT (active on the random blocks), BOFT with rescale
    "oft": (lambda t, a: orthogonal_config("oft", 4, t, constraint=0.05), LOCON),
    "boft": (lambda t, a: orthogonal_config("boft", 4, t, rescaled=True), LOCON),
}


def parts(model) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in model.modules().items() if k != "vae"}


def write_lora(base, kind: str, path: Path, seed: int = 1, layout: str = "kohya"):
    """Write a random adapter of ``kind`` for ``base`` to ``path``; return the peft-adapted copy (the reference)."""
    make, unet_targets = KINDS[kind]
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    configs = {c: make(unet_targets if c == "unet" else TE, 8 if c == "unet" else 2) for c in parts(model)}
    for c, module in parts(model).items():
        inject_adapter_in_model(configs[c], module)
        for name, p in module.named_parameters():
            if "magnitude" in name or "rescale" in name:  # DoRA / OFT rescale start at the base; move away
                p.data.mul_(1 + 0.5 * torch.rand_like(p))
            elif "oft_blocks" in name:  # OFT starts at R = I
                p.data.normal_(0, 0.3)
    states = {c: get_peft_model_state_dict(m) for c, m in parts(model).items()}
    if layout == "peft":
        save_lora(path, to_peft_diffusers(states, model.family), peft_diffusers_metadata(configs))
    else:
        tensors = to_kohya(states, configs, model.family, model.unet.config)
        algo = kind.removesuffix("-out")
        meta = kohya_metadata(
            model.family, algo, 4, 8, conv_rank=4 if kind != "lora" else None, dora_on_output=kind == "dora-out"
        )
        save_lora(path, tensors, meta)
    return model


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


def assert_close(got, want, tol: float = TOL) -> None:
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max() < tol


def assert_differs(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max() > 100 * TOL


def applied(base, *loras: tuple[Path, float], strength_as: str = "a1111"):
    model = copy.deepcopy(base)
    for path, weight in loras:
        apply_lora(model, path, weight, strength_as)  # type: ignore[arg-type]
    return model


def deltas(path: Path) -> dict[str, torch.Tensor]:
    """The full update ``up @ down * alpha / rank`` of every module of a kohya LoRA file, ``[out, in*k*k]``."""
    t = load_file(path)
    out = {}
    for key in t:
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            down, up = t[key].double().flatten(1), t[f"{name}.lora_up.weight"].double().flatten(1)
            out[name] = up @ down * float(t[f"{name}.alpha"]) / down.shape[0]
    return out


@pytest.fixture(scope="module")
def base_file(tmp_path_factory, tiny_model):
    """Tiny models saved as fp32 single files, by family."""
    root = tmp_path_factory.mktemp("bases")
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = save_model(tiny_model(family), root / f"{family}.safetensors", dtype=torch.float32)
        return cache[family]

    return get


# --- 1. apply == merge, for every kind ---------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_apply_equals_merge(kind: str, family: str, tiny_model, tmp_path: Path) -> None:
    base = tiny_model(family)
    path = tmp_path / f"{kind}.safetensors"
    reference = write_lora(base, kind, path)
    model = applied(base, (path, 1.0))
    unmerged = outputs(model)
    assert_close(unmerged, outputs(reference))  # the file was read back whole and right
    assert_differs(unmerged, outputs(base))
    merge_into(model)
    assert_close(outputs(model), unmerged)
    for c, module in model.modules().items():
        assert module.state_dict().keys() == base.modules()[c].state_dict().keys()
        assert not any(isinstance(m, BaseTunerLayer) for m in module.modules())
    # weight 0.5 is W + 0.5 * (W_adapted - W) for every kind, DoRA included, merged or not
    half = applied(base, (path, 0.5))
    half_unmerged = outputs(half)
    merge_into(half)
    assert_close(outputs(half), half_unmerged)
    assert_differs(half_unmerged, unmerged)
    full, plain = model.unet.state_dict(), base.unet.state_dict()
    for key, value in half.unet.state_dict().items():
        assert torch.allclose(value, (plain[key] + full[key]) / 2, atol=TOL)


# --- 2. merge_loras ----------------------------------------------------------------------------------


def test_merge_loras_stacks_and_saves_both_layouts(tiny_model, base_file, tmp_path: Path) -> None:
    base = tiny_model("sd1")
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_lora(base, "dora", first, seed=1)  # convolutions too: layers that only the first adapter has
    write_lora(base, "lora", second, seed=2)
    stacked = outputs(applied(base, (first, 1.0), (second, 0.5)))  # two adapters, both active, unmerged
    assert_differs(stacked, outputs(applied(base, (first, 1.0))))
    assert_differs(stacked, outputs(applied(base, (second, 0.5))))
    pairs = [(first, 1.0), (second, 0.5)]
    single = merge_loras(base_file("sd1"), pairs, tmp_path / "m.safetensors", "single_file", torch.float32)
    folder = merge_loras(base_file("sd1"), pairs, tmp_path / "m-diffusers", "diffusers", torch.float32)
    assert folder.is_dir() and (folder / "unet").is_dir()
    for out in (single, folder):
        assert_close(outputs(load_model(out)), stacked)


@pytest.mark.parametrize("kind", ["oft", "boft"])
def test_oft_stacks_with_a_lora_in_either_order_and_merges_as_applied(
    kind: str, tiny_model, base_file, tmp_path: Path
) -> None:
    """OFT on top of a LoRA layer rotates that layer's output, a LoRA on top of OFT adds to the rotated layer: both
    orders, unmerged, equal merge_loras' model (the files merged one after another)."""
    base = tiny_model("sd1")
    oft, lora = tmp_path / "oft.safetensors", tmp_path / "lora.safetensors"
    write_lora(base, kind, oft, seed=1)
    write_lora(base, "lora", lora, seed=2)
    for pairs in ([(oft, 1.0), (lora, 0.5)], [(lora, 0.5), (oft, 0.7)]):
        stacked = outputs(applied(base, *pairs))
        assert_differs(stacked, outputs(applied(base, pairs[0])))
        merged = merge_loras(base_file("sd1"), pairs, tmp_path / "m.safetensors", dtype=torch.float32, overwrite=True)
        assert_close(outputs(load_model(merged)), stacked)


@pytest.mark.parametrize("kind", ["oft", "boft"])
def test_comfyui_strength_rule_merges_as_it_applies_and_differs_from_a1111s(
    kind: str, tiny_model, base_file, tmp_path: Path
) -> None:
    base = tiny_model("sd1")
    path = tmp_path / f"{kind}.safetensors"
    write_lora(base, kind, path)
    comfy = applied(base, (path, 0.6), strength_as="comfyui")
    unmerged = outputs(comfy)
    assert_differs(unmerged, outputs(applied(base, (path, 0.6))))  # ComfyUI's strength is not A1111's
    merged = merge_loras(base_file("sd1"), [(path, 0.6)], tmp_path / "m.safetensors", dtype=torch.float32,
                         strength_as="comfyui")  # fmt: skip
    assert_close(outputs(load_model(merged)), unmerged)
    with pytest.raises(ModelError, match="strength_as 'nope': use one of a1111, comfyui"):
        apply_lora(copy.deepcopy(base), path, 0.6, "nope")  # type: ignore[arg-type]


# --- 3. resize ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "layout"), [("locon", "kohya"), ("dora", "kohya"), ("lora", "peft")])
def test_resize(kind: str, layout: str, tiny_model, tmp_path: Path) -> None:
    base = tiny_model("sd1")
    path = tmp_path / "in.safetensors"
    write_lora(base, kind, path, layout=layout)
    reports = resize_lora(path, 4, tmp_path / "same.safetensors")
    assert reports and all(r.rank == 4 and r.retained == pytest.approx(1.0, abs=1e-6) for r in reports)
    assert_close(outputs(applied(base, (tmp_path / "same.safetensors", 1.0))), outputs(applied(base, (path, 1.0))))

    small = tmp_path / "small.safetensors"
    reports = resize_lora(path, 2, small, new_conv_rank=3)
    assert all(0 < r.retained <= 1 + 1e-9 for r in reports) and min(r.retained for r in reports) < 0.999
    summary = lora_summary(small)
    has_kxk = kind != "lora"
    assert summary["ranks"] == ([2, 3] if has_kxk else [2])
    assert summary["algo"] == ("dora" if kind == "dora" else "lora")
    if layout == "kohya":
        meta = summary["metadata"]
        assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "2.0")
        assert json.loads(meta["ss_network_args"])["conv_dim"] == "3"
        with safe_open(str(small), framework="pt") as fh:  # hashes are of the new file
            assert fh.metadata()["sshs_model_hash"] != lora_summary(path)["metadata"]["sshs_model_hash"]
        before, after = deltas(path), deltas(small)
        for r in reports:  # the best rank-k approximation: what is lost is exactly 1 - retained^2
            lost = (before[r.module] - after[r.module]).square().sum() / before[r.module].square().sum()
            assert float(lost) == pytest.approx(1 - r.retained**2, abs=1e-5)
    else:
        config = json.loads(summary["metadata"]["lora_adapter_metadata"])
        assert (config["unet.r"], config["unet.lora_alpha"]) == (2, 2)
    assert_differs(outputs(applied(base, (small, 1.0))), outputs(base))


# --- 4. extract --------------------------------------------------------------------------------------


def test_extract_recovers_the_lora(tiny_model, base_file, tmp_path: Path) -> None:
    base = tiny_model("sdxl")
    lora = tmp_path / "lora.safetensors"
    write_lora(base, "lora", lora)
    tuned = merge_loras(base_file("sdxl"), [(lora, 1.0)], tmp_path / "tuned.safetensors", dtype=torch.float32)
    out = tmp_path / "extracted.safetensors"
    reports = extract_lora(base_file("sdxl"), tuned, 6, out)
    want, got = deltas(lora), deltas(out)
    assert got.keys() == want.keys()  # every adapted module, nothing else (unchanged layers are left out)
    for name, delta in want.items():
        assert (got[name] - delta).abs().max() < 1e-4, name
    assert all(r.retained == pytest.approx(1.0, abs=1e-4) and r.rank == 6 for r in reports)
    meta = lora_summary(out)["metadata"]
    assert (meta["ss_network_dim"], meta["ss_base_model_version"]) == ("6", "sdxl_base_v1-0")


# --- convert -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dora", "dora-out"])
def test_convert_round_trip(kind: str, tiny_model, base_file, tmp_path: Path) -> None:
    base = tiny_model("sd1")
    kohya = tmp_path / "dora.safetensors"
    write_lora(base, kind, kohya)
    peft = convert_lora(kohya, "peft", tmp_path / "peft.safetensors", base=base_file("sd1"))
    assert lora_summary(peft)["layout"] == "peft"
    assert read_lora(peft, base)[3] == "peft"
    assert_close(outputs(applied(base, (peft, 1.0))), outputs(applied(base, (kohya, 1.0))))
    back = convert_lora(peft, "kohya", tmp_path / "back.safetensors", base=base)
    want, got = load_file(kohya), load_file(back)
    if kind == "dora-out":  # peft's DoRA is DoRA in both layouts
        assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k]) for k in want)
    else:  # per input column: the PEFT file is the exact dense LoRA of the merged delta, and stays that
        assert lora_summary(peft)["algo"] == lora_summary(back)["algo"] == "lora"
        assert_close(outputs(applied(base, (back, 1.0))), outputs(applied(base, (kohya, 1.0))))
        with pytest.raises(ModelError) as exc:  # the dense delta needs the base weights
            convert_lora(kohya, "peft", tmp_path / "no-base.safetensors")
        one_line_naming(exc, kohya, "base")


def test_input_dora_after_another_file_on_the_same_layers_is_refused(tiny_model, tmp_path: Path) -> None:
    base = tiny_model("sd1")
    lora, dora = tmp_path / "lora.safetensors", tmp_path / "dora.safetensors"
    write_lora(base, "lora", lora)
    write_lora(base, "dora", dora, seed=2)
    with pytest.raises(ModelError) as exc:  # peft would reuse the plain layer and make it a per-row DoRA
        applied(base, (lora, 1.0), (dora, 1.0))
    one_line_naming(exc, dora, "apply or merge it first")
    # the other order works: sdtune's DoRA layers take a plain LoRA file on top (test_merge_loras_stacks...)
    assert_differs(outputs(applied(base, (dora, 1.0), (lora, 1.0))), outputs(applied(base, (dora, 1.0))))


# --- 5. errors ---------------------------------------------------------------------------------------


def one_line_naming(exc: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    message = str(exc.value)
    assert "\n" not in message and str(path) in message
    assert all(w in message for w in words), message


def test_sd1_lora_into_sdxl_fails_before_changing_anything(tiny_model, base_file, tmp_path: Path) -> None:
    sd1 = tmp_path / "sd1.safetensors"
    write_lora(tiny_model("sd1"), "lora", sd1)
    bare = tmp_path / "bare.safetensors"  # no metadata: decided from the key names
    save_file(load_file(sd1), str(bare))
    model = copy.deepcopy(tiny_model("sdxl"))
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    for path, claim in ((sd1, "sd1"), (bare, "sd1/sd2")):
        with pytest.raises(ModelError) as exc:
            apply_lora(model, path)
        one_line_naming(exc, path, f"a LoRA for {claim} cannot be merged into an sdxl model")
    sd2 = tmp_path / "sd2.safetensors"
    write_lora(tiny_model("sd2"), "lora", sd2)
    save_file(load_file(sd2), str(sd2))  # no metadata: SD 1.x and 2.x share key prefixes, the model's modules decide
    with pytest.raises(ModelError) as exc:
        apply_lora(copy.deepcopy(tiny_model("sd1")), sd2)
    one_line_naming(exc, sd2, "another")
    assert not any(isinstance(m, BaseTunerLayer) for m in model.unet.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())
    out = tmp_path / "never.safetensors"
    with pytest.raises(ModelError) as exc:
        merge_loras(base_file("sdxl"), [(sd1, 1.0)], out)
    one_line_naming(exc, sd1, "sdxl")
    assert not out.exists()


@pytest.mark.parametrize(("resized", "converted"), [("loha", "lokr"), ("oft", "boft")])
def test_resize_and_convert_to_peft_of_lycoris_only_kinds_are_refused(
    tiny_model, tmp_path: Path, resized: str, converted: str
) -> None:
    base = tiny_model("sd1")
    first, second = tmp_path / f"{resized}.safetensors", tmp_path / f"{converted}.safetensors"
    write_lora(base, resized, first)
    write_lora(base, converted, second)
    with pytest.raises(ModelError) as exc:
        resize_lora(first, 2, tmp_path / "x.safetensors")
    one_line_naming(exc, first, resized, "LoRA, LoCon and DoRA")
    with pytest.raises(ModelError) as exc:
        convert_lora(second, "peft", tmp_path / "y.safetensors")
    one_line_naming(exc, second, "PEFT")  # (from key names alone a BOFT is named oft)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


# --- 6. CLI ------------------------------------------------------------------------------------------


def sdtune(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "sdtune.cli.main", "lora", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli_inspect_and_bad_merge(tiny_model, base_file, tmp_path: Path) -> None:
    dora = tmp_path / "dora.safetensors"
    write_lora(tiny_model("sd1"), "dora", dora)
    shown = sdtune("inspect", str(dora))
    assert shown.returncode == 0, shown.stderr
    assert "algo: dora" in shown.stdout and "rank: 4" in shown.stdout and "ss_network_dim" in shown.stdout
    failed = sdtune("merge", base_file("sdxl"), f"{dora}:0.5", "--out", str(tmp_path / "m.safetensors"))
    assert failed.returncode == 2
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "a LoRA for sd1 cannot be merged into an sdxl model" in lines[0]
