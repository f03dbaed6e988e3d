from __future__ import annotations

import pytest
import torch

from sdtune.models.text_encoding import TextCache, encode_prompts


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_text_cache_gives_the_encoder_outputs_and_encodes_each_prompt_once(tiny_model, family):
    model = tiny_model(family)
    cache = TextCache(model)
    prompts = ["a red circle", "a blue square", "a red circle"]
    first = cache(prompts)
    again = cache(list(reversed(prompts)))
    with torch.no_grad():
        direct = encode_prompts(model, prompts)
    torch.testing.assert_close(first.context, direct.context)
    torch.testing.assert_close(again.context, direct.context.flip(0))
    assert cache.encoded == 2
    if family == "sdxl":
        torch.testing.assert_close(first.pooled, direct.pooled)
        assert first.unet_kwargs(64, 64)["added_cond_kwargs"]["time_ids"].tolist()[0] == [64, 64, 0, 0, 64, 64]
    else:
        assert first.pooled is None and first.unet_kwargs(64, 64) == {}
