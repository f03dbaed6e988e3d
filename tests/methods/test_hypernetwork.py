"""Hypernetworks on tiny SD1/SD2 models: only the hypernetwork trains, the .pt reproduces it, strength 0 = base."""

from __future__ import annotations

import typing

import pytest
import torch
import yaml
from accelerate import Accelerator
from peft.tuners.tuners_utils import BaseTunerLayer
from typer.testing import CliRunner

from sdtune.adapters.hypernetwork import ACTIVATIONS, Hypernetwork, HypernetworkSpec, install
from sdtune.adapters.lora import inject, peft_config
from sdtune.cli.main import app
from sdtune.config import HypernetworkConfig, load_train_config
from sdtune.config.methods import HypernetworkActivation
from sdtune.core.errors import ConfigError, SdtuneError
from sdtune.core.events import EventBus
from sdtune.formats.hashes import a1111_short_hash
from sdtune.formats.hypernetwork_file import load_hypernetwork
from sdtune.methods.hypernetwork import setup
from sdtune.models.loading import load_model
from sdtune.models.text_encoding import encode_prompts
from sdtune.models.tiny import build_tiny
from sdtune.train.loop import train
from sdtune.train.rundir import RunDir


def hn_config(tmp_path, model, folder, **extra) -> dict:
    base = {
        "method": "hypernetwork",
        "name": "style",
        "output_dir": str(tmp_path / "runs"),
        "model": {"base": str(model)},
        "data": {"path": str(folder), "batch_size": 2},
        "optimizer": {"lr": 1e-2},
        "train": {"max_steps": 3},
        "preview": {"steps": 2, "before_training": False},
    }
    return base | extra


def run_job(cfg: HypernetworkConfig, job=None):
    job = job or setup(cfg, Accelerator(cpu=True))
    outputs = train(job, cfg, RunDir(f"{cfg.output_dir}/{cfg.name}"), EventBus(), Accelerator(cpu=True))
    return job, outputs


def _unet_out(model, prompt="tag1, red, square"):
    cond = encode_prompts(model, [prompt])
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    with torch.no_grad():
        return model.unet(latents, torch.tensor([500]), cond.context).sample


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_identity_start_equals_base_and_training_changes_only_the_hypernetwork(
    tmp_path, tiny_checkpoint, image_folder, family
):
    path = tiny_checkpoint(family)
    cfg = HypernetworkConfig.model_validate(hn_config(tmp_path, path, image_folder))
    job = setup(cfg, Accelerator(cpu=True))
    base = _unet_out(load_model(path))
    with torch.no_grad():  # all-zero MLPs: every module is the identity
        for p in job.hypernetwork.parameters():
            p.zero_()
    job.hypernetwork.eval()
    torch.testing.assert_close(_unet_out(job.model), base, rtol=0, atol=0)
    job.hypernetwork.train()

    job, outputs = run_job(cfg, job)
    job.hypernetwork.eval()
    assert (_unet_out(job.model) - base).abs().max() > 1e-5  # trained: it now changes the output
    assert job.hypernetwork.module(16, 0).linear[-1].bias.abs().max() > 0
    original = load_model(path)
    for name, module in job.model.modules().items():  # UNet, text encoder, VAE: bit-identical
        reference = original.modules()[name].state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(value, reference[key]), (name, key)
    assert [p.name for p in outputs] == ["style.pt"]


def test_exported_file_reproduces_the_trained_model(tmp_path, tiny_checkpoint, image_folder):
    path = tiny_checkpoint("sd1")
    cfg = HypernetworkConfig.model_validate(
        hn_config(tmp_path, path, image_folder, activation="relu", layer_norm=True, multiplier=0.7)
    )
    job, (pt,) = run_job(cfg)
    data = torch.load(pt, map_location="cpu", weights_only=True)
    assert data["step"] == 3 and data["name"] == "style" and data["activation_func"] == "relu"
    assert data["sd_checkpoint"] == a1111_short_hash(path) and data["sd_checkpoint_name"] == path.stem
    assert [k for k in data if isinstance(k, int)] == [16]  # the tiny model's cross-attention width

    job.hypernetwork.eval()
    job.hypernetwork.multiplier = 1.0
    trained = _unet_out(job.model)
    fresh = load_model(path)
    loaded = load_hypernetwork(pt)
    install(fresh.unet, loaded.hypernetwork)
    torch.testing.assert_close(_unet_out(fresh), trained, rtol=0, atol=0)


def test_multiplier_zero_is_the_base_model(tmp_path, tiny_checkpoint, image_folder):
    path = tiny_checkpoint("sd2")
    job = setup(HypernetworkConfig.model_validate(hn_config(tmp_path, path, image_folder)), Accelerator(cpu=True))
    base = _unet_out(load_model(path))
    job.hypernetwork.eval()
    assert (_unet_out(job.model) - base).abs().max() > 1e-7  # A1111's init is near, not at, the identity
    job.hypernetwork.multiplier = 0.0
    torch.testing.assert_close(_unet_out(job.model), base, rtol=0, atol=0)


