"""Steps/s and peak memory of every training method through the real loop, one fresh process per method.

    python benchmarks/method_speed.py [--model builtin] [--batch 4] [--steps 30] [--warmup 5] [--device cpu]
                                      [--methods textual_inversion lora ...] [--mixed-precision no|bf16|fp16]

Each method trains on the built-in star set (20 images, 64 px on the built-in model; on another model the images
are upscaled to its native size by the loader) with the settings a user would pick:
  textual_inversion  2 vectors, templates subject_filewords
  lora               rank 8, attention + feed-forward, UNet only
  lora_te            the same + text encoder(s)
  hypernetwork       A1111 layer structure 1, 2, 1 on the cross-attention width
  dreambooth         UNet, instance prompt "a sks star", prior preservation (20 class images rendered before
                     timing), weight 1
  finetune           UNet, EMA on
  finetune_gc        the same with gradient checkpointing
Steps/s are timed between the StepEnd events after ``warmup`` steps. Peak memory: the process's peak resident set
(``ru_maxrss``; includes the loaded model) and, on CUDA, ``torch.cuda.max_memory_allocated``. Run it alone: on
2 cores anything else running skews the numbers.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = {
    "textual_inversion": {"method": "textual_inversion", "token": "<star>", "num_vectors": 2, "init_text": "shape"},
    "lora": {"method": "lora", "rank": 8, "targets": "attention_ff"},
    "lora_te": {"method": "lora", "rank": 8, "targets": "attention_ff", "train_text_encoder": True},
    "hypernetwork": {"method": "hypernetwork", "layer_structure": [1, 2, 1]},
    "dreambooth": {
        "method": "dreambooth",
        "instance_token": "sks",
        "instance_prompt": "a sks star",
        "class_prompt": "a red circle on a black background",
        "num_class_images": 20,
    },
    "finetune": {"method": "finetune", "ema": True},
    "finetune_gc": {"method": "finetune", "ema": True, "train": {"gradient_checkpointing": True}},
}


def worker(args: argparse.Namespace) -> dict:
    import torch
    from accelerate import Accelerator

    from sdtune.config import parse_config
    from sdtune.config.methods import METHOD_SCHEMAS
    from sdtune.core.events import EventBus, StepEnd
    from sdtune.methods import setup_function
    from sdtune.train.loop import train
    from sdtune.train.rundir import RunDir
    from sdtune.world import write_concept_dataset

    work = Path(args.work)
    data = work / "star"
    write_concept_dataset("star", data, n=20)
    spec = dict(METHODS[args.worker])
    train_extra = spec.pop("train", {})
    cfg = parse_config(
        {
            **spec,
            "name": args.worker,
            "output_dir": str(work / "runs"),
            "model": {"base": args.model},
            "data": {"path": str(data), "batch_size": args.batch, "flip": True},
            "train": {"max_steps": args.warmup + args.steps, "mixed_precision": args.mixed_precision, **train_extra},
            "save": {"every_n_steps": 0},
            "preview": {"before_training": False, "every_n_steps": 0},
        },
        METHOD_SCHEMAS[spec["method"]],
    )
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=args.mixed_precision)
    job = setup_function(cfg.method)(cfg, accelerator)
    if torch.cuda.is_available() and args.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    bus = EventBus()
    bus.subscribe(lambda e: times.append(time.perf_counter()) if isinstance(e, StepEnd) else None)
    train(job, cfg, RunDir(work / "runs" / cfg.name), bus, accelerator)
    rate = args.steps / (times[-1] - times[args.warmup - 1])
    out = {
        "method": args.worker,
        "steps_per_s": rate,
        "images_per_s": rate * args.batch,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable_params": sum(p.numel() for g in job.trainable_parameters() for p in g["params"]),
    }
    if torch.cuda.is_available() and args.device != "cpu":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = []
    for method in args.methods:
        with tempfile.TemporaryDirectory() as work:
            cmd = [sys.executable, __file__, "--worker", method, "--work", work, "--model", args.model]
            cmd += ["--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            cmd += ["--device", args.device, "--mixed-precision", args.mixed_precision]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                print(f"{method}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    cuda = any("peak_cuda_mib" in r for r in rows)
    print(f"\n| method | steps/s | images/s | peak RSS MiB |{' peak CUDA MiB |' if cuda else ''} trainable params |")
    print(f"|---|---|---|---|{'---|' if cuda else ''}---|")
    for r in rows:
        extra = f" {r['peak_cuda_mib']:.0f} |" if cuda else ""
        print(
            f"| {r['method']} | {r['steps_per_s']:.2f} | {r['images_per_s']:.1f} | {r['peak_rss_mib']:.0f} |{extra} "
            f"{r['trainable_params']:,} |"
        )


if __name__ == "__main__":
    main()
