from __future__ import annotations

import torch

from sdtune.config.blocks import PreviewConfig
from sdtune.data import Templates
from sdtune.inference.previews import eval_mode, preview_prompts, preview_settings

TEMPLATES = Templates(
    ("a photo of [name], [filewords]", "a painting of [name], [filewords]", "[name] [filewords]"), "t"
)
CAPTIONS = [f"caption {i}" for i in range(6)]


def test_configured_prompts_name_the_token_or_stay_as_written():
    preview = PreviewConfig(prompts=["[name] on a beach", "a cat"])
    assert preview_prompts(preview, TEMPLATES, CAPTIONS, name="sks") == ["sks on a beach", "a cat"]
    assert preview_prompts(preview, TEMPLATES, CAPTIONS, name=None) == ["[name] on a beach", "a cat"]


def test_without_prompts_the_first_four_captions_through_the_templates_fixed_by_the_seed():
    prompts = preview_prompts(PreviewConfig(seed=3, num_prompts=4), TEMPLATES, CAPTIONS, name="sks")
    assert len(prompts) == 4
    for i, prompt in enumerate(prompts):
        assert prompt.endswith(f"caption {i}") and "sks" in prompt
    again = preview_prompts(PreviewConfig(seed=3, num_prompts=4), TEMPLATES, CAPTIONS, name="sks")
    assert again == prompts  # same every preview
    draws = {tuple(preview_prompts(PreviewConfig(seed=s), TEMPLATES, CAPTIONS, name="sks")) for s in range(8)}
    assert len(draws) > 1  # the seed picks the template lines
    assert preview_prompts(PreviewConfig(), TEMPLATES, CAPTIONS[:2], name="x")[1].endswith("caption 1")


def test_settings_follow_the_preview_block_at_the_training_resolution():
    preview = PreviewConfig(steps=7, cfg_scale=3.5, sampler="euler_a", negative_prompt="blurry")
    s = preview_settings(preview, 96)
    assert (s.steps, s.cfg_scale, s.sampler, s.width, s.height, s.negative_prompt) == (
        7,
        3.5,
        "euler_a",
        96,
        96,
        "blurry",
    )


def test_eval_mode_is_undone_even_when_sampling_fails():
    modules = [torch.nn.Dropout(0.5), torch.nn.Linear(2, 2)]
    try:
        with eval_mode(modules):
            assert not any(m.training for m in modules)
            raise RuntimeError("sampling failed")
    except RuntimeError:
        pass
    assert all(m.training for m in modules)
