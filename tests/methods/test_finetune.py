"""Full fine-tunes on tiny SD1 models: exports diffusers loads with the weights users get, EMA that is computed as
diffusers defines it, exported and checkpointed, an exact resume, trained-only exports, and bad settings."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune.config import FinetuneConfig
from sdtune.core.errors import TrainingError
from sdtune.core.events import EventBus, StepEnd
from sdtune.methods.finetune import setup
from sdtune.models.loading import load_model
from sdtune.models.shipped import materialize_config_dir
from sdtune.train.loop import train
from sdtune.train.rundir import RunDir


def ft_config(tmp_path, model, folder, **extra) -> FinetuneConfig:
    base = {
        "method": "finetune",
        "name": "ft",
        "output_dir": str(tmp_path / "runs"),
        "model": {"base": str(model)},
        "data": {"path": str(folder), "batch_size": 2},
        "optimizer": {"lr": 1e-3},
        "train": {"max_steps": 3},
        "save": {"dtype": "fp32"},
        "preview": {"steps": 2, "before_training": False},
    }
    return FinetuneConfig.model_validate(base | extra)


def run_job(cfg, bus: EventBus | None = None):
    job = setup(cfg, Accelerator(cpu=True))
    outputs = train(job, cfg, RunDir(f"{cfg.output_dir}/{cfg.name}"), bus or EventBus(), Accelerator(cpu=True))
    return job, outputs


def _dtypes(path) -> set[str]:
    with safe_open(str(path), "pt") as fh:
        return {fh.get_slice(k).get_dtype() for k in fh.keys()}


@pytest.mark.parametrize(
    ("family", "dtype", "ema", "train_text_encoder"),
    [("sd1", "fp32", False, True), ("sd1", "fp16", True, False), ("sdxl", "fp32", True, True)],
)
def test_exported_pipeline_loads_in_diffusers_with_the_weights_users_get(
    tmp_path, tiny_checkpoint, image_folder, diffusers_pipelines, unet_output, family, dtype, ema, train_text_encoder
):
    path = tiny_checkpoint(family)
    extra = {"save": {"dtype": dtype}, "ema": ema, "ema_decay": 0.9, "train_text_encoder": train_text_encoder}
    job, outputs = run_job(ft_config(tmp_path, path, image_folder, **extra))
    folder, file = outputs
    assert (folder.name, file.name) == ("ft", "ft.safetensors")
    assert _dtypes(file) == {"F16" if dtype == "fp16" else "F32"}
    with job.averaged():  # what users get: the EMA weights when EMA is on
        exported = unet_output(job.model.unet)
    tolerance = {"atol": 1e-2, "rtol": 1e-2} if dtype == "fp16" else {"atol": 1e-6, "rtol": 1e-5}
    for pipe in diffusers_pipelines(folder, file, job.model):
        torch.testing.assert_close(unet_output(pipe.unet), exported, **tolerance)
    raw = unet_output(job.model.unet)
    assert ((exported - raw).abs().max() > 1e-3) == ema  # with EMA, the export is not the last step's weights
    assert (raw - unet_output(load_model(path).unet)).abs().max() > 1e-3  # the UNet trained


def test_ema_follows_diffusers_schedule_is_checkpointed_and_exported(tmp_path, tiny_checkpoint, image_folder):
    decay = 0.9
    cfg = ft_config(
        tmp_path, tiny_checkpoint("sd1"), image_folder, ema=True, ema_decay=decay, save={"every_n_steps": 1}
    )
    job, outputs = run_job(cfg)
    run = RunDir(tmp_path / "runs" / "ft")
    states = [load_file(run.checkpoints / f"step-{s}" / "trainable.safetensors") for s in (1, 2, 3)]
    key = "unet.conv_in.weight"
    # EMAModel: the first update copies; then decay_t = min(decay, (1 + t') / (10 + t')) with t' = t - 1
    expected = states[0][key]
    for t, state in ((2, states[1]), (3, states[2])):
        d = min(decay, t / (9 + t))
        expected = d * expected + (1 - d) * state[key]
    torch.testing.assert_close(states[2]["ema." + key], expected)
    assert int(states[2]["ema.step"][0]) == 3
    assert (states[2]["ema." + key] - states[2][key]).abs().max() > 1e-5  # the average is not the raw weights

    exported = load_model(outputs[1]).unet.state_dict()  # the single file holds the EMA weights
    for name, value in exported.items():
        torch.testing.assert_close(value, states[2]["ema.unet." + name], atol=0, rtol=0, msg=name)
    live = dict(job.model.unet.named_parameters())  # and the model keeps training on the raw ones
    torch.testing.assert_close(live["conv_in.weight"].detach(), states[2][key], atol=0, rtol=0)


def test_stopped_then_resumed_run_equals_uninterrupted_run_ema_included(tmp_path, tiny_checkpoint, image_folder):
    path = tiny_checkpoint("sd1")
    extra = {"ema": True, "ema_decay": 0.9, "train": {"max_steps": 4}}
    run_job(ft_config(tmp_path, path, image_folder, name="whole", **extra))

    cfg = ft_config(tmp_path, path, image_folder, name="stopped", **extra)
    run = RunDir(tmp_path / "runs" / "stopped")
    bus = EventBus()
    bus.subscribe(lambda e: run.request_stop() if isinstance(e, StepEnd) and e.step == 2 else None)
    run_job(cfg, bus)  # stops gracefully after step 2 with a checkpoint
    assert [c.step for c in run.list_checkpoints()] == [2]
    run_job(cfg)  # a fresh job resumes from step 2: weights, optimizer and the EMA (with its step count)

    whole = load_file(tmp_path / "runs" / "whole" / "checkpoints" / "step-4" / "trainable.safetensors")
    resumed = load_file(run.checkpoints / "step-4" / "trainable.safetensors")
    assert whole.keys() == resumed.keys() and any(k.startswith("ema.unet.") for k in whole)
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key  # bit-exact
    exported_whole = load_file(tmp_path / "runs" / "whole" / "output" / "whole.safetensors")
    exported_resumed = load_file(run.output / "stopped.safetensors")
    assert exported_whole.keys() == exported_resumed.keys()
    assert all(torch.equal(v, exported_resumed[k]) for k, v in exported_whole.items())


def test_validation_loss_is_logged_with_the_weights_users_get(tmp_path, tiny_checkpoint, image_folder):
    data = {"path": str(image_folder), "batch_size": 2, "validation_path": str(image_folder)}
    extra = {"ema": True, "ema_decay": 0.9, "data": data, "train": {"max_steps": 2, "validation_every_n_steps": 1}}
    job, _ = run_job(ft_config(tmp_path, tiny_checkpoint("sd1"), image_folder, **extra))
    rows = RunDir(tmp_path / "runs" / "ft").metrics()
    assert [r["step"] for r in rows if "validation_loss" in r] == [1, 2]
    with_ema = job.validation_loss()
    assert rows[-1]["validation_loss"] == pytest.approx(with_ema, rel=1e-6)  # fixed noise: the same value again
    job.ema, ema = None, job.ema
    assert abs(job.validation_loss() - with_ema) > 1e-4  # it measured the EMA weights, not the raw ones
    job.ema = ema


def test_trained_only_export_writes_just_the_trained_components(tmp_path, tiny_checkpoint, image_folder, unet_output):
    cfg = ft_config(tmp_path, tiny_checkpoint("sd1"), image_folder, export="trained", save={"dtype": "bf16"})
    job, (folder, file) = run_job(cfg)
    assert sorted(p.name for p in folder.iterdir()) == ["unet"]  # no model_index.json, no VAE or text encoder
    with safe_open(str(file), "pt") as fh:
        assert all(k.startswith("model.diffusion_model.") for k in fh.keys())
        assert fh.metadata()["sdtune.components"] == "unet"
    assert _dtypes(file) == {"BF16"}
    trained = unet_output(job.model.unet)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    torch.testing.assert_close(unet_output(unet), trained, atol=5e-2, rtol=5e-2)
    config = materialize_config_dir(job.model.family, tmp_path / "config", configs=job.model.configs())
    unet = UNet2DConditionModel.from_single_file(str(file), config=str(config), subfolder="unet", local_files_only=True)
    torch.testing.assert_close(unet_output(unet), trained, atol=5e-2, rtol=5e-2)


def test_gradient_checkpointing_trains_the_same_weights(tmp_path, tiny_checkpoint, image_folder):
    path = tiny_checkpoint("sd1")
    extra = {"train_text_encoder": True, "train": {"max_steps": 2}}
    plain, _ = run_job(ft_config(tmp_path, path, image_folder, name="plain", **extra))
    extra["train"]["gradient_checkpointing"] = True
    checkpointed, _ = run_job(ft_config(tmp_path, path, image_folder, name="ckpt", **extra))
    assert checkpointed.model.unet.is_gradient_checkpointing and not plain.model.unet.is_gradient_checkpointing
    encoder = checkpointed.model.text_encoders[0]
    assert any(getattr(m, "gradient_checkpointing", False) for m in encoder.modules())
    a, b = plain.state_dict(), checkpointed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


def test_optimizers_come_from_the_shared_table(tmp_path, tiny_checkpoint, image_folder, monkeypatch):
    path = tiny_checkpoint("sd1")
    job, _ = run_job(
        ft_config(tmp_path, path, image_folder, name="adafactor", optimizer={"name": "adafactor", "lr": 1e-3})
    )
    base = load_model(path).unet.state_dict()
    assert not torch.equal(job.model.unet.state_dict()["conv_in.weight"], base["conv_in.weight"])

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    cfg = ft_config(tmp_path, path, image_folder, name="8bit", optimizer={"name": "adamw8bit"})
    with pytest.raises(TrainingError, match="optimizer.name: adamw8bit needs the 'bitsandbytes' package; pip install"):
        run_job(cfg)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"train_unet": False}, "train_unet: nothing to train; enable train_unet or train_text_encoder"),
        ({"optimizer": {"lr": "1e-4:10, 1e-5"}, "text_encoder_lr": 1e-5}, "optimizer.lr: a rate:step schedule"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"export": "unet"}, "export"),
    ],
)
def test_bad_finetune_settings_are_config_errors(tmp_path, extra, message):
    with pytest.raises(ValidationError, match=message):
        ft_config(tmp_path, "m.safetensors", "d", **extra)


def test_fused_backward_trains_the_same_weights_without_holding_the_gradients(tmp_path, tiny_checkpoint, image_folder):
    """kohya's fused backward pass: each weight steps inside the backward pass; the result equals the plain run's."""
    path = tiny_checkpoint("sd1")
    plain, _ = run_job(ft_config(tmp_path / "a", path, image_folder, train_text_encoder=True))
    fused_cfg = ft_config(
        tmp_path / "b", path, image_folder, train_text_encoder=True, train={"max_steps": 3, "fused_backward": True}
    )
    live = []
    fused_job = setup(fused_cfg, Accelerator(cpu=True))
    params = [p for g in fused_job.trainable_parameters() for p in g["params"]]
    probe = params[len(params) // 2]  # while the backward pass reaches the middle, count gradients held
    probe.register_hook(lambda grad: live.append(sum(p.grad is not None for p in params)))
    train(fused_job, fused_cfg, RunDir(f"{fused_cfg.output_dir}/{fused_cfg.name}"), EventBus(), Accelerator(cpu=True))
    assert live and max(live) <= 1  # never the whole network's gradients at once (plain: all of them by the end)
    for name in ("unet", "text_encoder"):
        a, b = plain.model.modules()[name].state_dict(), fused_job.model.modules()[name].state_dict()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")
