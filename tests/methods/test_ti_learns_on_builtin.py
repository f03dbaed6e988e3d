"""Textual inversion on the built-in model learns a concept the base model cannot draw (scorer-measured).

This runs the same code as `sdtune demo`. The concept, a *teal heart*, is held out of the base model (teal was
only ever a background colour). Thresholds come from measured runs (BENCHMARKS.md): before training the scorer
reads the concept in THRESHOLD_BEFORE or fewer images; after 300 steps in THRESHOLD_AFTER or more. Base prompts do
not contain the token, so they must not move at all: the model's weights are untouched.
"""

from __future__ import annotations

import pytest

from sdtune.tools.demo import DemoSettings, run_demo

THRESHOLD_BEFORE = 0.10
THRESHOLD_AFTER = 0.60


@pytest.mark.slow
def test_embedding_learns_teal_heart_and_base_prompts_do_not_drift(tmp_path):
    report = run_demo(tmp_path, DemoSettings(steps=300))
    fidelity, base = report["concept_fidelity"], report["base_accuracy"]
    assert fidelity["before"] <= THRESHOLD_BEFORE, report
    assert fidelity["after"] >= THRESHOLD_AFTER, report
    assert abs(base["after"] - base["before"]) <= 0.05, report
    for path in report["files"]["embeddings"]:
        assert path.endswith((".pt", ".safetensors", ".png"))
