"""A1111 embedding images: the tEXt chunk, the pixel payload (checked against the format description, not only
against our own decoder), plain previews, the LCG constants."""

from __future__ import annotations

import base64
import itertools
import json
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, features

from sdtune.core.errors import DataError
from sdtune.formats.embeddings import Embedding, load_embedding
from sdtune.formats.png_embedding import (
    TEXT_KEY,
    embed_in_png,
    lcg,
    lcg_stream,
    read_png_embedding,
    save_png_embedding,
)


def make(width: int = 16, n: int = 3) -> Embedding:
    vec = torch.randn(n, width, generator=torch.Generator().manual_seed(width + n))
    return Embedding("teal-heart", {"text_encoder": vec}, step=250, sd_checkpoint="abcdef0123", sd_checkpoint_name="m")


def preview(size: tuple[int, int] = (32, 24)) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def assert_same(got: Embedding | None, want: Embedding) -> None:
    assert got is not None
    assert (got.name, got.step, got.sd_checkpoint, got.sd_checkpoint_name) == (
        want.name,
        want.step,
        want.sd_checkpoint,
        want.sd_checkpoint_name,
    )
    # Floats pass through JSON; float32 values survive it exactly, so no tolerance is needed.
    torch.testing.assert_close(got.vectors["text_encoder"], want.vectors["text_encoder"], rtol=0, atol=0)


def strip_text(src, dst) -> None:
    with Image.open(src) as im:
        Image.fromarray(np.asarray(im.convert("RGB"))).save(dst)  # same pixels, no pnginfo
    with Image.open(dst) as im:
        assert TEXT_KEY not in im.text


def test_lcg_constants():
    assert list(itertools.islice(lcg(), 4)) == [253, 242, 127, 44]
    stream = lcg_stream(100_100).astype(np.int64)
    assert stream[:4].tolist() == [253, 242, 127, 44]
    # The brief's 12731374 is the sum of the 100000 outputs after the first 100; after the first four it is 12728839.
    assert int(stream[100:100_100].sum()) == 12731374
    assert int(stream[4:100_004].sum()) == 12728839
    assert np.array_equal(stream, np.fromiter(itertools.islice(lcg(), 100_100), dtype=np.int64))


@pytest.mark.parametrize(("width", "n"), [(16, 1), (768, 5)])
def test_text_chunk_roundtrip(tmp_path, width, n):
    emb = make(width, n)
    save_png_embedding(emb, preview(), tmp_path / "e.png")
    with Image.open(tmp_path / "e.png") as im:
        data = json.loads(base64.b64decode(im.text[TEXT_KEY]))
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["string_to_token"] == {"*": 265}
    assert list(data["string_to_param"]["*"]) == ["TORCHTENSOR"]
    assert np.array(data["string_to_param"]["*"]["TORCHTENSOR"]).shape == (n, width)
    assert_same(read_png_embedding(tmp_path / "e.png"), emb)
    assert_same(load_embedding(tmp_path / "e.png"), emb)


def test_text_chunk_is_preferred(tmp_path):
    """A1111 reads the tEXt chunk when present; the pixels are only the fallback."""
    from PIL import PngImagePlugin

    pixels_emb, text_emb = make(16, 2), make(8, 1)
    text_emb.name = "from-text"
    chunk = {"string_to_param": {"*": {"TORCHTENSOR": text_emb.vectors["text_encoder"].tolist()}}, "name": "from-text"}
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, base64.b64encode(json.dumps(chunk).encode()))
    embed_in_png(pixels_emb, preview()).save(tmp_path / "both.png", pnginfo=info)
    preview().save(tmp_path / "text-only.png", pnginfo=info)
    for name in ("both.png", "text-only.png"):
        got = read_png_embedding(tmp_path / name)
        assert got is not None and got.name == "from-text" and got.step == 0
        torch.testing.assert_close(got.vectors["text_encoder"], text_emb.vectors["text_encoder"], rtol=0, atol=0)


@pytest.mark.parametrize(("width", "n"), [(16, 1), (16, 5), (768, 5)])
def test_pixel_payload_without_text_chunk(tmp_path, width, n):
    emb = make(width, n)
    save_png_embedding(emb, preview(), tmp_path / "e.png")
    strip_text(tmp_path / "e.png", tmp_path / "stripped.png")
    assert_same(read_png_embedding(tmp_path / "stripped.png"), emb)
    assert load_embedding(tmp_path / "stripped.png", name="given").name == "given"


def test_tiny_preview_and_in_memory_image():
    emb = make(16, 2)
    image = embed_in_png(emb, preview((3, 5)), caption=False)
    assert_same(read_png_embedding(image), emb)


