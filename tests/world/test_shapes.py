"""Palette, scenes, renderer and captions of the shapes world."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from PIL import Image

from sdtune.world.captions import caption, concept_caption, size_word
from sdtune.world.palette import COLOURS, PALETTE, nearest_colour, srgb_to_lab
from sdtune.world.shapes import (
    CANVAS,
    SHAPES,
    Scene,
    coverage,
    random_scene,
    render,
    shape_mask,
    symmetry_period,
)

REQUIRED_COLOURS = {"red", "green", "blue", "yellow", "purple", "orange", "white", "black", "teal", "pink", "gray"}
REQUIRED_SHAPES = {"circle", "square", "triangle", "diamond", "cross", "star", "heart", "ring", "hexagon", "crescent"}


def test_palette_has_required_colours_far_apart_in_lab() -> None:
    assert REQUIRED_COLOURS <= set(COLOURS)
    lab = srgb_to_lab(np.array([PALETTE[c] for c in COLOURS], dtype=float))
    closest = min(np.linalg.norm(a - b) for a, b in itertools.combinations(lab, 2))
    assert closest >= 30.0, f"two palette colours are only {closest:.1f} CIELAB units apart"


def test_srgb_to_lab_reference_points() -> None:
    # D65 white and black are the ends of the L axis with no chroma.
    white, black = srgb_to_lab([255, 255, 255]), srgb_to_lab([0, 0, 0])
    assert white == pytest.approx([100.0, 0.0, 0.0], abs=0.05)
    assert black == pytest.approx([0.0, 0.0, 0.0], abs=0.05)
    # A mid grey has no chroma and a lightness in between.
    grey = srgb_to_lab([128, 128, 128])
    assert 0 < grey[0] < 100 and abs(grey[1]) < 0.05 and abs(grey[2]) < 0.05


def test_nearest_colour_recovers_names_under_perturbation() -> None:
    rng = np.random.default_rng(0)
    for name in COLOURS:
        exact, dist = nearest_colour(PALETTE[name])
        assert exact == name and dist < 1e-6
        shifted = np.clip(np.array(PALETTE[name]) + rng.normal(0, 6, 3), 0, 255)
        assert nearest_colour(shifted)[0] == name


def test_nearest_colour_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="3 values"):
        nearest_colour([1, 2])


def test_every_shape_exists_and_fits_in_the_unit_circle() -> None:
    assert REQUIRED_SHAPES <= set(SHAPES)
    t = np.linspace(-1.3, 1.3, 521)
    u, v = np.meshgrid(t, t)
    for shape in SHAPES:
        inside = shape_mask(shape, u, v)
        area = inside.mean() * (2.6**2)
        assert area > 0.5, f"{shape} is nearly empty (area {area:.2f})"
        assert not inside[u * u + v * v > 1.0 + 1e-9].any(), f"{shape} pokes out of the unit circle"


@pytest.mark.parametrize("shape", SHAPES)
def test_symmetry_period_is_a_real_symmetry(shape: str) -> None:
    period = symmetry_period(shape)
    base = coverage(Scene(shape, "red", "blue", 22.0, angle=7.0))
    turned = coverage(Scene(shape, "red", "blue", 22.0, angle=7.0 + (period or 33.0)))
    assert np.abs(base - turned).mean() < 0.01
    if period:  # and half the period is not (the period is the smallest one we rely on)
        half = coverage(Scene(shape, "red", "blue", 22.0, angle=7.0 + period / 2))
        assert np.abs(base - half).mean() > 0.01


def test_render_is_deterministic_and_antialiased() -> None:
    scene = Scene("star", "yellow", "purple", 17.3, cx=30.2, cy=34.9, angle=12.5)
    a, b = render(scene), render(scene)
    assert a.mode == "RGB" and a.size == (CANVAS, CANVAS)
    assert a.tobytes() == b.tobytes()
    px = np.asarray(a).reshape(-1, 3)
    fg, bg = np.array(PALETTE["yellow"]), np.array(PALETTE["purple"])
    pure = (px == fg).all(axis=1) | (px == bg).all(axis=1)
    assert (~pure).sum() > 20, "no blended edge pixels: the render is not anti-aliased"
    assert pure.sum() > 0.8 * len(px)


def test_render_scales_with_size() -> None:
    scene = Scene("heart", "red", "white", 20.0, cx=33.0, cy=30.0, angle=-10.0)
    big = render(scene, size=4 * CANVAS).resize((CANVAS, CANVAS), Image.Resampling.BOX)
    diff = np.abs(np.asarray(big, dtype=float) - np.asarray(render(scene), dtype=float))
    assert diff.mean() < 2.0


def test_random_scenes_are_visible_inside_the_frame_and_deterministic() -> None:
    rng = np.random.default_rng(123)
    scenes = [random_scene(rng) for _ in range(300)]
    rng_again = np.random.default_rng(123)
    assert [random_scene(rng_again) for _ in range(300)] == scenes
    assert {s.shape for s in scenes} == set(SHAPES)
    assert {s.fg for s in scenes} == set(COLOURS)
    ring = np.ones((CANVAS, CANVAS), dtype=bool)
    ring[2:-2, 2:-2] = False
    for s in scenes:
        assert s.fg != s.bg
        cov = coverage(s, supersample=2)
        assert cov[ring].max() == 0.0, f"{s} touches the border"
        assert cov.sum() > 150, f"{s} is too small to see"


def test_random_scene_respects_choices_and_rejects_bad_ones() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        s = random_scene(rng, shapes=("ring", "cross"), fg_colours=("red",), bg_colours=("red", "blue"))
        assert s.shape in ("ring", "cross") and (s.fg, s.bg) == ("red", "blue")
    with pytest.raises(ValueError, match="unknown shape 'stra'; choose one of circle"):
        random_scene(rng, shapes=("stra",))
    with pytest.raises(ValueError, match="unknown colour 'grey'"):
        random_scene(rng, fg_colours=("grey",))
    with pytest.raises(ValueError, match="no pair of different colours"):
        random_scene(rng, fg_colours=("red",), bg_colours=("red",))


def test_scene_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="both 'red'"):
        Scene("circle", "red", "red", 15.0)
    with pytest.raises(ValueError, match="choose one of"):
        Scene("oval", "red", "blue", 15.0)
    with pytest.raises(ValueError, match="positive radius"):
        Scene("circle", "red", "blue", 0.0)


def test_captions_name_the_scene_exactly() -> None:
    assert caption(Scene("circle", "red", "blue", 15.0)) == "a red circle on a blue background"
    assert caption(Scene("heart", "orange", "white", 15.0)).startswith("an orange heart")
    rng = np.random.default_rng(9)
    seen = set()
    for _ in range(400):
        s = random_scene(rng)
        text = caption(s, rng)
        seen.add(text.replace(s.fg, "F").replace(s.shape, "S").replace(s.bg, "B"))
        assert f"{s.fg} {s.shape}" in text and re.search(rf"\b{s.bg}\b", text)
        word = size_word(s.size)
        for other in ("small", "large"):
            if other != word:
                assert other not in text.split()
    assert len({re.sub(r"(small|large) ", "", t) for t in seen}) >= 4, "captions do not vary"


def test_concept_caption_uses_the_token_as_subject() -> None:
    text = concept_caption("<teal-heart>", "blue")
    assert text == caption(Scene("heart", "teal", "blue", 18.0)).replace("teal heart", "<teal-heart>")
    rng = np.random.default_rng(1)
    for _ in range(50):
        text = concept_caption("<tok>", "green", rng, size=14.0)
        assert "<tok>" in text and "green" in text and not any(s in text for s in SHAPES)
    with pytest.raises(ValueError, match="unknown colour"):
        concept_caption("<tok>", "navy")
