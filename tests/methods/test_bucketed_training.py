"""Aspect-ratio buckets and regularisation weights through the real recipes (LoRA, DreamBooth, TI)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from test_lora import lora_config
from test_lora import run_job as run_lora
from test_textual_inversion import ti_config

from sdtune.config import DreamBoothConfig
from sdtune.core.errors import DataError
from sdtune.core.events import EventBus
from sdtune.data.buckets import BucketOptions, grid_aspect_error, make_buckets
from sdtune.methods.dreambooth import setup as dreambooth_setup
from sdtune.methods.lora import setup as lora_setup
from sdtune.methods.textual_inversion import setup as ti_setup
from sdtune.train.loop import train
from sdtune.train.rundir import RunDir

SIZES = {"sq": (40, 40), "wide": (80, 40), "tall": (40, 80)}


@pytest.fixture
def mixed_folder(tmp_path):
    """Two images each of a square, a 2:1 and a 1:2 shape, with captions."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in SIZES.items():
        for i in range(2):
            pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}{i}.png")
            (folder / f"{name}{i}.txt").write_text(f"a {name} picture")
    return folder


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_bucketed_lora_run_batches_one_bucket_at_a_time(tmp_path, tiny_checkpoint, mixed_folder, family):
    data = {"path": str(mixed_folder), "batch_size": 2, "buckets": True, "bucket_step": 8}
    cfg = lora_config(tmp_path, tiny_checkpoint(family), mixed_folder, data=data, train={"max_steps": 6})
    seen: list[tuple[int, ...]] = []
    job = lora_setup(cfg, Accelerator(cpu=True))
    real_loss = job.loss

    def loss(indices, generators):
        shapes = {tuple(job.data.latents([i], [g]).shape[-2:]) for i, g in zip(indices, generators, strict=True)}
        assert len(shapes) == 1, f"a batch mixed sizes {shapes}"
        seen.append(shapes.pop())
        return real_loss(indices, generators)

    job.loss = loss
    outputs = train(job, cfg, RunDir(f"{cfg.output_dir}/{cfg.name}"), EventBus(), Accelerator(cpu=True))
    resolution = job.resolution
    histogram = job.data.bucket_histogram()
    bound = grid_aspect_error(make_buckets(BucketOptions(resolution, 8)))
    assert sum(histogram.values()) == 6 and len(histogram) == 3
    for path, (group, _) in zip(job.data.paths, [job.data.image_rows[j] for j in job.data.image_index], strict=True):
        w, h = job.data.groups[group].size
        iw, ih = SIZES[path.stem[:-1]]
        assert w * h <= resolution**2 and w % 8 == 0 and h % 8 == 0
        assert abs(math.log((w / h) / (iw / ih))) <= bound  # within the grid's stated aspect-error bound
    # 6 steps of batch 2 over 3 buckets of 2 images: two epochs, each bucket once per epoch
    factor = 2 ** (len(job.model.vae.config.block_out_channels) - 1)
    assert sorted(seen) == sorted([(h // factor, w // factor) for (w, h) in histogram] * 2)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "concept" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(np.isfinite(r["loss"]) for r in rows)
    events = (tmp_path / "runs" / "concept" / "events.log").read_text()
    assert "buckets (images per size): " in events
    assert any(p.suffix == ".safetensors" for p in outputs)


def test_buckets_keep_masks_on_the_cropped_grid(tmp_path, tiny_checkpoint, mixed_folder):
    (mixed_folder / "masks").mkdir()
    mask = np.zeros((40, 80), np.uint8)
    mask[:, :40] = 255  # left half of the wide image trains
    Image.fromarray(mask).save(mixed_folder / "masks" / "wide0.png")
    data = {"path": str(mixed_folder), "batch_size": 1, "buckets": True, "bucket_step": 8}
    cfg = lora_config(tmp_path, tiny_checkpoint("sd1"), mixed_folder, data=data, train={"max_steps": 1})
    job, _ = run_lora(cfg)
    k = [p.name for p in job.data.paths].index("wide0.png")
    batch = job.data.batch([k], _gens(1))
    assert batch.mask is not None and batch.mask.shape[-2:] == batch.latents.shape[-2:]
    half = batch.mask.shape[-1] // 2
    columns = batch.mask[0, 0].mean(dim=0)
    # the left half is in and the right half out (mirrored if this draw flipped it): never both halves alike
    assert {float(columns[:half].mean()), float(columns[half:].mean())} == {0.0, 1.0}


def test_prior_preservation_with_non_square_buckets_is_a_one_line_error(tmp_path, tiny_checkpoint, mixed_folder):
    cfg = DreamBoothConfig.model_validate(
        {
            "method": "dreambooth",
            "name": "db",
            "output_dir": str(tmp_path / "runs"),
            "instance_token": "sks",
            "instance_prompt": "a sks picture",
            "class_prompt": "a picture",
            "num_class_images": 2,
            "model": {"base": str(tiny_checkpoint("sd1"))},
            "data": {"path": str(mixed_folder), "batch_size": 2, "buckets": True, "bucket_step": 8},
            "train": {"max_steps": 1},
            "preview": {"before_training": False},
        }
    )
    with pytest.raises(DataError, match=r"data\.buckets: prior preservation pairs every instance image") as info:
        dreambooth_setup(cfg, Accelerator(cpu=True))
    assert "\n" not in str(info.value) and "set data.buckets: false" in str(info.value)


def test_regularisation_images_weigh_reg_weight_in_the_loss(tmp_path, tiny_checkpoint, mixed_folder):
    manifest = tmp_path / "d.jsonl"
    lines = [{"image": str(mixed_folder / f"sq{i}.png"), "caption": "a sq picture", "is_reg": i == 1} for i in (0, 1)]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")

    def job_with(weight: float):
        data = {"path": str(manifest), "batch_size": 1, "reg_weight": weight, "template": "subject"}
        return ti_setup(ti_config(tmp_path, tiny_checkpoint("sd1"), mixed_folder, data=data), Accelerator(cpu=True))

    one, zero, two = job_with(1.0), job_with(0.0), job_with(2.5)
    reg = one.data.is_reg.index(True)
    plain = 1 - reg
    with torch.no_grad():
        base = float(one.loss([reg], _gens(1)))
        assert base > 0
        assert float(zero.loss([reg], _gens(1))) == 0.0  # weight 0: reg images do not train
        assert float(two.loss([reg], _gens(1))) == pytest.approx(2.5 * base, rel=1e-5)
        assert float(two.loss([plain], _gens(1, 7))) == pytest.approx(float(one.loss([plain], _gens(1, 7))), rel=1e-6)
