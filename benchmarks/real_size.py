"""Real-size memory and speed: sdtune's LoRA / TI step on a random-weight SD 1.5 (or SDXL) single file, beside the
floor (a bare script doing the same UNet step with a peft LoRA and nothing else).

    python benchmarks/real_size.py build [--family sd1] [--work /tmp/realsize]
    python benchmarks/real_size.py run   [--family sd1] [--work /tmp/realsize] [--steps 4] [--rows lora-bf16-gc ...]

``build`` writes the model the way users have it: the shipped configs at their real width with random weights
(``sdtune.models.tiny.build_real_size``), saved as one fp16 ``.safetensors`` in the original layout, plus four
512 px training images with captions. ``run`` starts every row as its own process under ``/usr/bin/time -v`` and
prints a table: seconds per step (mean of the steps after the first, from the run's ``metrics.jsonl`` or the
floor's own timer), peak RSS of the whole process, and launch to first step. Nothing else may run meanwhile:
2 cores are easily skewed.

Rows: ``lora-{fp32,bf16}[-gc]`` (sdtune, LoRA rank 16 on the attention projections, 512 px, batch 1, previews
off), ``ti-bf16-gc``, ``ft-bf16-gc[-fused]`` (the full fine-tune step, with ``train.fused_backward``), and
``floor-{fp32,bf16}[-gc]``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROWS = [
    "floor-fp32",
    "lora-fp32",
    "lora-fp32-gc",
    "floor-bf16",
    "lora-bf16",
    "floor-bf16-gc",
    "lora-bf16-gc",
    "lora-bf16-gc-fp8",
    "ti-bf16-gc",
    "ft-bf16-gc",
    "ft-bf16-gc-fused",
]


def build(work: Path, family: str) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from sdtune.models.loading import save_model
    from sdtune.models.tiny import build_real_size

    work.mkdir(parents=True, exist_ok=True)
    save_model(build_real_size(family), work / f"{family}-random.safetensors", dtype=torch.float16, overwrite=True)
    images = work / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a photo of thing {i}")
    print(f"wrote {work}")


def sdtune_config(work: Path, family: str, row: str, steps: int) -> Path:
    import yaml

    method, precision, *rest = row.split("-")
    raw = {
        "name": row,
        "output_dir": str(work / "runs"),
        "model": {"base": str(work / f"{family}-random.safetensors")},
        "data": {"path": str(work / "images"), "batch_size": 1, "resolution": 512},
        "train": {
            "max_steps": steps,
            "mixed_precision": "no" if precision == "fp32" else precision,
            "gradient_checkpointing": "gc" in rest,
        },
        "save": {"every_n_steps": 0},
        "preview": {"enabled": False},
    }
    raw["train"]["fused_backward"] = "fused" in rest
    if method == "ft":  # the SD 1.5 full fine-tune step (UNet only, AdamW)
        raw |= {"method": "finetune", "optimizer": {"lr": 1e-6}, "save": {"every_n_steps": 0}}
    elif method == "lora":
        raw |= {"method": "lora", "rank": 16, "targets": "attention", "optimizer": {"lr": 1e-4}}
        raw["fp8_base"] = "fp8" in rest
    else:
        raw |= {"method": "textual_inversion", "token": "<thing>", "init_text": "thing", "optimizer": {"lr": 5e-3}}
        raw["data"]["template"] = "subject_filewords"
    path = work / f"{row}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def floor(work: Path, family: str, precision: str, checkpointing: bool, steps: int) -> None:
    """The floor: diffusers' own single-file loader for the UNet alone, a peft LoRA on the same layers, random
    latents and text context of the real shapes, AdamW; nothing else."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model

    from sdtune.models.family import ModelFamily
    from sdtune.models.shipped import materialize_config_dir

    start = time.perf_counter()
    fam = ModelFamily.parse(family)
    config = materialize_config_dir(fam, work / "config")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    unet = UNet2DConditionModel.from_single_file(
        str(work / f"{family}-random.safetensors"), config=str(config), subfolder="unet", torch_dtype=dtype
    )
    unet.requires_grad_(False)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 64, 64, generator=g)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    extra = {}
    if fam.arch == "sdxl":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 1280), "time_ids": torch.tensor([[512.0] * 6])}}
    times = []
    for step in range(steps):
        tic = time.perf_counter()
        noise = torch.randn(latents.shape, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            pred = unet((latents + noise).to(dtype), torch.tensor([500]), context.to(dtype), **extra).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - tic)
        if step == 0:
            print(f"first_step_at {time.perf_counter() - start:.1f}", flush=True)
    print(json.dumps({"seconds_per_step": sum(times[1:]) / max(1, len(times) - 1)}), flush=True)


