"""CLIP / DINOv2 evaluation end to end on tiny random models: a LoRA on a tiny SD 1.x model evaluated while it
trains, then its exported file re-evaluated (the figures mean nothing at this size; the plumbing is what is tested)."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from image_folders import write_image_folder
from sdtune.config import parse_config
from sdtune.config.blocks import EvalConfig
from sdtune.config.methods import METHOD_SCHEMAS
from sdtune.methods.run import run, run_dir_of
from sdtune.models.loading import save_model
from sdtune.tools.evaluate_files import evaluate_file, evaluate_run

from .scorer_models import tiny_clip_folder, tiny_dino_folder


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    return tiny_clip_folder(root / "clip"), tiny_dino_folder(root / "dino")


def test_a_lora_is_evaluated_with_clip_and_dino_while_it_trains(tmp_path, tiny_model, scorers):
    clip, dino = scorers
    base = save_model(tiny_model("sd1"), tmp_path / "tiny-sd1.safetensors", dtype=torch.float32)
    image_folder = write_image_folder(tmp_path / "images")
    e = {
        "every_n_steps": 2,
        "clip_model": str(clip),
        "dino_model": str(dino),
        "prompts": ["a photo of [name] on a beach", "a red square"],
        "prior_prompts": ["a photo of a dog"],
        "steps": 2,
    }
    config = {
        "method": "lora",
        "name": "clip-eval",
        "output_dir": str(tmp_path / "runs"),
        "model": {"base": str(base)},
        "data": {"path": str(image_folder), "resolution": 16, "batch_size": 2},
        "optimizer": {"lr": 1e-2},
        "train": {"max_steps": 4},
        "preview": {"enabled": False},
        "eval": e,
    }
    cfg = parse_config(config, METHOD_SCHEMAS["lora"])
    outputs = run(cfg, console=Console(quiet=True), progress=False)
    rundir = run_dir_of(cfg)
    rows = rundir.evaluations()
    assert [r["step"] for r in rows] == [0, 2, 4]
    for r in rows:
        assert {"clip_i", "clip_t", "dino", "fidelity", "adherence", "drift", "score"} <= set(r)
        assert r["fidelity"] == r["dino"] and r["adherence"] == r["clip_t"]  # DINO is the likeness when given
        assert -100 <= r["clip_t"] <= 100 and -100 <= r["dino"] <= 100
        assert r["score"] == pytest.approx(r["fidelity"] - 0.5 * r["drift"], abs=0.011)
    assert rows[0]["drift"] == pytest.approx(0.0, abs=1e-3)  # the reference: the base's own images
    assert any(abs(r["drift"]) > 1e-3 for r in rows[1:])  # a LoRA at lr 1e-2 moves the dog's images
    report = json.loads(rundir.report_path.read_text())
    assert report["best_step"] in (2, 4)
    # re-evaluated from the exported file (merged into the base, as users apply it) the figures come back; the
    # live adapters and the merged weights differ in float rounding only
    again = evaluate_run(rundir.root)
    best = report["best"]
    assert again.keys() == {k for k in best if k != "step"}
    assert all(again[k] == pytest.approx(best[k], abs=0.05) for k in again)
    by_file = evaluate_file(
        outputs[0], str(base), EvalConfig(**e | {"reference_images": str(image_folder)}), resolution=16
    )  # fmt: skip
    assert all(by_file[k] == pytest.approx(again[k], abs=0.05) for k in again)


@pytest.mark.slow
def test_two_processes_evaluate_once_and_stop_early_together(tmp_path, tiny_model, scorers):
    """Under torchrun only rank 0 evaluates; the best step and the early stop reach rank 1 (it would hang in the
    next collective otherwise), and every row is written once."""
    import os
    import subprocess
    import sys

    import yaml

    clip, dino = scorers
    base = save_model(tiny_model("sd1"), tmp_path / "tiny-sd1.safetensors", dtype=torch.float32)
    images = write_image_folder(tmp_path / "images")
    config = tmp_path / "two.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "method": "lora",
                "name": "two",
                "output_dir": str(tmp_path / "runs"),
                "model": {"base": str(base)},
                "data": {"path": str(images), "resolution": 16, "batch_size": 1},
                "optimizer": {"lr": 1e-2},
                "train": {"max_steps": 12},
                "preview": {"enabled": False},
                "eval": {
                    "every_n_steps": 2,
                    "clip_model": str(clip),
                    "prompts": ["a red square"],
                    "prior_prompts": ["a photo of a dog"],
                    "steps": 2,
                    "patience": 1,
                    "min_delta": 1000.0,  # no rise can be this large: the second evaluation after the base stops
                },
            }
        )
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "sdtune.cli.main", "train", str(config)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    root = tmp_path / "runs" / "two"
    rows = [json.loads(line) for line in (root / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]
    report = json.loads((root / "report.json").read_text())
    assert report["last_step"] == 4 and report["stopped"].startswith("early stop")
    assert report["best_step"] == max(rows[1:], key=lambda r: r["score"])["step"]
    assert (root / "events.log").read_text().count("finished at step 4") == 1
