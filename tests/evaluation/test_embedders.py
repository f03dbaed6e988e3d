"""CLIP and DINOv2 embedders on tiny random models saved like downloaded ones (``scorer_models``)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.core.errors import ConfigError
from sdtune.evaluate.embedders import ClipEmbedder, DinoEmbedder

from .scorer_models import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, tiny_clip_folder, tiny_dino_folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip_folder(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return tiny_dino_folder(tmp_path_factory.mktemp("dino"))


@pytest.fixture(scope="module")
def clip(clip_dir):
    return ClipEmbedder.load(clip_dir)


@pytest.fixture(scope="module")
def dino(dino_dir):
    return DinoEmbedder.load(dino_dir)


def solid(color, size=(40, 56), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def assert_unit_rows(out: torch.Tensor, n: int, d: int) -> None:
    assert out.shape == (n, d) and out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out.norm(dim=1), torch.ones(n))


@pytest.mark.parametrize("which", ["clip", "dino"])
def test_images_are_unit_rows_that_tell_images_apart(which, request):
    embedder = request.getfixturevalue(which)
    d = 16 if which == "clip" else 32  # projection_dim / hidden_size of the tiny models
    red, blue = solid("red"), solid("blue", size=(64, 48))
    out = embedder.images([red, blue, solid("red")])
    assert_unit_rows(out, 3, d)
    torch.testing.assert_close(out[0], out[2])  # the same image twice: the same embedding
    assert (out[0] @ out[1]).item() < 0.99  # red and blue: different ones
    assert embedder.images([]).shape == (0, d)


@pytest.mark.parametrize("which", ["clip", "dino"])
def test_rgba_and_grey_images_are_read_as_rgb(which, request):
    embedder = request.getfixturevalue(which)
    out = embedder.images(
        [
            solid((255, 0, 0, 255), mode="RGBA"),  # opaque red
            solid("red"),
            solid((0, 0, 255, 0), mode="RGBA"),  # fully transparent: white, as training reads it
            solid("white"),
            solid(128, mode="L"),
            solid((128, 128, 128)),
        ]
    )
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out[2], out[3])
    torch.testing.assert_close(out[4], out[5])
    assert (out[1] @ out[3]).item() < 0.99 and (out[3] @ out[5]).item() < 0.999  # ... and the colours still differ


def test_batches_do_not_change_the_embeddings(clip_dir, clip, dino_dir, dino):
    images = [solid(c) for c in ("red", "green", "blue", "yellow", "purple")]
    prompts = ["a red circle", "a blue square", "a green triangle"]
    small_clip = ClipEmbedder.load(clip_dir, batch_size=2)
    torch.testing.assert_close(small_clip.images(images), clip.images(images))
    torch.testing.assert_close(small_clip.texts(prompts), clip.texts(prompts))
    torch.testing.assert_close(DinoEmbedder.load(dino_dir, batch_size=2).images(images), dino.images(images))


def test_texts_are_unit_rows_that_tell_prompts_apart(clip):
    out = clip.texts(["a red circle", "a blue square", "a red circle"])
    assert_unit_rows(out, 3, 16)
    torch.testing.assert_close(out[0], out[2])
    assert (out[0] @ out[1]).item() < 0.99
    assert clip.texts([]).shape == (0, 16)


def test_long_prompts_are_cut_to_the_tokenizer_length(clip):
    assert clip.max_length == 77
    # 300 words: cut to <start> + 75 words + <end>, i.e. the embedding of its first 75 words
    long, first_75, first_74 = clip.texts(["red " * 300, "red " * 75, "red " * 74])
    torch.testing.assert_close(long, first_75)
    assert not torch.allclose(long, first_74)


def reference_pixels(image: Image.Image, short: int, crop: int, mean, std) -> torch.Tensor:
    """CLIP's and DINOv2's preprocessing by hand: shortest edge to ``short`` (bicubic), centre ``crop``, mean/std."""
    w, h = image.size
    scale = short / min(w, h)
    image = image.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BICUBIC)
    left, top = (image.width - crop) // 2, (image.height - crop) // 2
    rgb = np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255
    return torch.from_numpy((rgb - np.float32(mean)) / np.float32(std)).permute(2, 0, 1)


def noise_image(seed: int = 0, size=(41, 57)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_embeddings_are_clips_projections_and_dinos_normed_cls_token(clip, dino):
    image = noise_image()  # not square and not flat: the resize and the crop's offset matter
    pixels = reference_pixels(image, 32, 32, CLIP_MEAN, CLIP_STD)[None]
    torch.testing.assert_close(clip.processor(images=[image], return_tensors="pt")["pixel_values"], pixels)
    with torch.no_grad():
        projected = clip.model.visual_projection(clip.model.vision_model(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(clip.images([image]), torch.nn.functional.normalize(projected, dim=-1))

    pixels = reference_pixels(image, 32, 32, IMAGENET_MEAN, IMAGENET_STD)[None]
    torch.testing.assert_close(dino.processor(images=[image], return_tensors="pt")["pixel_values"], pixels)
    with torch.no_grad():
        cls_token = dino.model(pixel_values=pixels).last_hidden_state[:, 0]  # after the final layer norm
    torch.testing.assert_close(dino.images([image]), torch.nn.functional.normalize(cls_token, dim=-1))


def test_the_folders_preprocessor_config_is_used_and_model_defaults_without_one(clip_dir, dino_dir, tmp_path):
    clip = ClipEmbedder.load(clip_dir)
    assert clip.processor.crop_size["height"] == 32 and clip.processor.size["shortest_edge"] == 32
    dino = DinoEmbedder.load(dino_dir)
    assert dino.processor.crop_size["height"] == 32 and list(dino.processor.image_mean) == IMAGENET_MEAN

    bare_clip = shutil.copytree(clip_dir, tmp_path / "clip")
    (bare_clip / "preprocessor_config.json").unlink()
    processor = ClipEmbedder.load(bare_clip).processor
    assert processor.crop_size["height"] == 224 and processor.size["shortest_edge"] == 224
    assert list(processor.image_mean) == pytest.approx(CLIP_MEAN)
    bare_dino = shutil.copytree(dino_dir, tmp_path / "dino")
    (bare_dino / "preprocessor_config.json").unlink()
    processor = DinoEmbedder.load(bare_dino).processor
    assert processor.size["shortest_edge"] == 256 and processor.crop_size["height"] == 224
    assert list(processor.image_mean) == pytest.approx(IMAGENET_MEAN)


def test_loading_keeps_transformers_off_the_console(clip_dir, dino_dir, capfd):
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    capfd.readouterr()
    ClipEmbedder.load(clip_dir)
    DinoEmbedder.load(dino_dir)
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out
    assert "torchvision" not in captured.err + captured.out
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == (verbosity, bars)  # restored


def bad(load, path, field, *words):
    with pytest.raises(ConfigError) as err:
        load(path, field=field)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{field}: ")
    for word in words:
        assert word in message, message


def test_bad_clip_folders_are_one_line_config_errors(clip_dir, dino_dir, tmp_path):
    load = ClipEmbedder.load
    bad(load, tmp_path / "missing", "eval.clip_model", "does not exist", "CLIPModel.save_pretrained")
    (tmp_path / "file.bin").write_bytes(b"x")
    bad(load, tmp_path / "file.bin", "eval.clip_model", "not a model folder")
    (tmp_path / "empty").mkdir()
    bad(load, tmp_path / "empty", "eval.clip_model", "no config.json")
    bad(load, dino_dir, "eval.clip_model", "not a CLIP model folder", "model_type 'dinov2'")
    no_tokenizer = shutil.copytree(clip_dir, tmp_path / "no_tokenizer")
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (no_tokenizer / name).unlink(missing_ok=True)
    bad(load, no_tokenizer, "eval.clip_model", "has no tokenizer", "save_pretrained")
    no_weights = shutil.copytree(clip_dir, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    bad(load, no_weights, "eval.clip_model", "has no weights")
    bad(load, tmp_path / "missing", "my.field", "does not exist")  # the field is the caller's


def test_bad_dino_folders_are_one_line_config_errors(clip_dir, tmp_path):
    load = DinoEmbedder.load
    bad(load, tmp_path / "missing", "eval.dino_model", "does not exist", "Dinov2Model.save_pretrained")
    (tmp_path / "empty").mkdir()
    bad(load, tmp_path / "empty", "eval.dino_model", "no config.json")
    bad(load, clip_dir, "eval.dino_model", "not a DINOv2 model folder", "model_type 'clip'")
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    bad(load, tmp_path / "pipeline", "eval.dino_model", "diffusers pipeline")
