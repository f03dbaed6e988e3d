"""Held-out concepts stay held out; concept datasets and prompts are deterministic and well formed."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtune.world.concepts import (
    BASE_FG_COLOURS,
    BASE_SHAPES,
    CONCEPTS,
    CORE_FG_COLOURS,
    HELD_OUT_PAIRINGS,
    HELD_OUT_SHAPES,
    TRAIN_BACKGROUNDS,
    Concept,
    base_prompts,
    base_training_examples,
    base_training_scene,
    concept_dataset,
    eval_prompts,
    get_concept,
    is_held_out,
    write_concept_dataset,
)
from sdtune.world.palette import COLOURS
from sdtune.world.scorer import matches, score_image
from sdtune.world.shapes import Scene, render


def _held_out_phrases() -> list[re.Pattern[str]]:
    """Caption patterns that would leak a held-out concept: the shape word, or a held-out pairing's colour
    directly in front of its shape word."""
    patterns = [re.compile(rf"\b{s}s?\b") for s in HELD_OUT_SHAPES]
    patterns += [re.compile(rf"\b{c} {s}s?\b") for s, c in HELD_OUT_PAIRINGS]
    return patterns


def test_held_out_concepts_never_appear_in_base_training() -> None:
    patterns = _held_out_phrases()
    shapes, fgs, bgs = Counter(), Counter(), Counter()
    for scene, text in base_training_examples(5000, seed=11):
        assert not is_held_out(scene), scene
        assert not any(p.search(text) for p in patterns), text
        assert f"{scene.fg} {scene.shape}" in text
        shapes[scene.shape] += 1
        fgs[scene.fg] += 1
        bgs[scene.bg] += 1
    # Everything else is covered: every shape, every colour as foreground and background, and both halves
    # of each held-out pairing with other partners.
    assert set(shapes) == set(BASE_SHAPES) and set(fgs) == set(BASE_FG_COLOURS) == set(COLOURS)
    assert set(bgs) == set(COLOURS)
    pairs = Counter((s.shape, s.fg) for s, _ in base_training_examples(5000, seed=11))
    for shape, fg in HELD_OUT_PAIRINGS:
        assert sum(n for (sh, _), n in pairs.items() if sh == shape) > 300
        assert sum(n for (_, f), n in pairs.items() if f == fg) > 300


def test_curriculum_first_phase_keeps_teal_in_the_background() -> None:
    assert "teal" not in CORE_FG_COLOURS and set(CORE_FG_COLOURS) | {"teal"} == set(COLOURS)
    scenes = [s for s, _ in base_training_examples(2000, seed=5, fg_colours=CORE_FG_COLOURS)]
    assert not any(s.fg == "teal" or is_held_out(s) for s in scenes)
    assert any(s.bg == "teal" for s in scenes)


def test_base_training_is_deterministic() -> None:
    a = list(base_training_examples(50, seed=3))
    assert a == list(base_training_examples(50, seed=3))
    assert a != list(base_training_examples(50, seed=4))
    rng = np.random.default_rng(0)
    assert all(not is_held_out(base_training_scene(rng)) for _ in range(200))


def test_is_held_out_flags_both_kinds() -> None:
    assert is_held_out(Scene("star", "red", "blue", 15.0))
    assert is_held_out(Scene("heart", "teal", "white", 15.0))
    assert not is_held_out(Scene("heart", "red", "teal", 15.0))  # teal background is allowed
    assert not is_held_out(Scene("circle", "teal", "red", 15.0))  # and teal on any other shape


def test_concepts_are_held_out_and_well_formed() -> None:
    assert {"teal_heart", "star"} <= set(CONCEPTS)
    teal_heart, star = CONCEPTS["teal_heart"], CONCEPTS["star"]
    assert (teal_heart.kind, teal_heart.shape, teal_heart.fg) == ("pairing", "heart", "teal")
    assert (star.kind, star.shape, star.fg) == ("shape", "star", None)
    assert teal_heart.shape in BASE_SHAPES and teal_heart.fg in BASE_FG_COLOURS
    assert (teal_heart.shape, teal_heart.fg) in HELD_OUT_PAIRINGS
    assert star.shape in HELD_OUT_SHAPES and set(star.fg_choices()) == set(COLOURS)
    with pytest.raises(ValueError, match="unknown concept 'tealheart'; choose one of teal_heart"):
        get_concept("tealheart")
    with pytest.raises(ValueError, match="unknown concept kind"):
        Concept("x", "heart", "red", "colour")
    with pytest.raises(ValueError, match="pairing needs an fg"):
        Concept("x", "heart", None, "pairing")


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_concept_dataset_is_deterministic_and_on_topic(name: str) -> None:
    concept = CONCEPTS[name]
    data = concept_dataset(name, n=20, seed=0)
    assert len(data) == 20
    assert data == concept_dataset(concept, n=20, seed=0)
    assert data != concept_dataset(concept, n=20, seed=1)
    assert {s.bg for s, _ in data} == set(TRAIN_BACKGROUNDS)
    for scene, text in data:
        assert scene.shape == concept.shape and scene.fg in concept.fg_choices() and scene.fg != scene.bg
        assert f"{scene.fg} {scene.shape}" in text and scene.bg in text
        assert is_held_out(scene)
        # The concept images are readable ground truth: the scorer agrees with the scene.
        r = score_image(render(scene))
        assert (r.shape, r.fg, r.bg) == (scene.shape, scene.fg, scene.bg)
    with pytest.raises(ValueError, match="n=0"):
        concept_dataset(name, n=0)


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_write_concept_dataset_writes_image_caption_pairs(name: str, tmp_path: Path) -> None:
    concept = CONCEPTS[name]
    paths = write_concept_dataset(name, tmp_path / "plain", n=6, seed=2)
    assert len(paths) == 6 and sorted(p.name for p in paths) == [p.name for p in paths]
    assert sorted(x.name for x in (tmp_path / "plain").iterdir()) == sorted(
        [p.name for p in paths] + [p.with_suffix(".txt").name for p in paths]
    )
    for path, (scene, text) in zip(paths, concept_dataset(name, n=6, seed=2), strict=True):
        with Image.open(path) as img:
            assert img.mode == "RGB" and img.size == (64, 64)
            assert np.array_equal(np.asarray(img), np.asarray(render(scene)))
        assert path.with_suffix(".txt").read_text().strip() == text

    token = concept.default_token
    tokened = write_concept_dataset(concept, tmp_path / "token", n=6, seed=2, token=token)
    for path, (scene, _) in zip(tokened, concept_dataset(name, n=6, seed=2), strict=True):
        text = path.with_suffix(".txt").read_text().strip()
        assert token in text and scene.bg in text
        assert not re.search(rf"\b{concept.shape}\b", text.replace(token, ""))
        if concept.kind == "pairing":
            assert concept.words not in text and text.count(token) == 1
        else:
            assert f"{scene.fg} {token}" in text


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_eval_prompts_use_new_backgrounds(name: str) -> None:
    concept = CONCEPTS[name]
    prompts = eval_prompts(name)
    assert len(prompts) >= 8 and len({p.prompt for p in prompts}) == len(prompts)
    seen_bgs = {s.bg for seed in range(3) for s, _ in concept_dataset(name, n=20, seed=seed)}
    for p in prompts:
        e = p.expect
        assert e.bg not in seen_bgs and e.shape == concept.shape and e.fg != e.bg
        assert e.fg in concept.fg_choices()
        assert e.bg in p.prompt and concept.shape in p.prompt
        # The prompt is readable: a faithful rendering of the expectation matches it.
        assert matches(score_image(render(Scene(e.shape, e.fg, e.bg, 18.0))), e)
    tokened = eval_prompts(name, token="<tok>")
    assert [p.expect for p in tokened] == [p.expect for p in prompts]
    assert all("<tok>" in p.prompt and concept.shape not in p.prompt for p in tokened)


def test_base_prompts_are_balanced_deterministic_and_allowed() -> None:
    n_pairs = len(BASE_SHAPES) * len(BASE_FG_COLOURS) - len(HELD_OUT_PAIRINGS)  # 9 x 11 - 1
    prompts = base_prompts(n=n_pairs, seed=0)
    assert len(prompts) == n_pairs and prompts == base_prompts(n=n_pairs, seed=0)
    assert prompts != base_prompts(n=n_pairs, seed=1)
    shapes = Counter(p.expect.shape for p in prompts)
    fgs = Counter(p.expect.fg for p in prompts)
    assert set(shapes) == set(BASE_SHAPES) and max(shapes.values()) - min(shapes.values()) <= 1
    assert set(fgs) == set(BASE_FG_COLOURS) and max(fgs.values()) - min(fgs.values()) <= 1
    assert len({(p.expect.shape, p.expect.fg) for p in prompts}) == n_pairs  # every allowed pair once
    patterns = _held_out_phrases()
    for p in prompts:
        e = p.expect
        assert not is_held_out(Scene(e.shape, e.fg, e.bg, 15.0))
        assert not any(pat.search(p.prompt) for pat in patterns)
        assert f"{e.fg} {e.shape}" in p.prompt and e.bg in p.prompt
    assert len(base_prompts()) == 64


def test_style_dataset_draws_every_scene_on_the_style_background_with_ordinary_captions(tmp_path: Path) -> None:
    from sdtune.world import STYLES, style_dataset, style_eval_prompts, write_style_dataset

    night = STYLES["night"]
    data = style_dataset("night", n=24, seed=0)
    assert data == style_dataset(night, n=24, seed=0) and len(data) == 24
    named_bgs = set()
    for scene, text in data:
        assert scene.bg == night.bg and scene.fg != night.bg and not is_held_out(scene)
        r = score_image(render(scene))
        assert (r.shape, r.fg, r.bg) == (scene.shape, scene.fg, night.bg)
        named = text.split(" on ")[1].split()[-2]  # "... on a blue background" -> the caption's own background
        assert named != night.bg and f"{scene.fg} {scene.shape}" in text
        named_bgs.add(named)
    assert len(named_bgs) >= 5  # the captions keep naming varied backgrounds
    prompts = style_eval_prompts("night", n=32)
    assert len(prompts) == 32 and all(p.expect.bg == night.bg and night.bg not in p.prompt for p in prompts)
    paths = write_style_dataset("night", tmp_path, n=3)
    assert [p.with_suffix(".txt").read_text().strip() for p in paths] == [t for _, t in data[:3]]
