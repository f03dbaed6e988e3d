"""LoRA speed on the built-in model: sdtune vs the diffusers `train_text_to_image_lora.py` example's approach.

    python benchmarks/lora_speed.py [--batch 4 16] [--steps 40] [--warmup 5] [--rank 4]

Same model (built-in), data (20 star images with captions, 64 px), batch, steps, LoRA rank on the attention
projections (`to_q/to_k/to_v/to_out.0`, the example's targets), AdamW lr 1e-4:
  sdtune           the real training loop (`train.loop.train`): latents and text-encoder outputs cached once
  sdtune-nocache   the same with `data.cache_latents: false` (VAE encode every step; text cache still on)
  diffusers-way    what the example does per step (see shared/reference/diffusers-examples-cpu.md): decode, resize
                   and flip every PNG again, VAE-encode the batch, run the text encoder, peft LoRA via
                   `unet.add_adapter`, gradient clipping, one `.item()` per step
Steps/s are timed after `warmup` steps. Run it alone: on 2 cores anything else running skews the numbers.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import LoraConfig as PeftLoraConfig
from PIL import Image

from sdtune.config import LoraConfig
from sdtune.core.events import EventBus, StepEnd
from sdtune.methods.lora import setup
from sdtune.models.loading import load_model
from sdtune.train.loop import train
from sdtune.train.rundir import RunDir
from sdtune.world import write_concept_dataset

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def sdtune_rate(data: Path, work: Path, batch: int, steps: int, warmup: int, rank: int, cache: bool) -> float:
    cfg = LoraConfig.model_validate(
        {
            "method": "lora",
            "name": f"b{batch}{cache}",
            "output_dir": str(work),
            "rank": rank,
            "target_modules": TARGETS,
            "data": {"path": str(data), "batch_size": batch, "cache_latents": cache, "flip": True},
            "optimizer": {"lr": 1e-4},
            "train": {"max_steps": warmup + steps},
            "preview": {"before_training": False},
        }
    )
    times: list[float] = []
    bus = EventBus()
    bus.subscribe(lambda e: times.append(time.perf_counter()) if isinstance(e, StepEnd) else None)
    job = setup(cfg, Accelerator(cpu=True))
    train(job, cfg, RunDir(work / cfg.name), bus, Accelerator(cpu=True))
    return steps / (times[warmup + steps - 1] - times[warmup - 1])


def diffusers_way_rate(data: Path, batch: int, steps: int, warmup: int, rank: int) -> float:
    model = load_model("builtin")
    tokenizer, te, vae, unet = model.tokenizers[0], model.text_encoders[0], model.vae, model.unet
    for module in (vae, unet, te):
        module.requires_grad_(False)
    unet.add_adapter(PeftLoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    scheduler = model.noise_scheduler()
    files = sorted(data.glob("*.png"))
    captions = {p: p.with_suffix(".txt").read_text().strip() for p in files}
    times = []
    for _ in range(warmup + steps):
        picked = random.choices(files, k=batch)
        pixels = []
        for path in picked:  # the example's transforms: decode, resize, centre crop, random flip, normalise
            img = Image.open(path).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)
            if random.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pixels.append(torch.from_numpy(np.asarray(img, np.float32) / 127.5 - 1).permute(2, 0, 1))
        ids = tokenizer(
            [captions[p] for p in picked], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        latents = vae.encode(torch.stack(pixels)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        pred = unet(scheduler.add_noise(latents, noise, t), t, te(ids, return_dict=False)[0]).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss.item()  # the example logs the loss every step
        times.append(time.perf_counter())
    return steps / (times[-1] - times[warmup - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, rank {args.rank}")
    print("| batch | sdtune steps/s | sdtune-nocache steps/s | diffusers-way steps/s | sdtune / diffusers-way |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_concept_dataset("star", root / "data", n=20, seed=0)
        data = root / "data"
        for batch in args.batch:
            fast = sdtune_rate(data, root / "runs", batch, args.steps, args.warmup, args.rank, cache=True)
            slow = sdtune_rate(data, root / "runs", batch, args.steps, args.warmup, args.rank, cache=False)
            ref = diffusers_way_rate(data, batch, args.steps, args.warmup, args.rank)
            print(f"| {batch} | {fast:.2f} | {slow:.2f} | {ref:.2f} | {fast / ref:.2f}x |")


if __name__ == "__main__":
    main()
