"""``sdtune lora check``: the per-tool key maps name what each tool drops or misapplies, and diffusers' own loader
agrees with the diffusers map."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from sdtune.formats.lora_keys import kohya_module_name
from sdtune.formats.tool_keys import TARGETS
from sdtune.inference.generate import make_pipeline
from sdtune.models.tiny import build_tiny
from sdtune.tools.lora_check import check_file, modules_of, real_model_modules


def _pick(shapes, component, words, limit=None):
    paths = [p for p in shapes[component] if any(w in p for w in words)]
    return paths[:limit] if limit else paths


def kohya_file(path, model, modules, picks, dora=None, rename=None):
    """A kohya LoRA file for ``picks`` ({component: [paths]}) of ``modules`` (shapes), optionally with DoRA scales
    (``"in"``: per input column, ``"out"``: per output row) and one module name renamed."""
    tensors = {}
    g = torch.Generator().manual_seed(0)
    for component, paths in picks.items():
        for p in paths:
            shape = modules.shapes[component][p]
            name = kohya_module_name(component, p, modules.family, model.unet.config if model else None)
            if rename and name == rename[0]:
                name = rename[1]
            extra = [1, 1] if len(shape) == 4 else []
            tensors[f"{name}.lora_down.weight"] = torch.randn(2, *shape[1:], generator=g) * 0.1  # LoCon: k x k down
            tensors[f"{name}.lora_up.weight"] = torch.randn(shape[0], 2, *extra, generator=g) * 0.1
            tensors[f"{name}.alpha"] = torch.tensor(2.0)
            if dora:
                scale = (1, shape[1], *extra) if dora == "in" else (shape[0], 1, *extra)
                tensors[f"{name}.dora_scale"] = torch.ones(scale)
    save_file(tensors, str(path), metadata={"ss_base_model_version": modules.family.a1111_base_model_version})
    return path


@pytest.fixture(scope="module")
def tiny_sd1():
    model = build_tiny("sd1")
    return model, modules_of(model)[0]


def test_a_renamed_key_is_named_as_ignored_by_every_target(tmp_path, tiny_sd1):
    model, modules = tiny_sd1
    picks = {"unet": _pick(modules.shapes, "unet", ("proj_in", "to_q")), "text_encoder": []}
    real = kohya_module_name("unet", picks["unet"][0], modules.family, model.unet.config)
    path = kohya_file(tmp_path / "typo.safetensors", model, modules, picks, rename=(real, real + "n"))
    result = check_file(path, model=model)
    assert not result["ok"]
    for target in TARGETS:
        report = result["targets"][target]
        assert sorted(report.ignored) == sorted(f"{real}n.{p}" for p in ("alpha", "lora_down.weight", "lora_up.weight"))
        assert len(report.mapped) == 3 * (len(picks["unet"]) - 1) and not report.issues


@pytest.mark.parametrize(("axis", "flagged"), [("out", {"a1111", "comfyui", "invoke"}), ("in", set())])
def test_dora_scale_axis(tmp_path, tiny_sd1, axis, flagged):
    model, modules = tiny_sd1
    path = kohya_file(tmp_path / "dora.safetensors", model, modules, {"unet": _pick(modules.shapes, "unet", ("to_k",))},
                      dora=axis)  # fmt: skip
    reports = check_file(path, model=model)["targets"]
    for target in ("a1111", "comfyui", "invoke"):
        issues = " ".join(reports[target].issues)
        assert ("output-axis dora_scale" in issues) == (target in flagged), (target, issues)
        assert not reports[target].ignored
    assert "drops the" in reports["diffusers"].issues[0]  # kohya DoRA in diffusers: dora_scale dropped either way
    assert all(k.endswith("dora_scale") for k in reports["diffusers"].ignored)


def _adapted(pipe):
    return {
        (component, name)
        for component in ("unet", "text_encoder")
        for name, sub in getattr(pipe, component).named_modules()
        if isinstance(sub, BaseTunerLayer)
    }


@pytest.mark.parametrize(
    ("layout", "te_words", "te_dropped"),
    [
        ("kohya", ("q_proj", "out_proj", "fc1"), 0),
        ("kohya", ("q_proj", "fc1"), 2),  # no out_proj: diffusers keeps the old q_proj names, then drops them
        ("peft", ("q_proj", "fc1"), 0),
    ],
)
def test_the_diffusers_map_is_what_load_lora_weights_loads(tmp_path, tiny_sd1, layout, te_words, te_dropped):
    model, modules = tiny_sd1
    picks = {
        "unet": _pick(modules.shapes, "unet", ("attn1.to_q", "attn2.to_v", "to_out", "proj_in", "conv1", "ff.net")),
        "text_encoder": _pick(modules.shapes, "text_encoder", te_words),
    }
    bogus = kohya_module_name("unet", picks["unet"][0], modules.family, model.unet.config)
    path = kohya_file(tmp_path / "k.safetensors", model, modules, picks, rename=(bogus, bogus + "n"))
    if layout == "peft":  # the same modules in diffusers' PEFT layout, the bogus one as ".to_qq"
        from safetensors.torch import load_file

        out = {}
        for component, paths in picks.items():
            for p in paths:
                name = kohya_module_name(component, p, modules.family, model.unet.config)
                stem = f"{component}.{p}" + ("q" if name == bogus else "")
                k = load_file(str(path))
                key = bogus + "n" if name == bogus else name
                out[f"{stem}.lora_A.weight"] = k[f"{key}.lora_down.weight"]
                out[f"{stem}.lora_B.weight"] = k[f"{key}.lora_up.weight"]
        path = tmp_path / "p.safetensors"
        save_file(out, str(path))
    report = check_file(path, ["diffusers"], model=model)["targets"]["diffusers"]
    expected = {tuple(v.split(":")) for v in report.mapped.values()}
    pipe = make_pipeline(build_tiny("sd1"))
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    loaded = {(c, p if c == "unet" else p.removeprefix("text_model.")) for c, p in _adapted(pipe)}
    assert {(c, p.removeprefix("text_model.")) for c, p in expected} == loaded
    per_module = 3 if layout == "kohya" else 2
    assert len(report.ignored) == per_module * (1 + te_dropped)  # the bogus module's tensors (+ the dropped q_proj)
    assert len(loaded) == sum(map(len, picks.values())) - 1 - te_dropped


def test_cli_on_the_real_model_exits_1_and_names_the_dropped_key(tmp_path):
    modules, _ = real_model_modules(build_tiny("sd1").family)
    picks = {"unet": _pick(modules.shapes, "unet", ("attentions.0.proj_in",), 2), "text_encoder": []}
    real = kohya_module_name("unet", picks["unet"][0], modules.family)
    path = kohya_file(tmp_path / "real.safetensors", None, modules, picks, rename=(real, real + "n"))
    run = subprocess.run(
        [sys.executable, "-m", "sdtune.cli.main", "lora", "check", str(path), "--json"], capture_output=True, text=True
    )
    assert run.returncode == 1, run.stderr
    data = json.loads(run.stdout)
    assert data["family"] == "sd1" and data["ok"] is False
    assert f"{real}n.lora_down.weight" in data["targets"]["comfyui"]["ignored_keys"]
    assert data["targets"]["a1111"]["mapped"] == 3
    bad = subprocess.run([sys.executable, "-m", "sdtune.cli.main", "lora", "check", str(path), "--for", "auto1111"],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --for auto1111")
