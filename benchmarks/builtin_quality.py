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
from sdtune.world import CONCEPTS, base_prompts, eval_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--cfg", type=float, nargs="+", default=[BUILTIN_EVAL.cfg_scale])
    parser.add_argument("--n", type=int, default=64)
    args = parser.parse_args()
    model = load_model(args.model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| CFG | prompt set | n | fully right | shape | fg | bg | s/image |")
    print("|---|---|---|---|---|---|---|---|")
    for cfg in args.cfg:
        settings = BUILTIN_EVAL.__class__(steps=BUILTIN_EVAL.steps, cfg_scale=cfg, sampler=BUILTIN_EVAL.sampler)
        sets = {"base prompts": base_prompts(args.n, seed=0)}
        sets |= {f"held-out {name} (words)": eval_prompts(name) for name in CONCEPTS}
        for label, prompts in sets.items():
            s = score_prompts(model, prompts, settings, seed=1000)
            print(f"| {cfg:g} | {label} | {s.n} | {s.full:.1%} | {s.shape:.1%} | {s.fg:.1%} | {s.bg:.1%} | "
                  f"{s.seconds_per_image:.3f} |")


if __name__ == "__main__":
    main()
