"""Evaluation-driven training on an over-trained config (issue 19): the shipped star LoCon
(``configs/builtin_lora_star.yaml``) at 3,000 steps, evaluated every 250 steps, once run to the end and once with
early stopping; then each run's ``output/`` re-scored by ``sdtune eval``'s code path and by the learning tests'
harness (28 star images, 32 base prompts at 20 DDIM steps: the figures of BENCHMARKS.md's learning tables).

    OMP_NUM_THREADS=1 python benchmarks/early_stop.py --out /tmp/early full &
    OMP_NUM_THREADS=1 python benchmarks/early_stop.py --out /tmp/early early

One JSON line per run in ``<out>/results.jsonl``. Two runs side by side on 2 cores take their seconds from each
other: compare steps and figures, and the evaluation's share of each run's own time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from tests.learning.harness import BASE_PROMPTS, _model_with  # noqa: E402

from sdtune.config import parse_config  # noqa: E402
from sdtune.config.methods import METHOD_SCHEMAS  # noqa: E402
from sdtune.evaluate.world_eval import BUILTIN_EVAL, score_prompts  # noqa: E402
from sdtune.methods.run import run  # noqa: E402
from sdtune.tools.evaluate_files import evaluate_run  # noqa: E402
from sdtune.world import base_prompts, eval_prompts, write_concept_dataset  # noqa: E402

EVAL = {"every_n_steps": 250, "concept": "star", "num_prior_prompts": 8}  # the shipped config's, every 250 steps
VARIANTS = {"full": {}, "early": {"patience": 3}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    args = parser.parse_args()
    data = args.out / "star"
    if not data.is_dir():
        write_concept_dataset("star", data, n=20)
    from rich.console import Console

    for name in args.variants:
        config = yaml.safe_load((ROOT / "configs" / "builtin_lora_star.yaml").read_text())
        config |= {"name": f"star-{name}", "output_dir": str(args.out / "runs"), "eval": EVAL | VARIANTS[name]}
        config["data"]["path"] = str(data)
        config["train"]["max_steps"] = args.steps
        config["preview"] = {"enabled": False}
        cfg = parse_config(config, METHOD_SCHEMAS["lora"])
        tic = time.perf_counter()
        outputs = run(cfg, console=Console(quiet=True), progress=False)
        seconds = time.perf_counter() - tic
        root = args.out / "runs" / cfg.name
        report = json.loads((root / "report.json").read_text())
        again = evaluate_run(root)
        model = _model_with(outputs)
        star = score_prompts(model, eval_prompts("star"), BUILTIN_EVAL, seed=1000, images_per_prompt=2)
        base = score_prompts(model, base_prompts(BASE_PROMPTS, seed=0), BUILTIN_EVAL, seed=1000)
        row = {
            "variant": name,
            "steps": report["last_step"],
            "best_step": report["best_step"],
            "stopped": report["stopped"],
            "best": report["best"],
            "last": report["last"],
            "re_evaluated": again,
            "harness_star": round(100 * star.full, 1),
            "harness_base": round(100 * base.full, 1),
            "eval_seconds": report["eval_seconds"],
            "run_seconds": round(seconds, 1),
        }
        with open(args.out / "results.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row))


if __name__ == "__main__":
    main()
