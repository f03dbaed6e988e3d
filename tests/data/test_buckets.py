"""Aspect-ratio buckets: the grid, nearest-aspect assignment and its stated error bounds, crops, histograms."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from sdtune.core.errors import DataError
from sdtune.data.buckets import (
    Bucket,
    BucketOptions,
    aspect_error,
    assign_bucket,
    assign_buckets,
    bucket_histogram,
    crop_box,
    grid_aspect_error,
    make_buckets,
    no_upscale_aspect_bound,
    random_center,
)

# The bounds the module docstring states for the default sides (resolution/2 .. 2*resolution), step 64.
STATED_GRID_BOUND = {512: 0.152, 768: 0.102, 1024: 0.077}


def random_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` image sizes with both sides in 64..4096 and aspect 1:4..4:1 (sides drawn log-uniformly)."""
    rng = np.random.default_rng(seed)
    sizes: list[tuple[int, int]] = []
    while len(sizes) < n:
        w, h = np.exp(rng.uniform(math.log(64), math.log(4096), size=2)).round().astype(int)
        if 0.25 <= w / h <= 4.0:
            sizes.append((int(w), int(h)))
    return sizes


SIZES = random_sizes(3000)


def test_default_grid_matches_kohya_rule() -> None:
    options = BucketOptions()
    buckets = make_buckets(options)
    assert (options.area, options.lo, options.hi) == (262144, 256, 1024)
    assert Bucket(512, 512) in buckets and Bucket(256, 1024) in buckets and Bucket(1024, 256) in buckets
    assert Bucket(768, 320) in buckets  # floor(262144 / 768 / 64) * 64 = 320
    assert len(buckets) == 17
    assert [b.aspect for b in buckets] == sorted(b.aspect for b in buckets)
    for b in buckets:
        assert b.width % 64 == 0 and b.height % 64 == 0
        assert 256 <= min(b.width, b.height) and max(b.width, b.height) <= 1024
        assert b.area <= options.area
        assert Bucket(b.height, b.width) in buckets  # both orientations


@pytest.mark.parametrize("resolution", sorted(STATED_GRID_BOUND))
def test_stated_grid_bound_holds_and_is_tight(resolution: int) -> None:
    buckets = make_buckets(BucketOptions(resolution))
    bound = grid_aspect_error(buckets)
    assert bound <= STATED_GRID_BOUND[resolution]
    assert bound > STATED_GRID_BOUND[resolution] - 0.001  # the stated figure is the real worst case
    # An image in the middle of the widest gap really is that far from its bucket.
    logs = sorted(math.log(b.aspect) for b in buckets)
    lo, hi = max(itertools.pairwise(logs), key=lambda pair: pair[1] - pair[0])
    mid = math.exp((lo + hi) / 2)
    err = aspect_error(mid * 1000, 1000, assign_bucket(round(mid * 1000), 1000, buckets, BucketOptions(resolution)))
    assert err == pytest.approx(bound, abs=1e-3)


@pytest.mark.parametrize("resolution", sorted(STATED_GRID_BOUND))
def test_property_every_image_gets_a_valid_nearest_bucket(resolution: int) -> None:
    options = BucketOptions(resolution)
    buckets = make_buckets(options)
    assigned = assign_buckets(SIZES, options)
    for (w, h), bucket in zip(SIZES, assigned, strict=True):
        assert bucket in buckets
        assert bucket.area <= options.area  # sides are rounded down: no rounding allowance needed
        assert bucket.width % options.step == 0 and bucket.height % options.step == 0
        err = aspect_error(w, h, bucket)
        assert err <= STATED_GRID_BOUND[resolution]
        assert err <= min(aspect_error(w, h, b) for b in buckets) + 1e-12  # truly the nearest
    # The vectorised path and the one-image path agree.
    assert [assign_bucket(w, h, buckets, options) for w, h in SIZES[:300]] == assigned[:300]


@pytest.mark.parametrize(("resolution", "step"), [(512, 64), (1024, 64), (512, 32)])
def test_property_no_upscale_fits_inside_the_image(resolution: int, step: int) -> None:
    options = BucketOptions(resolution, step, no_upscale=True)
    worst_large = 0.0
    for (w, h), bucket in zip(SIZES, assign_buckets(SIZES, options), strict=True):
        assert bucket.width <= w and bucket.height <= h  # never upscaled
        assert bucket.area <= options.area
        assert bucket.width % step == 0 and bucket.height % step == 0
        assert max(bucket.width, bucket.height) <= options.hi
        err = aspect_error(w, h, bucket)
        assert err < no_upscale_aspect_bound(w, h, options) + 1e-12
        scale = min(1.0, math.sqrt(options.area / (w * h)))
        if min(w, h) * scale >= 4 * step:
            assert err < math.log(4 / 3)  # the docstring's figure for S >= 4 steps
            worst_large = max(worst_large, err)
    assert worst_large > 0.0