def test_hypernetwork_and_lora_together():
    model = build_tiny("sd1")
    unet = model.unet.eval().requires_grad_(False)
    inject(unet, peft_config("lora", 4, 4.0, ["to_k", "to_v", "to_q"]))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    lora_only = _unet_out(model)
    hn = Hypernetwork([16], HypernetworkSpec())
    hn.reset_parameters(torch.Generator().manual_seed(0))
    hooks = install(unet, hn.eval())  # after peft: the hooks sit on the LoRA wrappers, so both paths see them
    assert hooks.layers and all(isinstance(unet.get_submodule(name), BaseTunerLayer) for name in hooks.layers)
    with_hn = _unet_out(model)
    assert (with_hn - lora_only).abs().max() > 1e-6
    hn.multiplier = 0.0
    torch.testing.assert_close(_unet_out(model), lora_only, rtol=0, atol=0)
    hn.multiplier = 1.0
    hooks.remove()
    torch.testing.assert_close(_unet_out(model), lora_only, rtol=0, atol=0)


def test_sdtune_train_and_generate_through_the_cli(tmp_path, tiny_checkpoint, image_folder, monkeypatch):
    path = tiny_checkpoint("sd1")
    config = tmp_path / "hn.yaml"
    config.write_text(yaml.safe_dump(hn_config(tmp_path, path, image_folder, layer_structure="1, 1.5, 1")))
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output
    pt = tmp_path / "runs" / "style" / "output" / "style.pt"
    assert pt.is_file() and f"output: {pt}\n" in result.output  # one whole line
    data = torch.load(pt, weights_only=True)
    assert data["layer_structure"] == [1.0, 1.5, 1.0] and data[16][0]["linear.0.weight"].shape == (24, 16)
    assert (tmp_path / "runs" / "style" / "samples" / "step-3" / "grid.png").is_file()  # previews ran

    out = tmp_path / "images"
    args = ["generate", "a red square", "--model", str(path), "--steps", "2", "--out", str(out)]
    result = runner.invoke(app, [*args, "--hypernetwork", f"{pt}:0.5"])
    assert result.exit_code == 0, result.output
    assert "strength 0.5" in result.output and (out / "0000.png").is_file()
    with pytest.raises(SdtuneError, match=r"--hypernetwork: no such file"):
        runner.invoke(app, [*args, "--hypernetwork", str(tmp_path / "nope.pt")], catch_exceptions=False)


# --- config: one-line errors naming the field and the fix ------------------------------------------------


def _config_error(tmp_path, **extra) -> str:
    """The one-line message without the file name in front."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(hn_config(tmp_path, "builtin", tmp_path, **extra)))
    with pytest.raises(ConfigError) as exc:
        load_train_config(path)
    assert "\n" not in str(exc.value)
    return str(exc.value).removeprefix(f"{path}: ")


@pytest.mark.parametrize("value", ["2, 1", [2, 1]])
def test_layer_structure_must_start_and_end_with_one(tmp_path, value):
    assert _config_error(tmp_path, layer_structure=value) == (
        "layer_structure: must start and end with 1 (got [2, 1]); e.g. [1, 2, 1]"
    )


def test_dropout_settings_are_checked(tmp_path):
    assert "set dropout: true" in _config_error(tmp_path, dropout_structure=[0, 0.1, 0])
    message = _config_error(tmp_path, dropout=True, dropout_structure=[0, 0.1])
    assert message.startswith("dropout_structure: needs 3 probabilities in [0, 1), first and last 0")
    assert "last_layer_dropout: true" in _config_error(tmp_path, dropout=True)
    assert "activation: must be one of" in _config_error(tmp_path, activation="softmax")


def test_defaults_follow_a1111(tmp_path):
    raw = hn_config(tmp_path, "builtin", tmp_path)
    del raw["optimizer"]
    cfg = HypernetworkConfig.model_validate(raw)
    assert cfg.layer_structure == [1, 2, 1] and cfg.activation == "linear" and cfg.weight_init == "Normal"
    assert cfg.optimizer.lr == 1e-5 and not cfg.layer_norm and not cfg.dropout and not cfg.activate_output
    assert set(typing.get_args(HypernetworkActivation)) == set(ACTIVATIONS)  # config and adapter agree
    cfg = HypernetworkConfig.model_validate(
        hn_config(tmp_path, "builtin", tmp_path, optimizer={"lr": "1e-5:100, 1e-6"})
    )
    assert cfg.optimizer.lr == "1e-5:100, 1e-6"  # A1111's rate:step strings


def test_sizes_the_model_lacks(tmp_path, tiny_checkpoint, image_folder):
    cfg = HypernetworkConfig.model_validate(hn_config(tmp_path, tiny_checkpoint("sd1"), image_folder, sizes=[768]))
    with pytest.raises(ConfigError, match=r"sizes: no attention layer of this model takes a context of width 768"):
        setup(cfg, Accelerator(cpu=True))
    # the self-attention widths work too (A1111's 320/640/1280 "Modules")
    cfg = HypernetworkConfig.model_validate(hn_config(tmp_path, tiny_checkpoint("sd1"), image_folder, sizes=[16, 8]))
    job = setup(cfg, Accelerator(cpu=True))
    assert job.hypernetwork.sizes == [8, 16] and any(".attn1.to_k" in n for n in job.installed.layers)
