"""The scorer reads rendered scenes back, survives mild degradation and refuses to read junk."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdtune.world import scorer
from sdtune.world.palette import COLOURS, PALETTE
from sdtune.world.scorer import Expectation, Reading, accuracy, matches, score_image
from sdtune.world.shapes import CANVAS, SHAPES, Scene, random_scene, render, symmetry_period

N_SCENES = 500


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    """All shapes and colours, small to large, offset; every other scene at an arbitrary full rotation
    (a generated image need not keep the training tilt range)."""
    rng = np.random.default_rng(2024)
    out = []
    for i in range(N_SCENES):
        s = random_scene(rng)
        if i % 2:
            s = dataclasses.replace(s, angle=float(rng.uniform(0, symmetry_period(s.shape) or 360)))
        out.append(s)
    return out


def degrade(img: Image.Image, rng: np.random.Generator, blur: float = 1.0, sigma: float = 8.0) -> Image.Image:
    """Gaussian blur then additive Gaussian noise (sigma in 0..255 units), like a tiny decoder's output."""
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(blur)), dtype=float)
    arr = arr + rng.normal(0.0, sigma, arr.shape)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, quality: int = 75) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_scenes_cover_every_shape_and_colour(scenes: list[Scene]) -> None:
    assert {s.shape for s in scenes} == set(SHAPES)
    assert {s.fg for s in scenes} == set(COLOURS) and {s.bg for s in scenes} == set(COLOURS)


def test_reads_clean_renders(scenes: list[Scene]) -> None:
    result = accuracy((render(s) for s in scenes), scenes)
    print(f"clean accuracy on {N_SCENES} renders: {result}")
    assert result["n"] == N_SCENES
    assert result["full"] >= 0.98, result


def test_reads_blurred_noisy_renders(scenes: list[Scene]) -> None:
    rng = np.random.default_rng(7)
    result = accuracy((degrade(render(s), rng) for s in scenes), scenes)
    print(f"blur 1 px + noise 8/255 accuracy on {N_SCENES} renders: {result}")
    assert result["full"] >= 0.95, result


def test_reads_jpeg_artefacts(scenes: list[Scene]) -> None:
    rng = np.random.default_rng(8)
    subset = scenes[:200]
    result = accuracy((jpeg(degrade(render(s), rng)) for s in subset), subset)
    print(f"blur + noise + JPEG q75 accuracy on {len(subset)} renders: {result}")
    assert result["full"] >= 0.95, result


def test_correct_readings_are_confident(scenes: list[Scene]) -> None:
    for s in scenes[:100]:
        r = score_image(render(s))
        assert r.shape == s.shape and r.shape_iou >= scorer.MIN_IOU and r.shape_margin > 0
        assert r.bg_agreement > 0.9 and r.foreign < scorer.MAX_FOREIGN


def test_uniform_images_have_no_shape() -> None:
    rng = np.random.default_rng(3)
    colours = [PALETTE[c] for c in COLOURS] + [tuple(rng.integers(0, 256, 3)) for _ in range(10)]
    for rgb in colours:
        flat = np.full((CANVAS, CANVAS, 3), rgb, dtype=np.uint8)
        r = score_image(flat)
        assert r.shape is None and r.fg is None, (rgb, r)
        noisy = score_image(degrade(Image.fromarray(flat), rng))
        assert noisy.shape is None, (rgb, noisy)


def test_uniform_noise_has_no_shape() -> None:
    rng = np.random.default_rng(4)
    for _ in range(20):
        r = score_image(rng.integers(0, 256, (CANVAS, CANVAS, 3)).astype(np.uint8))
        assert r.shape is None, r


def test_two_shapes_mostly_have_no_shape() -> None:
    rng = np.random.default_rng(5)
    unread = 0
    trials = 40
    for i in range(trials):
        bg = COLOURS[i % len(COLOURS)]
        fgs = [c for c in COLOURS if c != bg]
        same_colour = i % 2 == 0  # half same colour (one mask, two blobs), half two colours
        fg1 = fgs[int(rng.integers(len(fgs)))]
        fg2 = fg1 if same_colour else [c for c in fgs if c != fg1][int(rng.integers(len(fgs) - 1))]
        s1, s2 = rng.choice(SHAPES, 2)
        left = np.asarray(render(Scene(str(s1), fg1, bg, 12.0, cx=18.0, cy=32.0)))
        right = np.asarray(render(Scene(str(s2), fg2, bg, 12.0, cx=46.0, cy=32.0)))
        both = np.where(np.arange(CANVAS)[None, :, None] >= CANVAS // 2, right, left)
        unread += score_image(both).shape is None
    assert unread >= 0.9 * trials, f"only {unread}/{trials} two-shape images read as no shape"


def test_input_formats_agree() -> None:
    s = Scene("crescent", "blue", "yellow", 19.0, cx=30.0, cy=35.0, angle=20.0)
    img = render(s)
    readings = [
        score_image(img),
        score_image(np.asarray(img)),
        score_image(np.asarray(img).astype(np.float32) / 255.0),
        score_image(render(s, size=4 * CANVAS)),
        score_image(img.convert("RGBA")),
    ]
    assert all((r.shape, r.fg, r.bg) == ("crescent", "blue", "yellow") for r in readings), readings
    with pytest.raises(ValueError, match="shape"):
        score_image(np.zeros((CANVAS, CANVAS)))
    with pytest.raises(ValueError, match="at least"):
        score_image(np.zeros((4, 4, 3), dtype=np.uint8))


def test_matches_and_accuracy_semantics() -> None:
    reading = Reading(shape="star", fg="red", bg="blue")
    assert matches(reading, Expectation("star", "red", "blue"))
    assert matches(reading, Expectation("star", None, "blue"))  # any colour
    assert not matches(reading, Expectation("star", "green", "blue"))
    assert not matches(reading, Expectation("heart", None, "blue"))
    assert not matches(dataclasses.replace(reading, fg=None), Expectation("star", None, "blue"))
    scenes = [Scene("ring", "red", "blue", 18.0), Scene("square", "white", "black", 18.0)]
    wrong = [scenes[0], dataclasses.replace(scenes[1], shape="hexagon")]
    result = accuracy([render(s) for s in scenes], wrong)
    assert result["full"] == result["shape"] == 0.5 and result["fg"] == result["bg"] == 1.0
    with pytest.raises(ValueError):
        accuracy([], [])
    with pytest.raises(ValueError):
        accuracy([render(scenes[0])], scenes)
    with pytest.raises(ValueError, match="unknown shape"):
        Expectation("blob", None, "red")


def test_template_bank_is_built_once_and_covers_every_shape() -> None:
    bank = scorer._template_bank()
    assert scorer._template_bank() is bank
    _, labels, _ = bank
    assert set(labels.tolist()) == set(range(len(SHAPES)))
