"""The shipped CLIP tokenizer works offline and matches the published ids."""

from __future__ import annotations

import pytest

from sdtune.models.family import ModelFamily
from sdtune.models.shipped import shipped_tokenizers


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_tokenizes_like_clip(name):
    for tokenizer in shipped_tokenizers(ModelFamily.parse(name)):
        assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert len(tokenizer) == 49408
        assert tokenizer.model_max_length == 77


def test_pad_tokens_per_family():
    sd1 = shipped_tokenizers(ModelFamily.parse("sd1"))
    sd2 = shipped_tokenizers(ModelFamily.parse("sd2"))
    sdxl = shipped_tokenizers(ModelFamily.parse("sdxl"))
    assert [t.pad_token_id for t in sd1] == [49407]
    assert [t.pad_token_id for t in sd2] == [0]  # OpenCLIP pads with "!"
    assert [t.pad_token_id for t in sdxl] == [49407, 0]
    padded = sd2[0]("a cat", padding="max_length").input_ids
    assert len(padded) == 77 and padded[4:] == [0] * 73
