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

from tests.learning.harness import leak_prompts, learn  # noqa: E402

from sdtune.world import base_prompts, eval_prompts, write_concept_dataset  # noqa: E402

EVAL_BASE = {p.prompt for p in base_prompts(32, seed=0)}
REG_PROMPTS = [p.prompt for p in base_prompts(200, seed=7) if p.prompt not in EVAL_BASE][:40]


def shipped(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "configs" / name).read_text())


def _pp(**fields) -> dict[str, Any]:
    return {"preservation": {"prompts": REG_PROMPTS, "num_images": 40, **fields}}


LORA, FT, DB = "builtin_lora_star.yaml", "builtin_ft_star.yaml", "builtin_db_teal-heart.yaml"
# DreamBooth's regularisation: the prompts above and hearts asked in a colour (the leak prompts name none)
_PAIRS = "red/blue blue/yellow green/white yellow/purple purple/green white/red orange/black gray/orange black/white"
HEARTS = [f"a {fg} heart on a {bg} background" for fg, bg in (pair.split("/") for pair in _PAIRS.split())]
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": (LORA, {}),
    # the matched comparison with kohya sd-scripts: LoRA on kohya's default targets (attention,
    # feed-forward, projections = attention_ff), rank 32, 3e-4 cosine, Min-SNR 5, batch 4, 1,500 steps, no EMA/flip
    "matched": (LORA, {"adapter": "lora", "targets": "attention_ff", "ema": False, "data": {"flip": False}}),
    "lora-pp-w1-r0.5": (LORA, _pp(weight=1.0, ratio=0.5)),
    "lora-pp-w1-r1": (LORA, _pp(weight=1.0, ratio=1.0)),
    "lora-pp-w0.5-r0.5": (LORA, _pp(weight=0.5, ratio=0.5)),
    "lora-pp-w1-r0.5-lr6e-4": (LORA, _pp(weight=1.0, ratio=0.5) | {"optimizer": {"name": "adamw", "lr": 6e-4}}),
    "lora-pp-w1-r0.5-2000": (LORA, _pp(weight=1.0, ratio=0.5) | {"train": {"max_steps": 2000, "min_snr_gamma": 5.0}}),
    "lora-pp-w1-r0.5-u0.25": (LORA, _pp(weight=1.0, ratio=0.5, unconditional=0.25)),
    "lora-pp-w3-r1": (LORA, _pp(weight=3.0, ratio=1.0)),
    "lora-dop": (LORA, {"preservation": {"trigger": "star", "trigger_weight": 1.0}}),
    # the options of issue 18, one at a time on the shipped LoRA config (train fields merged into its train block)
    "lora-multires6": (LORA, {"train": {"multires_noise_iterations": 6, "multires_noise_discount": 0.3}}),
    "lora-debiased": (LORA, {"train": {"debiased_estimation": True}}),
    "lora-ip0.1": (LORA, {"train": {"input_perturbation": 0.1}}),
    "lora-shift2": (LORA, {"train": {"timestep_shift": 2.0}}),
    "lora-lion": (LORA, {"optimizer": {"name": "lion", "lr": 3e-5}}),
    "lora-came": (LORA, {"optimizer": {"name": "came", "lr": 3e-4}}),
    "lora-schedulefree": (
        LORA,
        {"ema": False, "optimizer": {"name": "schedulefree_adamw", "lr": 3e-4}, "schedule": {"name": "constant"}},
    ),
    "lora-up-weighted": (LORA, {"down_lr_weight": "zeros+0.5", "up_lr_weight": "linear+0.5"}),
    "oft": (
        LORA,
        {"adapter": "oft", "rank": None, "alpha": None, "block_size": 8, "optimizer": {"name": "adamw", "lr": 1e-3}},
    ),
    "db": (DB, {}),  # teal-heart DreamBooth: "sks heart" and the leak into "a heart on a <colour> background"
    "db-noprior": (DB, {"prior_preservation": False}),
    "db-pp": (DB, {"prior_preservation": False, "preservation": {"prompts": REG_PROMPTS + HEARTS, "num_images": 50}}),
    "db-dop": (DB, {"prior_preservation": False, "preservation": {"trigger": "sks"}}),  # "a heart ..." = the base
    "db-prior-pp": (DB, {"preservation": {"prompts": REG_PROMPTS + HEARTS, "num_images": 50}}),
    "ft": (FT, {}),
    "ft-pp-w1-r0.5": (FT, _pp(weight=1.0, ratio=0.5)),
    "ft-pp-w1-r1": (FT, _pp(weight=1.0, ratio=1.0)),
    "ft-pp-w1-r1-u0.25": (FT, _pp(weight=1.0, ratio=1.0, unconditional=0.25)),
    "ft-pp-w3-r1-u0.25": (FT, _pp(weight=3.0, ratio=1.0, unconditional=0.25)),
    "ft-pp-w3-r1-u0.5": (FT, _pp(weight=3.0, ratio=1.0, unconditional=0.5)),
    "ft-pp-w3-r1-u0.25-800": (FT, _pp(weight=3.0, ratio=1.0, unconditional=0.25) | {"train": {"max_steps": 800}}),
    "ft-pp-w3-r1-u0.25-lr2e-4": (
        FT,
        _pp(weight=3.0, ratio=1.0, unconditional=0.25) | {"optimizer": {"name": "adamw", "lr": 2e-4}},
    ),
    "ft-pp-w3-r1": (FT, _pp(weight=3.0, ratio=1.0)),
    "ft-pp-w3-r1-lr2e-4": (FT, _pp(weight=3.0, ratio=1.0) | {"optimizer": {"name": "adamw", "lr": 2e-4}}),
    "ft-pp-w1-r1-800": (FT, _pp(weight=1.0, ratio=1.0) | {"train": {"max_steps": 800}}),
}


