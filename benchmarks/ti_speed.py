"""Textual-inversion speed on the built-in model: sdtune vs the diffusers example's approach.

    python benchmarks/ti_speed.py [--batch 4 16] [--steps 40] [--warmup 5]

Three contenders, same model (built-in), data (the 20 teal-heart images, 64 px), batch, steps, one token with
2 vectors, AdamW lr 5e-3:
  sdtune           the real training loop (`train.loop.train`), latents cached once, only the new rows trained
  sdtune-nocache   the same with `data.cache_latents: false` (VAE encode every step)
  diffusers-way    what diffusers' examples/textual_inversion/textual_inversion.py does per step (see
                   shared/reference/diffusers-examples-cpu.md): decode + resize + flip every PNG again, VAE-encode
                   the batch, AdamW over the whole token table, copy back every row but the new ones
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
from PIL import Image

from sdtune.config import TextualInversionConfig
from sdtune.core.events import EventBus, StepEnd
from sdtune.methods.textual_inversion import setup
from sdtune.models.loading import load_model
from sdtune.tools.demo import TOKEN, write_dataset
from sdtune.train.loop import train
from sdtune.train.rundir import RunDir


def sdtune_rate(data: Path, work: Path, batch: int, steps: int, warmup: int, cache: bool) -> float:
    cfg = TextualInversionConfig.model_validate(
        {
            "method": "textual_inversion",
            "name": f"b{batch}{cache}",
            "output_dir": str(work),
            "token": TOKEN,
            "num_vectors": 2,
            "init_text": "heart",
            "data": {
                "path": str(data),
                "template": str(data.parent / "template.txt"),
                "batch_size": batch,
                "cache_latents": cache,
            },
            "optimizer": {"lr": 5e-3},
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


def diffusers_way_rate(data: Path, batch: int, steps: int, warmup: int) -> float:
    model = load_model("builtin")
    tokenizer, te, vae, unet = model.tokenizers[0], model.text_encoders[0], model.vae, model.unet
    tokenizer.add_tokens([TOKEN, f"{TOKEN}_1"])
    te.resize_token_embeddings(len(tokenizer))
    table = te.get_input_embeddings().weight
    new_ids = tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    with torch.no_grad():
        table[new_ids] = table[tokenizer("heart", add_special_tokens=False).input_ids[0]].clone()
    for module in (vae, unet, te):
        module.requires_grad_(False)
    table.requires_grad_(True)
    optimizer = torch.optim.AdamW([table], lr=5e-3, weight_decay=1e-2)
    original = table.detach().clone()
    keep = torch.ones(len(tokenizer), dtype=torch.bool)
    keep[min(new_ids) : max(new_ids) + 1] = False
    scheduler = model.noise_scheduler()
    files = sorted(data.glob("*.png"))
    captions = {p: p.with_suffix(".txt").read_text() for p in files}
    size = 64
    times = []
    for _ in range(warmup + steps):
        picked = random.choices(files, k=batch)
        pixels = []
        for path in picked:  # the example's Dataset: decode, resize, flip, normalise every time
            img = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            if random.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pixels.append(torch.from_numpy(np.asarray(img, np.float32) / 127.5 - 1).permute(2, 0, 1))
        prompts = [f"a {TOKEN} {TOKEN}_1 on {captions[p]}" for p in picked]
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        latents = vae.encode(torch.stack(pixels)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        pred = unet(scheduler.add_noise(latents, noise, t), t, te(ids)[0]).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # "make sure we don't update any embedding weights besides the newly added token"
            table[keep] = original[keep]
        times.append(time.perf_counter())
    return steps / (times[-1] - times[warmup - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| batch | sdtune steps/s | sdtune-nocache steps/s | diffusers-way steps/s | sdtune / diffusers-way |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_dataset(root / "data", 20, 0)
        for batch in args.batch:
            fast = sdtune_rate(data, root / "runs", batch, args.steps, args.warmup, cache=True)
            slow = sdtune_rate(data, root / "runs", batch, args.steps, args.warmup, cache=False)
            ref = diffusers_way_rate(data, batch, args.steps, args.warmup)
            print(f"| {batch} | {fast:.2f} | {slow:.2f} | {ref:.2f} | {fast / ref:.2f}x |")


if __name__ == "__main__":
    main()
