"""The loader the training recipes call (``ImageCaptionSet.load``): every source, repeats per entry, bad files
skipped by name, and kohya TOML options that must agree with the config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bad_corpus import build_corpus, pattern
from PIL import Image

from sdtune.config.blocks import DataConfig
from sdtune.core.errors import DataError
from sdtune.data.check import check_dataset
from sdtune.data.dataset import ImageCaptionSet, _example_order

RES = 16


@pytest.fixture
def vae(tiny_model):
    return tiny_model("sd1").vae


def _load(vae, path: Path, **data) -> tuple[ImageCaptionSet, list]:
    skipped: list = []
    cfg = DataConfig(path=str(path), latent_sampling="deterministic", **data)
    return ImageCaptionSet.load(cfg, vae, RES, seed=0, report=skipped.append), skipped


def test_training_skips_the_bad_corpus_files_by_name_and_keeps_the_rest(tmp_path: Path, vae) -> None:
    corpus = build_corpus(tmp_path / "corpus")
    data, skipped = _load(vae, corpus.root)
    assert {s.path.name for s in skipped} == corpus.skipped_by_training
    assert {p.name for p in data.paths} == corpus.used_by_training
    assert len(data) == len(corpus.used_by_training) and data.cache.encoded_count == len(data)
    reasons = {s.path.name: s.reason for s in skipped}
    assert reasons["truncated.png"] == "truncated file" and reasons[".hidden.png"] == "hidden file"
    assert reasons["zero.png"] == "empty file" and reasons["bomb.png"] == "too many pixels to decode safely"
    # the check predicts exactly this: its errors (+ hidden files) are what training skips
    report = check_dataset(corpus.root)
    predicted = {f.path.name for f in report.findings if f.severity == "error" or f.kind == "hidden"}
    assert predicted == corpus.skipped_by_training


def test_plain_folder_is_unchanged_one_example_per_image(tmp_path: Path, vae) -> None:
    for i, name in enumerate(["0001-red.png", "b.png", "c.png"]):
        pattern(i).save(tmp_path / name)
    (tmp_path / "b.txt").write_text("one")
    data, skipped = _load(vae, tmp_path)
    assert [p.name for p in data.paths] == ["0001-red.png", "b.png", "c.png"] and skipped == []
    assert data.captions == ["red", "one", "c"]  # sidecar, else the file name without leading digits (A1111)
    assert data.image_index == [0, 1, 2] and data.is_reg == [False] * 3 and data.masks == [None] * 3


def test_kohya_folders_repeat_per_entry_sharing_one_latent(tmp_path: Path, vae) -> None:
    (tmp_path / "3_teal heart").mkdir()
    pattern(1).save(tmp_path / "3_teal heart" / "a.png")
    pattern(2).save(tmp_path / "3_teal heart" / "b.png")
    (tmp_path / "1_star").mkdir()
    pattern(3).save(tmp_path / "1_star" / "s.png")
    (tmp_path / "1_star" / "s.txt").write_text("a yellow star")
    data, _ = _load(vae, tmp_path)
    assert len(data) == 1 + 3 + 3
    names = [p.name for p in data.paths]
    assert names == ["s.png", "a.png", "b.png", "a.png", "b.png", "a.png", "b.png"]  # rounds: distinct first
    assert data.captions[:3] == ["a yellow star", "teal heart", "teal heart"]
    assert data.image_index == [0, 1, 2, 1, 2, 1, 2] and data.cache.encoded_count == 3
    generators = [torch.Generator().manual_seed(0) for _ in range(2)]
    same = data.latents([1, 5], generators)
    assert torch.equal(same[0], same[1])  # repeats of one image share its cached latent
    assert not torch.equal(data.latents([2], generators[:1])[0], same[0])


def test_uncached_latents_follow_the_image_index(tmp_path: Path, vae) -> None:
    (tmp_path / "2_x").mkdir()
    pattern(1).save(tmp_path / "2_x" / "a.png")
    pattern(2).save(tmp_path / "2_x" / "b.png")
    data, _ = _load(vae, tmp_path, cache_latents=False)
    assert data.images is not None and data.images.shape[0] == 2
    out = data.latents([2, 0], [torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)])
    assert torch.equal(out[0], out[1])  # example 2 is image 0 again; same generator seed: same latent


def test_example_order() -> None:
    assert _example_order([1, 1, 1]) == [0, 1, 2]
    assert _example_order([2, 1, 3]) == [0, 1, 2, 0, 2, 2]
    assert _example_order([]) == []


def test_jsonl_manifest_carries_captions_masks_and_class_images(tmp_path: Path, vae) -> None:
    pattern(1).save(tmp_path / "a.png")
    pattern(2).save(tmp_path / "b.png")
    Image.new("L", (96, 96), 255).save(tmp_path / "b_mask.png")
    (tmp_path / "a.txt").write_text("from the sidecar")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"image": "a.png"}\n'
        '{"image": "b.png", "caption": "a dog", "mask": "b_mask.png", "repeats": 2}\n'
        '{"image": "a.png", "caption": "a dog, class", "is_reg": true}\n'
        '{"image": "missing.png"}\n'
    )
    data, skipped = _load(vae, manifest)
    assert data.captions == ["from the sidecar", "a dog", "a dog, class", "a dog"]
    assert data.masks == [None, tmp_path / "b_mask.png", None, tmp_path / "b_mask.png"]
    assert data.is_reg == [False, False, True, False]
    assert data.image_index == [0, 1, 0, 1] and data.cache.encoded_count == 2
    assert [(s.path.name, s.reason) for s in skipped] == [("missing.png", "no such file (line 4)")]


def _toml_dataset(tmp_path: Path, extra: str) -> Path:
    (tmp_path / "imgs").mkdir(exist_ok=True)
    pattern(1).save(tmp_path / "imgs" / "a.png")
    config = tmp_path / "d.toml"
    config.write_text(f"[general]\n{extra}\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'imgs'\nnum_repeats = 4\n")
    return config


def test_toml_options_must_agree_with_the_config(tmp_path: Path, vae) -> None:
    config = _toml_dataset(tmp_path, "shuffle_caption = true\nresolution = 16")
    with pytest.raises(DataError) as info:
        _load(vae, config)
    message = str(info.value)
    assert "[general] sets shuffle_caption = true, but data.shuffle_tags is false" in message
    assert "set data.shuffle_tags: true" in message
    data, _ = _load(vae, config, shuffle_tags=True)
    assert len(data) == 4 and data.captions == ["a"] * 4  # no caption file, no class_tokens: the file name

    config = _toml_dataset(tmp_path, "resolution = [512, 768]")
    with pytest.raises(DataError, match=r"sets resolution = \[512, 768\]; sdtune's resolution is one side"):
        _load(vae, config)
    config = _toml_dataset(tmp_path, "resolution = 32")
    with pytest.raises(DataError, match=r"trains at 16 px; set data.resolution: 32 or remove resolution"):
        _load(vae, config)


def test_empty_and_unusable_sources(tmp_path: Path, vae) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        _load(vae, tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_text("no")
    with pytest.raises(DataError, match=r"none of the 1 image files can be used, e.g. x.png: not an image"):
        _load(vae, tmp_path / "bad")