def config_of(variant: str, out: Path, data: Path) -> dict[str, Any]:
    name, change = VARIANTS[variant]
    cfg = shipped(name)
    for key, value in copy.deepcopy(change).items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict) and key not in ("preservation", "schedule"):
            cfg[key] = cfg[key] | value
        elif value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    cfg["name"] = variant
    cfg["data"]["path"] = str(data)
    cfg["output_dir"] = str(out / "runs")
    cfg["preview"] = {"before_training": False, "every_n_steps": 0, "cfg_scale": 5.0}
    cfg.setdefault("save", {})["dtype"] = "fp32"
    if "preservation" in cfg and "prompts" in cfg["preservation"]:
        prompts = cfg["preservation"]["prompts"]  # rendered once per prompt list, shared by the runs
        cfg["preservation"]["images"] = str(out / ("reg-images" if prompts == REG_PROMPTS else "reg-images-db"))
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
    hearts = args.out / "heart"
    if not hearts.exists():
        write_concept_dataset("teal_heart", hearts, n=20, token="sks heart")
    for variant in args.variants:
        dreambooth = VARIANTS[variant][0] == DB
        cfg = config_of(variant, args.out, hearts if dreambooth else data)
        cfg.setdefault("train", {})["seed"] = args.seed
        tic = time.time()
        try:
            if dreambooth:  # "base" is then the leak: the class asked in plain words drawn as the subject
                subject = eval_prompts("teal_heart", token="sks heart")
                result = learn(cfg, subject, drift_prompts=leak_prompts("heart", "teal"), drift_images=2)
            else:
                result = learn(cfg, eval_prompts("star"))
        except Exception as exc:  # one bad variant must not end the study
            print(json.dumps({"variant": variant, "error": str(exc)}), flush=True)
            continue
        row = {
            "variant": variant,
            "seed": args.seed,
            "concept": "teal_heart" if dreambooth else "star",
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
