from __future__ import annotations

import numpy as np
import pytest

from sdtune.inference.generate import GenerationSettings, generate, grid, native_size

FAST = GenerationSettings(steps=3, cfg_scale=3.0, sampler="ddim")


def test_image_depends_only_on_its_seed_not_on_batching(tiny_model):
    model = tiny_model("sd1")
    prompts, seeds = ["a red circle", "a blue square", "a red circle"], [5, 6, 5]
    together = generate(model, prompts, seeds, FAST, batch_size=3)
    apart = [generate(model, [p], [s], FAST)[0] for p, s in zip(prompts, seeds, strict=True)]
    for a, b in zip(together, apart, strict=True):
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), atol=2)  # uint8 rounding
    assert np.array_equal(np.asarray(together[0]), np.asarray(together[2]))
    assert not np.array_equal(np.asarray(together[0]), np.asarray(generate(model, ["a red circle"], [7], FAST)[0]))


@pytest.mark.parametrize("family", ["sd2-v", "sdxl"])
@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])
def test_families_and_samplers_generate_native_size(tiny_model, family, sampler):
    model = tiny_model(family)
    settings = GenerationSettings(steps=2, cfg_scale=2.0, sampler=sampler)
    (image,) = generate(model, ["a cat"], [0], settings)
    assert image.size == (native_size(model), native_size(model))


def test_grid_tiles_images(tiny_model):
    images = generate(tiny_model("sd1"), ["a", "b", "c"], [0, 1, 2], FAST)
    sheet = grid(images, columns=2)
    w, h = images[0].size
    assert sheet.size == (2 * w, 2 * h)
