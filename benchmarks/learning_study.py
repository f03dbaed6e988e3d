"""The learning study on the built-in model (issue 18): the shipped star configs with one change each, scored by
the learning tests' own harness (``tests/learning/harness.py::learn``), one JSON line per run.

    python benchmarks/learning_study.py --out /tmp/study VARIANT [VARIANT ...]
    python benchmarks/learning_study.py --list

Every run trains on the 20 built-in star images and is scored on ``eval_prompts("star")`` (28 images) and the 32
base prompts (``base_prompts(32, seed=0)``). The regularisation prompts are 40 base-concept prompts chosen to be
disjoint from those 32 (``REG_PROMPTS``): what is kept is measured on prompts the regularisation never saw.
Results append to ``<out>/results.jsonl``; run it alone (2 cores: the train seconds mean nothing otherwise).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the harness the learning tests use
sys.path.insert(0, str(ROOT))

from tests.learning.harness import learn  # noqa: E402

from sdtune.world import base_prompts, eval_prompts, write_concept_dataset  # noqa: E402

EVAL_BASE = {p.prompt for p in base_prompts(32, seed=0)}
REG_PROMPTS = [p.prompt for p in base_prompts(200, seed=7) if p.prompt not in EVAL_BASE][:40]


def shipped(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "configs" / name).read_text())


def _pp(**fields) -> dict[str, Any]:
    return {"preservation": {"prompts": REG_PROMPTS, "num_images": 40, **fields}}


LORA, FT = "builtin_lora_star.yaml", "builtin_ft_star.yaml"
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": (LORA, {}),
    "lora-pp-w1-r0.5": (LORA, _pp(weight=1.0, ratio=0.5)),
    "lora-pp-w1-r1": (LORA, _pp(weight=1.0, ratio=1.0)),
    "lora-pp-w0.5-r0.5": (LORA, _pp(weight=0.5, ratio=0.5)),
    "lora-pp-w1-r0.5-lr6e-4": (LORA, _pp(weight=1.0, ratio=0.5) | {"optimizer": {"name": "adamw", "lr": 6e-4}}),
    "lora-pp-w1-r0.5-2000": (LORA, _pp(weight=1.0, ratio=0.5) | {"train": {"max_steps": 2000, "min_snr_gamma": 5.0}}),
    "lora-pp-w3-r1": (LORA, _pp(weight=3.0, ratio=1.0)),
    "lora-dop": (LORA, {"preservation": {"trigger": "star", "trigger_weight": 1.0}}),
    "ft": (FT, {}),
    "ft-pp-w1-r0.5": (FT, _pp(weight=1.0, ratio=0.5)),
    "ft-pp-w1-r1": (FT, _pp(weight=1.0, ratio=1.0)),
    "ft-pp-w3-r1": (FT, _pp(weight=3.0, ratio=1.0)),
    "ft-pp-w3-r1-lr2e-4": (FT, _pp(weight=3.0, ratio=1.0) | {"optimizer": {"name": "adamw", "lr": 2e-4}}),
    "ft-pp-w1-r1-800": (FT, _pp(weight=1.0, ratio=1.0) | {"train": {"max_steps": 800}}),
}


def config_of(variant: str, out: Path, data: Path) -> dict[str, Any]:
    name, change = VARIANTS[variant]
    cfg = shipped(name)
    for key, value in copy.deepcopy(change).items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict) and key != "preservation":
            cfg[key] = cfg[key] | value
        else:
            cfg[key] = value
    cfg["name"] = variant
    cfg["data"]["path"] = str(data)
    cfg["output_dir"] = str(out / "runs")
    cfg["preview"] = {"before_training": False, "every_n_steps": 0, "cfg_scale": 5.0}
    cfg.setdefault("save", {})["dtype"] = "fp32"
    if "preservation" in cfg and "prompts" in cfg["preservation"]:
        cfg["preservation"]["images"] = str(out / "reg-images")  # rendered once, shared by the runs
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*")
    parser.add_argument("--out", type=Path, default=Path("/tmp/study"))
    parser.add_argument("--seed", type=int, default=0, help="train.seed")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list or not args.variants:
        for name, (base, change) in VARIANTS.items():
            print(f"{name:28s} {base} + {json.dumps(change)[:100]}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "star"
    if not data.exists():
        write_concept_dataset("star", data, n=20)
    for variant in args.variants:
        cfg = config_of(variant, args.out, data)
        cfg.setdefault("train", {})["seed"] = args.seed
        tic = time.time()
        result = learn(cfg, eval_prompts("star"))
        row = {
            "variant": variant,
            "seed": args.seed,
            "star": result.concept_after.full,
            "star_before": result.concept_before.full,
            "base": result.base_after.full,
            "base_before": result.base_before.full,
            "train_s": round(result.train_seconds, 1),
            "wall_s": round(time.time() - tic, 1),
            "summary": result.summary(),
        }
        print(json.dumps(row), flush=True)
        with (args.out / "results.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
