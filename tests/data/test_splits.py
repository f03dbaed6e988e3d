"""Train / validation / test partitions: deterministic, stable when files are added, and what the loader uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtune.config.blocks import DataConfig
from sdtune.core.errors import DataError
from sdtune.data.dataset import ImageCaptionSet
from sdtune.data.sources import Entry
from sdtune.data.splits import split_entries, split_of


def _entries(names: list[str]) -> list[Entry]:
    return [Entry(Path("/data") / n, "c") for n in names]


def test_split_is_deterministic_stable_when_files_are_added_and_seeded():
    names = [f"img_{i:04d}.png" for i in range(1000)]
    first = {n: split_of(n, 3, 0.2, 0.1) for n in names}
    assert first == {n: split_of(n, 3, 0.2, 0.1) for n in names}
    parts = split_entries(_entries(names), 3, 0.2, 0.1)
    assert {e.image.name for e in parts["validation"]} == {n for n, s in first.items() if s == "validation"}
    shares = {s: len(v) / len(names) for s, v in parts.items()}
    assert 0.16 < shares["validation"] < 0.24 and 0.07 < shares["test"] < 0.13, shares
    # adding files never moves an existing one
    more = split_entries(_entries(names + [f"new_{i}.jpg" for i in range(300)]), 3, 0.2, 0.1)
    moved = {e.image.name: s for s, es in more.items() for e in es if e.image.name in first}
    assert moved == first
    # another seed is another partition; class images always train
    assert sum(first[n] != split_of(n, 4, 0.2, 0.1) for n in names) > 200
    reg = split_entries([Entry(Path(n), "c", is_reg=True) for n in names], 3, 0.2, 0.1)
    assert len(reg["train"]) == len(names)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
        (tmp_path / f"{i:02d}.txt").write_text(f"thing {i}")
    return tmp_path


def test_loader_splits_disjointly_and_validation_has_no_repeats(folder: Path, tiny_model) -> None:
    vae = tiny_model("sd1").vae
    cfg = DataConfig(path=str(folder), validation_split=0.3, repeats=1, latent_sampling="deterministic")
    train = ImageCaptionSet.load(cfg, vae, 16, seed=0)
    val = ImageCaptionSet.load(cfg, vae, 16, seed=0, split="validation")
    expected_val = {p.name for p in folder.glob("*.png") if split_of(p.name, 0, 0.3) == "validation"}
    assert expected_val and {p.name for p in val.paths} == expected_val
    assert {p.name for p in train.paths} == {p.name for p in folder.glob("*.png")} - expected_val
    assert val.captions == [f"thing {int(p.stem)}" for p in val.paths]
    # a separate validation folder instead of a split
    other = DataConfig(path=str(folder), validation_path=str(folder), latent_sampling="deterministic")
    assert len(ImageCaptionSet.load(other, vae, 16, seed=0, split="validation")) == 12
    assert len(ImageCaptionSet.load(other, vae, 16, seed=0)) == 12
    with pytest.raises(DataError, match="validation_split"):
        ImageCaptionSet.load(DataConfig(path=str(folder)), vae, 16, seed=0, split="validation")
    tiny = DataConfig(path=str(folder), validation_split=0.001)
    with pytest.raises(DataError, match="data.validation_split: 0.001 of 12 images puts none"):
        ImageCaptionSet.load(tiny, vae, 16, seed=0, split="validation")
