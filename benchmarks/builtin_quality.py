"""Quality of the built-in base model, read by the shapes-world scorer.

    python benchmarks/builtin_quality.py [--model builtin] [--cfg 3 5 7] [--n 64]

For each CFG: accuracy on n base prompts (concepts it was trained on) and on the held-out concepts' evaluation
prompts written in plain words (it must get those wrong), with the sampling time per image. Run it alone: the
machine has 2 cores and timings are meaningless with anything else running.
"""

from __future__ import annotations

import argparse
import platform

import torch

from sdtune.evaluate.world_eval import BUILTIN_EVAL, score_prompts
from sdtune.models.loading import load_model
from sdtune.world import CONCEPTS, accuracy, base_prompts, base_training_scene, eval_prompts, render


def vae_reconstruction_accuracy(model, n: int) -> str:
    """The scorer on rendered scenes and on the same scenes after the VAE's encode + decode."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(123)
    scenes = [base_training_scene(rng) for _ in range(n)]
    clean = [render(s) for s in scenes]
    x = torch.from_numpy(np.stack([np.asarray(i, np.float32) / 127.5 - 1 for i in clean])).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = model.vae.decode(model.vae.encode(x).latent_dist.mean).sample
    pixels = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    recon = [Image.fromarray(p) for p in pixels]
    a, b = accuracy(clean, scenes), accuracy(recon, scenes)
    return (
        f"scorer on {n} rendered scenes: {a['full']:.1%} fully right; on their VAE reconstructions: "
        f"{b['full']:.1%} (shape {b['shape']:.1%}, fg {b['fg']:.1%}, bg {b['bg']:.1%})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--cfg", type=float, nargs="+", default=[BUILTIN_EVAL.cfg_scale])
    parser.add_argument("--n", type=int, default=64)
    args = parser.parse_args()
    model = load_model(args.model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(vae_reconstruction_accuracy(model, 500))
    print("| CFG | prompt set | n | fully right | shape | fg | bg | s/image |")
    print("|---|---|---|---|---|---|---|---|")
    for cfg in args.cfg:
        settings = BUILTIN_EVAL.__class__(steps=BUILTIN_EVAL.steps, cfg_scale=cfg, sampler=BUILTIN_EVAL.sampler)
        sets = {"base prompts": base_prompts(args.n, seed=0)}
        sets |= {f"held-out {name} (words)": eval_prompts(name) for name in CONCEPTS}
        for label, prompts in sets.items():
            s = score_prompts(model, prompts, settings, seed=1000)
            print(
                f"| {cfg:g} | {label} | {s.n} | {s.full:.1%} | {s.shape:.1%} | {s.fg:.1%} | {s.bg:.1%} | "
                f"{s.seconds_per_image:.3f} |"
            )


if __name__ == "__main__":
    main()