def run_row(work: Path, family: str, row: str, steps: int) -> dict:
    launched = time.perf_counter()
    if row.startswith("floor"):
        _, precision, *rest = row.split("-")
        cmd = [sys.executable, __file__, "floor", "--work", str(work), "--family", family, "--steps", str(steps)]
        cmd += ["--precision", precision] + (["--checkpointing"] if rest else [])
    else:
        cmd = [sys.executable, "-m", "sdtune.cli.main", "train", str(sdtune_config(work, family, row, steps))]
        run = work / "runs" / row
        if run.exists():
            import shutil

            shutil.rmtree(run)
    metrics = work / "runs" / row / "metrics.jsonl"
    first_step = None
    out, err = work / f"{row}.stdout", work / f"{row}.stderr"  # files, not pipes: a full pipe would block the run
    with (
        open(out, "w") as fo,
        open(err, "w") as fe,
        subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=fo, stderr=fe) as p,
    ):
        while p.poll() is None:  # launch to the first step's metrics row
            if first_step is None and metrics.is_file() and metrics.stat().st_size:
                first_step = time.perf_counter() - launched
            time.sleep(0.25)
    proc = subprocess.CompletedProcess(cmd, p.returncode, out.read_text(), err.read_text())
    if proc.returncode != 0:
        return {"row": row, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:200]}
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    result = {"row": row, "peak_rss_gib": peak_kb / 2**20, "wall_s": time.perf_counter() - launched}
    if row.startswith("floor"):
        result |= json.loads(proc.stdout.strip().splitlines()[-1])
        result["first_step_s"] = float(re.search(r"first_step_at ([\d.]+)", proc.stdout).group(1))
    else:
        rows = [json.loads(line) for line in (work / "runs" / row / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "images_per_second" in r]
        result["seconds_per_step"] = sum(1 / r["images_per_second"] for r in rows[1:]) / max(1, len(rows) - 1)
        result["first_step_s"] = first_step
    return result


def estimated(work: Path, family: str, row: str, steps: int) -> dict:
    """What ``sdtune estimate --json`` says of the row's config (its own process: no memory shared with a run)."""
    config = sdtune_config(work, family, row, steps)
    cmd = [sys.executable, "-m", "sdtune.cli.main", "estimate", str(config), "--json"]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["build", "run", "floor"])
    parser.add_argument("--family", default="sd1")
    parser.add_argument("--work", type=Path, default=Path("/tmp/realsize"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rows", nargs="*", default=ROWS)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args()
    if args.what == "build":
        build(args.work, args.family)
    elif args.what == "floor":
        floor(args.work, args.family, args.precision, args.checkpointing, args.steps)
    else:
        print("| row | s/step | peak RSS | launch to 1st step | wall | estimate: peak (ratio) | estimate: s/step (ratio) |")
        print("|---|---|---|---|---|---|---|")
        for row in args.rows:
            r = run_row(args.work, args.family, row, args.steps)
            if "error" in r:
                print(f"| {row} | error: {r['error']} | | | | | |", flush=True)
                continue
            first = f"{r['first_step_s']:.0f} s" if r.get("first_step_s") is not None else "?"
            rss, wall = f"{r['peak_rss_gib']:.2f} GiB", f"{r['wall_s']:.0f} s"
            est = " | |"
            if not row.startswith("floor"):
                e = estimated(args.work, args.family, row, args.steps)
                peak, sps = e["peak_host_bytes"] / 2**30, e["seconds_per_step"]
                est = (
                    f" {peak:.2f} GiB ({peak / r['peak_rss_gib']:.2f}) |"
                    f" {sps:.2f} ({sps / r['seconds_per_step']:.2f}) |"
                )
            print(f"| {row} | {r['seconds_per_step']:.2f} | {rss} | {first} | {wall} |{est}", flush=True)


if __name__ == "__main__":
    main()
