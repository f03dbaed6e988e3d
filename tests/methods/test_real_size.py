"""Real size: an SD 1.5 of the real architecture (860M-parameter UNet; random weights, nothing downloaded) saved as
the fp16 single file users have, loaded through the normal path and trained one LoRA step in bf16 at 64 px."""

from __future__ import annotations

import pytest
import torch
import yaml

from image_folders import write_image_folder
from sdtune.config import load_train_config
from sdtune.core.events import EventBus
from sdtune.methods import setup_function as method_setup  # (pytest reserves the name setup_function)
from sdtune.train.loop import train
from sdtune.train.rundir import RunDir


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    """The random real-size SD 1.5 as one fp16 ``.safetensors`` (built once per test run: ~2.1 GB on disk)."""
    from sdtune.models.loading import save_model
    from sdtune.models.tiny import build_real_size

    path = tmp_path_factory.mktemp("sd15") / "sd15-random.safetensors"
    save_model(build_real_size("sd1"), path, dtype=torch.float16)
    yield path
    path.unlink(missing_ok=True)  # 2.1 GB: not left for pytest's retention of earlier runs' temporary folders


@pytest.mark.slow
def test_real_size_lora_step_in_bf16_keeps_frozen_weights_bf16_and_trains_fp32(tmp_path, sd15_file, bf16_accelerator):
    data = write_image_folder(tmp_path / "images", size=64, count=2)
    raw = {
        "method": "lora",
        "name": "real",
        "output_dir": str(tmp_path / "runs"),
        "rank": 4,
        "model": {"base": str(sd15_file)},
        "data": {"path": str(data), "batch_size": 1, "resolution": 64},
        "optimizer": {"lr": 1e-3},
        "train": {"max_steps": 1, "mixed_precision": "bf16", "gradient_checkpointing": True},
        "preview": {"steps": 1, "before_training": False, "cfg_scale": 1.0},
    }
    (tmp_path / "real.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    cfg = load_train_config(tmp_path / "real.yaml")
    accelerator = bf16_accelerator
    job = method_setup("lora")(cfg, accelerator)

    unet = job.model.unet
    assert sum(p.numel() for p in unet.parameters() if not p.requires_grad) > 850_000_000  # the real SD 1.5 UNet
    trainable = [p for group in job.trainable_parameters() for p in group["params"]]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    ids = {id(p) for p in trainable}
    frozen = [(n, p) for n, m in job.model.modules().items() for k, p in m.named_parameters() if id(p) not in ids]
    wrong = [n for n, p in frozen if p.is_floating_point() and p.dtype != torch.bfloat16]
    assert not wrong, f"{len(wrong)} frozen tensors are not bf16 (in {sorted(set(wrong))})"
    before = [p.detach().clone() for p in trainable]

    train(job, cfg, RunDir(f"{cfg.output_dir}/{cfg.name}"), EventBus(), accelerator)

    losses = [row["loss"] for row in RunDir(f"{cfg.output_dir}/{cfg.name}").metrics() if "loss" in row]
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses[0]))
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, trainable, strict=True)]
    assert any(changed), "the adapter is unchanged"