def test_no_upscale_examples() -> None:
    options = BucketOptions(no_upscale=True)
    assert assign_bucket(300, 200, [], options) == Bucket(256, 192)  # small: stays small
    assert assign_bucket(200, 130, [], options) == Bucket(192, 128)
    assert assign_bucket(4096, 1024, [], options) == Bucket(1024, 256)  # large: scaled into the area
    big = assign_bucket(3000, 2000, [], options)
    assert big.area <= 262144 and abs(math.log(big.aspect / 1.5)) < 0.05
    # Without no_upscale the same small image is enlarged into a grid bucket.
    grid = BucketOptions()
    assert assign_bucket(300, 200, make_buckets(grid), grid) == Bucket(640, 384)


def test_examples_of_nearest_aspect() -> None:
    options = BucketOptions()
    buckets = make_buckets(options)
    assert assign_bucket(1000, 700, buckets, options) == Bucket(576, 448)
    assert assign_bucket(300, 1200, buckets, options) == Bucket(256, 1024)
    assert assign_bucket(5000, 100, buckets, options) == Bucket(1024, 256)  # beyond the range: the end bucket
    assert assign_bucket(1920, 1080, buckets, options) == Bucket(640, 384)


def test_crop_box_fills_the_bucket_inside_the_image() -> None:
    bucket = Bucket(512, 512)
    assert crop_box(1024, 512, bucket) == (256.0, 0.0, 768.0, 512.0)
    assert crop_box(1024, 512, bucket, (1.0, 0.5)) == (512.0, 0.0, 1024.0, 512.0)  # clamped at the edge
    assert crop_box(1024, 512, bucket, (0.0, 0.0)) == (0.0, 0.0, 512.0, 512.0)
    left, top, right, bottom = crop_box(300, 1200, Bucket(256, 1024), (0.5, 0.1))
    assert (left, right) == (0.0, 300.0) and top == 0.0 and bottom == pytest.approx(1200.0)
    rng = random.Random(0)
    for _ in range(3000):
        w, h = rng.randint(10, 3000), rng.randint(10, 3000)
        b = Bucket(rng.choice([64, 128, 192, 256, 320, 448]), rng.choice([64, 128, 192, 256, 320, 448]))
        box = crop_box(w, h, b, (rng.random(), rng.choice([0.0, 0.5, 1.0, rng.random()])))
        assert box[0] >= 0 and box[1] >= 0 and box[2] <= w and box[3] <= h  # exactly inside: PIL rejects less
        assert (box[2] - box[0]) / (box[3] - box[1]) == pytest.approx(b.aspect)
        assert box[2] - box[0] == pytest.approx(w) or box[3] - box[1] == pytest.approx(h)  # the largest such box
    with pytest.raises(ValueError):
        crop_box(100, 100, bucket, (1.5, 0.5))


def test_random_center_is_seeded_and_covers_positions() -> None:
    bucket = Bucket(512, 512)
    first = [random_center(2048, 512, bucket, random.Random(7)) for _ in range(2)]
    assert first[0] == first[1]
    lefts = [crop_box(2048, 512, bucket, random_center(2048, 512, bucket, random.Random(s)))[0] for s in range(200)]
    assert min(lefts) >= 0 and max(lefts) <= 1536
    assert min(lefts) < 300 and max(lefts) > 1200  # spread over the whole range, not stuck in the centre


def test_histogram_counts_in_aspect_order() -> None:
    hist = bucket_histogram([Bucket(640, 384), Bucket(512, 512), Bucket(640, 384), Bucket(256, 1024)])
    assert list(hist.items()) == [(Bucket(256, 1024), 1), (Bucket(512, 512), 1), (Bucket(640, 384), 2)]
    assert str(Bucket(640, 384)) == "640x384"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step": 0}, "step: must be a positive multiple of 8"),
        ({"step": 60}, "step: must be a positive multiple of 8"),
        ({"min_side": 250}, "min_side: must be a multiple of the step 64"),
        ({"min_side": 512, "max_side": 448}, "min_side: 512 is above max_side 448"),
        ({"min_side": 576}, "min_side: 576x576 is larger than the target area"),
        ({"resolution": 32}, "resolution: must be at least the step 64"),
    ],
)
def test_bad_options_are_one_line_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message) as info:
        BucketOptions(**kwargs)
    assert "\n" not in str(info.value)


def test_zero_sized_image_is_an_error() -> None:
    options = BucketOptions()
    with pytest.raises(DataError, match="both sides must be positive"):
        assign_buckets([(100, 0)], options)
