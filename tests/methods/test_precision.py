"""``train.mixed_precision: bf16`` stores the frozen base in bf16 and keeps fp32 master weights for what trains;
full-weight methods keep their weights in fp32. Checked on tiny models through each method's public setup."""

from __future__ import annotations

import pytest
import torch
import yaml
from tests.methods.method_cases import case_config

from sdtune.config import load_train_config
from sdtune.core.events import EventBus
from sdtune.methods import setup_function as method_setup  # (pytest reserves the name setup_function)
from sdtune.train.loop import train
from sdtune.train.recipe import storage_dtypes
from sdtune.train.rundir import RunDir

PRECISION_CASES = ["lora", "loha", "lokr", "oft", "boft", "lora_text_encoder", "textual_inversion", "hypernetwork"]


def _config(tmp_path, base, folder, case: str, **train):
    return case_config(tmp_path, base, folder, case, **({"mixed_precision": "bf16"} | train))


def _trainables(job) -> list[torch.Tensor]:
    return [p for group in job.trainable_parameters() for p in group["params"]]


# every case on sd1; sdxl (two text encoders, size conditioning) on the LoRA, text-encoder and embedding paths
RUNS = [(case, "sd1") for case in PRECISION_CASES] + [
    (c, "sdxl") for c in ("lora", "lora_text_encoder", "textual_inversion")
]


@pytest.mark.parametrize(("case", "family"), RUNS)
def test_bf16_run_stores_frozen_weights_in_bf16_and_trains_fp32_masters(
    tmp_path, tiny_checkpoint, image_folder, case, family, bf16_accelerator
):
    cfg = _config(tmp_path, tiny_checkpoint(family), image_folder, case)
    accelerator = bf16_accelerator
    job = method_setup(cfg.method)(cfg, accelerator)
    trainable = _trainables(job)
    assert trainable and all(p.dtype == torch.float32 for p in trainable), "trainables must be fp32 masters"
    ids = {id(p) for p in trainable}
    frozen = [
        (f"{name}.{key}", p)
        for name, module in job.model.modules().items()
        for key, p in module.named_parameters()
        if id(p) not in ids and not p.requires_grad
    ]
    assert frozen
    wrong = [key for key, p in frozen if p.is_floating_point() and p.dtype != torch.bfloat16]
    assert not wrong, f"frozen tensors not in bf16: {wrong[:5]}"
    before = [p.detach().clone() for p in trainable]

    outputs = train(job, cfg, RunDir(f"{cfg.output_dir}/{cfg.name}"), EventBus(), accelerator)

    losses = [row["loss"] for row in RunDir(f"{cfg.output_dir}/{cfg.name}").metrics() if "loss" in row]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, trainable, strict=True)), "nothing trained"
    assert all(p.dtype == torch.float32 for p in _trainables(job))
    assert outputs and all(path.exists() for path in outputs)  # export (and the end-of-run preview) ran in bf16


def test_full_weight_methods_and_vae_precision(tmp_path):
    """DreamBooth and the fine-tune export their frozen parts: every component stays fp32 there; the VAE follows
    ``model.vae_precision`` and stays fp32 in fp16 runs (SDXL's VAE overflows in fp16)."""
    cfg = load_train_config_dict(tmp_path, {"method": "lora", "name": "x", "data": {"path": str(tmp_path)}})
    assert set(storage_dtypes(cfg, "bf16").values()) == {torch.bfloat16}
    fp16 = storage_dtypes(cfg, "fp16")
    assert fp16["unet"] == fp16["text_encoder_2"] == torch.float16 and fp16["vae"] == torch.float32
    assert set(storage_dtypes(cfg, "no").values()) == {torch.float32}
    assert set(storage_dtypes(cfg, "bf16", reduced=False).values()) == {torch.float32}
    told = load_train_config_dict(
        tmp_path, {"method": "lora", "name": "y", "data": {"path": str(tmp_path)}, "model": {"vae_precision": "bf16"}}
    )
    assert storage_dtypes(told, "fp16")["vae"] == torch.bfloat16


def load_train_config_dict(tmp_path, raw: dict):
    path = tmp_path / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return load_train_config(path)


def test_dreambooth_in_bf16_keeps_its_trained_unet_in_fp32(tmp_path, tiny_checkpoint, image_folder, bf16_accelerator):
    raw = {
        "method": "dreambooth",
        "name": "db",
        "output_dir": str(tmp_path / "runs"),
        "model": {"base": str(tiny_checkpoint("sd1"))},
        "instance_token": "sks",
        "instance_prompt": "a photo of sks thing",
        "prior_preservation": False,
        "data": {"path": str(image_folder), "batch_size": 2},
        "optimizer": {"lr": 1e-4},
        "train": {"max_steps": 1, "mixed_precision": "bf16"},
        "preview": {"steps": 2, "before_training": False},
    }
    cfg = load_train_config_dict(tmp_path, raw)
    accelerator = bf16_accelerator
    job = method_setup("dreambooth")(cfg, accelerator)
    assert {p.dtype for m in job.model.modules().values() for p in m.parameters()} == {torch.float32}
    train(job, cfg, RunDir(f"{cfg.output_dir}/{cfg.name}"), EventBus(), accelerator)
    losses = [row["loss"] for row in RunDir(f"{cfg.output_dir}/{cfg.name}").metrics() if "loss" in row]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
