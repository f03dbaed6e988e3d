"""The Results page's "generate with this": a real short run's output applied at the strength the user sets.

Each run trains a tiny SD1 model for a few steps through ``sdtune.methods.run`` (what ``sdtune train`` and the UI's
jobs run), then :func:`sdtune.ui.views.generate_with` generates with its output: at strength 0 the image is the
base model's, at 1 it is what applying the file the usual way gives, and it differs from the base.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from image_folders import write_image_folder
from sdtune.config import METHOD_SCHEMAS, parse_config
from sdtune.core.errors import SdtuneError
from sdtune.inference.generate import GenerationSettings, apply_hypernetwork, generate
from sdtune.methods.run import run
from sdtune.models.loading import load_model, save_model
from sdtune.tools.lora_tools import apply_lora
from sdtune.ui import views

PROMPT, SEED, STEPS = "tag0, red, square", 3, 3


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """``trained(method, **extra)``: the run folder of a few-step run of ``method`` on a tiny SD1 checkpoint."""
    root = tmp_path_factory.mktemp("generate-with")
    base = save_model(tiny_model("sd1"), root / "tiny.safetensors", dtype=torch.float32)
    images = write_image_folder(root / "images", size=32)

    done: dict[str, tuple] = {}

    def make(method: str, **extra):
        if method in done:
            return done[method]
        raw = {
            "method": method,
            "name": method,
            "output_dir": str(root / "runs"),
            "model": {"base": str(base)},
            "data": {"path": str(images), "batch_size": 2},
            "optimizer": {"lr": 1e-2},
            "train": {"max_steps": 3},
            "save": {"dtype": "fp32"},
            "preview": {"steps": 2, "before_training": False},
        } | extra
        cfg = parse_config(raw, METHOD_SCHEMAS[method])
        run(cfg, console=Console(quiet=True), progress=False)
        done[method] = root / "runs" / method, base
        return done[method]

    return make


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def render(model, prompt: str = PROMPT) -> np.ndarray:
    (image,) = generate(model, [prompt], [SEED], GenerationSettings(steps=STEPS))
    return np.asarray(image.convert("RGB")).astype(int)


def made(run_root, tmp_path, strength: float, prompt: str = PROMPT) -> np.ndarray:
    (path,) = views.generate_with(run_root, prompt, SEED, strength, STEPS, out_dir=tmp_path / f"s{strength}")
    return pixels(path)


@pytest.mark.parametrize("method", ["lora", "hypernetwork"])
def test_adapters_apply_at_the_chosen_strength(trained, tmp_path, method):
    run_root, base = trained(method)
    plain = render(load_model(base))
    at_zero, at_one = made(run_root, tmp_path, 0.0), made(run_root, tmp_path, 1.0)
    assert np.array_equal(at_zero, plain)  # strength 0: the base model's image
    assert np.abs(at_one - plain).max() > 0  # strength 1: the trained file changes it
    reference = load_model(base)  # applied the way a user (and tests/learning/harness.py) applies it
    if method == "lora":
        apply_lora(reference, run_root / "output" / "lora.safetensors")
    else:
        apply_hypernetwork(reference, run_root / "output" / "hypernetwork.pt")
    assert np.array_equal(at_one, render(reference))
    assert not np.array_equal(made(run_root, tmp_path, 0.5), at_one)  # the slider is a strength, not on/off


def test_a_whole_model_output_is_blended_with_its_base(trained, tmp_path):
    run_root, base = trained("finetune")
    plain = render(load_model(base))
    at_zero, at_one = made(run_root, tmp_path, 0.0), made(run_root, tmp_path, 1.0)
    assert np.array_equal(at_zero, plain)
    assert np.array_equal(at_one, render(load_model(run_root / "output" / "finetune.safetensors")))
    assert np.abs(at_one - plain).max() > 0


def test_an_embedding_is_applied_under_the_trained_token(trained, tmp_path):
    run_root, base = trained("textual_inversion", token="<new-thing>", num_vectors=2, init_text="red square")
    prompt = "a <new-thing> on a blue background"
    with_embedding = made(run_root, tmp_path, 1.0, prompt)
    assert np.array_equal(made(run_root, tmp_path, 0.0, prompt), with_embedding)  # embeddings have no strength
    assert np.abs(with_embedding - render(load_model(base), prompt)).max() > 0  # the word means something now
    with pytest.raises(SdtuneError, match="prompt: empty"):
        views.generate_with(run_root, "  ", SEED, 1.0, STEPS)


def test_a_run_without_output_is_a_one_line_error(tmp_path):
    with pytest.raises(SdtuneError, match="config.yaml"):
        views.generate_with(tmp_path, PROMPT, SEED, 1.0, STEPS)


def test_sdtune_generate_applies_a_lora_like_the_ui(trained, tmp_path):
    from typer.testing import CliRunner

    from sdtune.cli.main import app

    run_root, base = trained("lora")
    lora = run_root / "output" / "lora.safetensors"
    args = ["generate", PROMPT, "--model", str(base), "--seed", str(SEED), "--steps", str(STEPS)]
    for weight in (0, 1):
        result = CliRunner().invoke(app, [*args, "--lora", f"{lora}:{weight}", "--out", str(tmp_path / f"cli{weight}")])
        assert result.exit_code == 0, result.output
        assert f"LoRA {lora} at weight {weight}\n" in result.output  # one whole line
        assert np.array_equal(pixels(tmp_path / f"cli{weight}" / "0000.png"), made(run_root, tmp_path, weight))
    with pytest.raises(SdtuneError, match="--lora: no such file"):
        CliRunner().invoke(app, [*args, "--lora", str(tmp_path / "nope.safetensors")], catch_exceptions=False)
