"""Training methods learn on the built-in model, each run from its shipped example config (`configs/`) and scored
by the shapes-world scorer (`harness.learn`): the full fine-tune and a LoRA a new shape, the hypernetwork a style,
DreamBooth a subject, with and without prior preservation. The
thresholds come from the measurements in BENCHMARKS.md ("Learning on the built-in model"), with room for
floating-point differences between machines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from sdtune.tools.evaluate_files import evaluate_run
from sdtune.world import base_prompts, eval_prompts, style_eval_prompts, write_concept_dataset, write_style_dataset

from .harness import BASE_PROMPTS, diffusers_applied, leak_prompts, learn

CONFIGS = Path(__file__).parent.parent.parent / "configs"
# Measured with the same call: 0 % -> 64.3 % of 28 images (BENCHMARKS.md); 50 % leaves room for other machines.
FT_STAR_AT_LEAST = 0.50
# Measured: LoCon rank 32 with the adapter EMA, 0 % -> 57.1 % of 28 images, base prompts 87.5 % -> 59.4 % of 32.
LORA_STAR_AT_LEAST = 0.50
LORA_BASE_AT_LEAST = 0.45
# diffusers' load_lora_weights applies the same weights up to float rounding (fp32 file): at most one image of 28
# (or of 32 base prompts) may read differently
DIFFUSERS_WITHIN = 0.04
# Measured (train.seed 0 / 1): "sks heart" reads as a teal heart in 41.7 / 37.5 % (no prior) and 45.8 / 70.8 %
# (prior) of 24 images; "a heart on a <colour> background" comes out teal in 50 / 60 % of 20 images without prior
# preservation and in 0 / 10 % with it (the base model: 0 %).
DB_SUBJECT_AT_LEAST = 0.25
DB_LEAK_WITH_PRIOR_AT_MOST = 0.20
DB_LEAK_REDUCED_BY_AT_LEAST = 0.30
# Measured: pictures on black (the "night" style) 0 % -> 90.6 % of 32 images; fully right (shape and foreground
# colour kept as well) 0 % -> 46.9 %.
HN_NIGHT_BG_AT_LEAST = 0.75
HN_NIGHT_AT_LEAST = 0.35


def shipped(name: str, tmp_path: Path, data: Path) -> dict[str, Any]:
    """The example config ``configs/<name>`` as a user runs it, on ``data``, writing under ``tmp_path``."""
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    cfg["data"]["path"] = str(data)
    cfg["output_dir"] = str(tmp_path / "runs")
    cfg["preview"] = {"before_training": False, "every_n_steps": 0}
    cfg.setdefault("save", {})["dtype"] = "fp32"
    return cfg


@pytest.mark.slow
def test_finetune_learns_the_held_out_star(tmp_path):
    write_concept_dataset("star", tmp_path / "star", n=20)
    result = learn(shipped("builtin_ft_star.yaml", tmp_path, tmp_path / "star"), eval_prompts("star"))
    assert result.concept_before.full <= 0.05, result.summary()  # the base model has never seen a star
    assert result.concept_after.full >= FT_STAR_AT_LEAST, result.summary()


@pytest.mark.slow
def test_lora_learns_the_held_out_star(tmp_path):
    write_concept_dataset("star", tmp_path / "star", n=20)
    # the shipped config evaluates every 500 steps and keeps its best step in output/; the thresholds were measured
    # on the last step (before evaluation existed; evaluating never changes what trains), in output/last/
    result = learn(shipped("builtin_lora_star.yaml", tmp_path, tmp_path / "star"), eval_prompts("star"), last=True)
    assert result.concept_before.full <= 0.05, result.summary()  # the base model has never seen a star
    assert result.concept_after.full >= LORA_STAR_AT_LEAST, result.summary()  # at least half the samples
    assert result.base_after.full >= LORA_BASE_AT_LEAST, result.summary()  # what the base prompts keep
    # the file as diffusers applies it (load_lora_weights: its kohya converter and peft layers) scores the same
    root = result.outputs[0].parent.parent
    last = root / "output" / "last"
    lora_file = (last if last.is_dir() else root / "output") / "star-lora.safetensors"
    star = diffusers_applied(lora_file, eval_prompts("star"), images_per_prompt=2)
    base = diffusers_applied(lora_file, base_prompts(BASE_PROMPTS, seed=0))
    assert abs(star.full - result.concept_after.full) <= DIFFUSERS_WITHIN, (star.summary(), result.summary())
    assert abs(base.full - result.base_after.full) <= DIFFUSERS_WITHIN, (base.summary(), result.summary())
    # evaluation-driven training (issue 19): report.json's best step is the maximum of its selection figure in
    # eval.jsonl, and output/ (that step's files) scores the figure again when re-evaluated by `sdtune eval`
    report = json.loads((root / "report.json").read_text())
    rows = [json.loads(line) for line in (root / "eval.jsonl").read_text().splitlines()]
    select = report["selected_by"]
    assert [r["step"] for r in rows] == [0, 500, 1000, 1500]
    assert report["best_step"] == max((r for r in rows if r["step"] > 0), key=lambda r: r[select])["step"]
    assert evaluate_run(root)[select] == report["best"][select]


@pytest.mark.slow
def test_dreambooth_learns_the_subject_and_prior_preservation_keeps_the_class(tmp_path):
    write_concept_dataset("teal_heart", tmp_path / "heart", n=20, token="sks heart")
    subject = eval_prompts("teal_heart", token="sks heart")
    leaks = {}
    for prior in (False, True):
        cfg = shipped("builtin_db_teal-heart.yaml", tmp_path / str(prior), tmp_path / "heart")
        cfg["prior_preservation"] = prior
        result = learn(cfg, subject, drift_prompts=leak_prompts("heart", "teal"), drift_images=2)
        assert result.base_before.full == 0.0, result.summary()  # the base model never draws a teal heart unasked
        assert result.concept_after.full >= DB_SUBJECT_AT_LEAST, (prior, result.summary())  # "sks heart" learned
        leaks[prior] = result.base_after.full
    # without the class images "a heart" turns into the subject; with them it stays a heart of any colour
    assert leaks[True] <= DB_LEAK_WITH_PRIOR_AT_MOST, leaks
    assert leaks[False] - leaks[True] >= DB_LEAK_REDUCED_BY_AT_LEAST, leaks


@pytest.mark.slow
def test_hypernetwork_learns_the_night_style(tmp_path):
    write_style_dataset("night", tmp_path / "night", n=24)
    # thresholds measured on the last step (output/last/ when the config's evaluation kept another step in output/)
    cfg = shipped("builtin_hn_style.yaml", tmp_path, tmp_path / "night")
    result = learn(cfg, style_eval_prompts("night", 16), last=True)
    assert result.concept_before.bg <= 0.05, result.summary()  # the base model draws the background it is asked for
    assert result.concept_after.bg >= HN_NIGHT_BG_AT_LEAST, result.summary()  # on black, whatever the prompt says
    assert result.concept_after.full >= HN_NIGHT_AT_LEAST, result.summary()  # shape and colour kept
