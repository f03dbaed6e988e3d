"""Shared test setup: everything runs offline on tiny models built in code."""

from __future__ import annotations

import os

# Nothing may be fetched from a hub: a test that tries fails instead of silently downloading.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`-n N`) each worker gets its share of the cores: torch's default of one thread per core in
# every worker oversubscribes the machine (on 2 cores one thread per worker runs a built-in-model step as fast as
# two threads do, so two workers finish the suite in about half the time). Subprocesses inherit the setting.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model():
    """Build (once per session and family) a tiny model: ``tiny_model("sdxl")``."""
    from sdtune.models.tiny import build_tiny

    cache: dict = {}

    def get(family: str = "sd1", seed: int = 0):
        key = (family, seed)
        if key not in cache:
            cache[key] = build_tiny(family, seed=seed)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory):
    """A tiny BLIP captioning model folder (``captioner_models.write_tiny_blip``)."""
    from captioner_models import write_tiny_blip

    return write_tiny_blip(tmp_path_factory.mktemp("blip"))


@pytest.fixture(scope="session")
def tiny_tagger(tmp_path_factory):
    """A tiny WD14-style ONNX tagger folder (``captioner_models.write_tiny_tagger``)."""
    from captioner_models import write_tiny_tagger

    return write_tiny_tagger(tmp_path_factory.mktemp("tagger"))


@pytest.fixture
def accelerator_in():
    """``accelerator_in("fp16")``: a CPU ``Accelerator`` in that precision. accelerate keeps one process-wide
    state, so it is reset before each one made and after the test (other tests make theirs in full precision)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    def make(precision: str = "no") -> Accelerator:
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(cpu=True, mixed_precision=precision)

    yield make
    AcceleratorState._reset_state(reset_partial_state=True)
