"""Textual inversion on the built-in model learns the held-out teal heart (scorer-measured), through `sdtune demo`.

Measured (BENCHMARKS.md, `sdtune demo`, 500 steps): the new word reads as a teal heart in 0 % of 24 images before
training (initialised from "heart": hearts of other colours) and in 88 % after; the base prompts do not contain the
word, so they cannot move. Thresholds leave room for floating-point differences between machines: <= 10 % before,
>= 70 % after.
"""

from __future__ import annotations

import pytest

from sdtune.tools.demo import DemoSettings, run_demo

BEFORE_AT_MOST = 0.10
AFTER_AT_LEAST = 0.70


@pytest.mark.slow
def test_embedding_learns_teal_heart_and_base_prompts_do_not_drift(tmp_path):
    report = run_demo(tmp_path, DemoSettings())
    fidelity, base = report["concept_fidelity"], report["base_accuracy"]
    assert fidelity["before"] <= BEFORE_AT_MOST, report
    assert fidelity["after"] >= AFTER_AT_LEAST, report
    assert abs(base["after"] - base["before"]) <= 0.05, report
    assert sorted(p.rsplit(".", 1)[1] for p in report["files"]["embeddings"]) == ["png", "pt", "safetensors"]
