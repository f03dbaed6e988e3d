"""The committed built-in base model: loads every way, and draws the shapes world well (scorer-measured)."""

from __future__ import annotations

import pytest
import torch

from sdtune.evaluate.world_eval import BUILTIN_EVAL, score_prompts
from sdtune.models.builtin import BUILTIN_DIR
from sdtune.models.loading import load_model, save_model
from sdtune.world import base_prompts, eval_prompts


@pytest.fixture(scope="module")
def builtin():
    return load_model("builtin")


def test_loads_as_a_diffusers_pipeline_offline(builtin):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        BUILTIN_DIR, local_files_only=True, safety_checker=None, torch_dtype=torch.float32
    )
    ids = builtin.tokenizers[0](
        "a red circle on a blue background", padding="max_length", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        torch.testing.assert_close(
            pipe.text_encoder(ids).last_hidden_state.float(), builtin.text_encoders[0](ids).last_hidden_state
        )
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_single_file_export_round_trips(builtin, tmp_path):
    path = save_model(builtin, tmp_path / "builtin.safetensors", dtype=torch.float32)
    again = load_model(path)
    for name, module in builtin.modules().items():
        for (k, a), b in zip(module.state_dict().items(), again.modules()[name].state_dict().values(), strict=True):
            assert torch.equal(a, b), (name, k)


# The bar, measured (BENCHMARKS.md): 94.9 % of the 98 base prompts (every allowed shape/colour pair once) at
# DDIM 20, CFG 7; 0 % on the held-out star. The held-out teal heart is NOT asserted wrong: the model composes it
# from the words "teal" and "heart" (83 %), which BENCHMARKS.md reports.
BASE_FLOOR = 0.90
HELD_OUT_SHAPE_CEILING = 0.10


@pytest.mark.slow
def test_draws_trained_concepts_and_fails_the_held_out_shape(builtin):
    assert BUILTIN_EVAL.cfg_scale == 7.0 and BUILTIN_EVAL.steps == 20 and BUILTIN_EVAL.sampler == "ddim"
    base = score_prompts(builtin, base_prompts(98, seed=0), BUILTIN_EVAL, seed=1000)
    assert base.full >= BASE_FLOOR, base.summary()
    held_out = score_prompts(builtin, eval_prompts("star"), BUILTIN_EVAL, seed=1000)
    assert held_out.full <= HELD_OUT_SHAPE_CEILING, held_out.summary()
