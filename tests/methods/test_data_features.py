"""Data features through the real recipes: validation loss, loss masks and the disk caches (TI and LoRA)."""

from __future__ import annotations

import json

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from test_lora import lora_config
from test_lora import run_job as run_lora
from test_textual_inversion import run_job as run_ti
from test_textual_inversion import ti_config

from sdtune.data.splits import split_of
from sdtune.methods.lora import setup as lora_setup


def _seed_splitting(names, fraction):
    """A split seed that puts some, not all, of ``names`` into validation."""
    return next(s for s in range(100) if 0 < sum(split_of(n, s, fraction) == "validation" for n in names) < len(names))


def test_ti_validation_loss_is_repeatable_and_logged(tmp_path, tiny_checkpoint, image_folder):
    seed = _seed_splitting([f"{i}.png" for i in range(4)], 0.5)
    data = {"validation_split": 0.5, "split_seed": seed, "batch_size": 1}
    cfg = ti_config(tmp_path, tiny_checkpoint("sd1"), image_folder, data=data, train={"validation_every_n_steps": 2})
    job, _ = run_ti(cfg)
    val = {p.name for p in job.validation.paths}
    assert val and val.isdisjoint(p.name for p in job.data.paths)
    first, second = job.validation_loss(), job.validation_loss()
    assert first == second and np.isfinite(first)
    with torch.no_grad():
        job.tables[0].extra.add_(torch.randn_like(job.tables[0].extra))
    assert job.validation_loss() != first  # it measures these weights
    rows = [json.loads(line) for line in (tmp_path / "runs" / "ti" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "validation_loss" in r] == [2, 4, 6]


def test_lora_masks_caches_and_deterministic_validation_with_dropout(tmp_path, tiny_checkpoint, image_folder):
    (image_folder / "masks").mkdir()
    mask = np.zeros((40, 40), np.uint8)
    mask[:, :20] = 255
    Image.fromarray(mask).save(image_folder / "masks" / "0.png")
    seed = _seed_splitting([f"{i}.png" for i in range(4)], 0.5)
    data = {"path": str(image_folder), "batch_size": 2, "cache_dir": str(tmp_path / "cache")}
    data |= {"validation_split": 0.5, "split_seed": seed}
    cfg = lora_config(tmp_path, tiny_checkpoint("sd1"), image_folder, data=data, dropout=0.5)
    job, _ = run_lora(cfg)
    holder = job.data if any(p.name == "0.png" for p in job.data.paths) else job.validation
    row = holder.image_index[[p.name for p in holder.paths].index("0.png")]
    weights, half = holder.weights[row, 0], holder.weights.shape[-1] // 2
    assert weights[:, :half].min() == 1 and weights[:, half:].max() == 0  # masks/0.png: left half trains
    assert job.validation_loss() == job.validation_loss()  # adapter dropout is off while validating
    encoded_text = job.text_cache.encoded
    assert encoded_text > 0
    again = lora_setup(cfg, Accelerator(cpu=True))  # a second run on the same data: nothing encoded
    assert again.data.cache.encoded_count == 0 and again.validation.cache.encoded_count == 0
    again.loss([0, 1], [torch.Generator().manual_seed(i) for i in range(2)])
    again.validation_loss()
    assert again.text_cache.encoded == 0