def test_layout_follows_the_format():
    """Decode the composite by the format's description alone: blocks, separators, nibbles, LCG, zlib."""
    emb, pic = make(16, 4), preview()
    image = np.asarray(embed_in_png(emb, pic, caption=False))
    h, w_total = image.shape[:2]
    assert h == pic.height
    w = (w_total - pic.width - 2) // 2
    assert w_total == 2 * w + 2 + pic.width
    assert not image[:, w].any() and not image[:, w + 1 + pic.width].any()  # the black separator columns
    assert np.array_equal(image[:, w + 1 : w + 1 + pic.width], np.asarray(pic))  # preview untouched (no caption)

    expected = json.dumps(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": {"TORCHTENSOR": emb.vectors["text_encoder"].numpy().tolist()}},
            "name": emb.name,
            "step": emb.step,
            "sd_checkpoint": emb.sd_checkpoint,
            "sd_checkpoint_name": emb.sd_checkpoint_name,
        }
    ).encode()
    payload = np.frombuffer(zlib.compress(expected, level=9), dtype=np.uint8)
    # A1111's block size: next multiple of H above the length, then the next multiple of 3H above that.
    size = payload.size + (h - payload.size % h)
    size += 3 * h - size % (3 * h)
    assert w * h * 3 == size

    gen = lcg()
    noise = np.array([next(gen) for _ in range(size)], dtype=np.uint8).reshape(h, w, 3) & 0x0F
    low = (image[:, :w] & 0x0F) ^ noise
    high = (image[:, w + 2 + pic.width :] & 0x0F) ^ noise
    assert np.array_equal(low.ravel(), np.resize(payload & 0x0F, size))  # cyclic padding
    assert np.array_equal(high.ravel(), np.resize(payload >> 4, size))


def test_decodes_a_plain_spec_encoding():
    """An image built from the description without the dot pattern decodes: the pattern is cosmetic."""
    emb, pic = make(16, 2), preview((10, 12))
    raw = json.dumps({"string_to_param": {"*": {"TORCHTENSOR": emb.vectors["text_encoder"].tolist()}}, "name": "n"})
    payload = np.frombuffer(zlib.compress(raw.encode(), level=9), dtype=np.uint8)
    h, size = pic.height, 3 * pic.height * (payload.size // (3 * pic.height) + 2)
    gen = lcg()
    noise = np.array([next(gen) for _ in range(size)], dtype=np.uint8) & 0x0F
    low = (np.resize(payload & 0x0F, size) ^ noise).reshape(h, -1, 3)
    high = (np.resize(payload >> 4, size) ^ noise).reshape(h, -1, 3)
    black = np.zeros((h, 1, 3), np.uint8)
    image = Image.fromarray(np.concatenate([low, black, np.asarray(pic), black, high], axis=1))
    got = read_png_embedding(image)
    assert got is not None and got.name == "n"
    torch.testing.assert_close(got.vectors["text_encoder"], emb.vectors["text_encoder"], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["noise", "black", "white", "stripes"])
def test_plain_images_hold_nothing(tmp_path, kind):
    arr = np.asarray(preview()).copy()
    if kind == "black":
        arr[:] = 0
    elif kind == "white":
        arr[:] = 255
    elif kind == "stripes":
        arr[:, ::3] = 0  # many all-zero columns: separators candidates that lead nowhere
    Image.fromarray(arr).save(tmp_path / "plain.png")
    assert read_png_embedding(tmp_path / "plain.png") is None
    with pytest.raises(DataError, match="holds no embedding"):
        load_embedding(tmp_path / "plain.png")


@pytest.mark.skipif(not features.check("webp"), reason="Pillow without WEBP")
def test_lossless_webp(tmp_path):
    emb = make(16, 3)
    embed_in_png(emb, preview()).save(tmp_path / "e.webp", lossless=True)
    assert_same(load_embedding(tmp_path / "e.webp"), emb)


def test_bad_text_chunk_and_bad_image(tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, "not base64 json!")
    preview().save(tmp_path / "bad.png", pnginfo=info)
    with pytest.raises(DataError) as err:
        read_png_embedding(tmp_path / "bad.png")
    assert str(tmp_path / "bad.png") in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match="not a readable image"):
        load_embedding(tmp_path / "text.png")


def test_sdxl_not_representable(tmp_path):
    emb = Embedding("xl", {"clip_l": torch.zeros(1, 8), "clip_g": torch.zeros(1, 16)})
    with pytest.raises(DataError, match="SDXL"):
        embed_in_png(emb, preview())
    with pytest.raises(DataError, match="safetensors"):
        save_png_embedding(emb, preview(), tmp_path / "xl.png")
    assert not (tmp_path / "xl.png").exists()
