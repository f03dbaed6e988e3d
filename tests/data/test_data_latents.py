"""The in-memory latent cache: the three sampling modes, mirroring, scaling, and exact reproducibility."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sdtune.data import LatentCache

SF = 0.18215


@pytest.fixture(scope="module")
def vae(tiny_model):
    return tiny_model("sd1").vae


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.rand(5, 3, 16, 16, generator=g) * 2 - 1


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _posterior(vae, x: torch.Tensor):
    with torch.no_grad():
        return vae.encode(x).latent_dist


def test_vae_is_the_expected_tiny_one(vae) -> None:
    assert vae.config.scaling_factor == pytest.approx(SF)


def test_once_is_a_fixed_posterior_sample(vae, images) -> None:
    cache = LatentCache.encode(vae, images, "once", _gen(7), batch_size=16)
    expected = _posterior(vae, images).sample(generator=_gen(7)) * SF
    g = _gen(0)
    state = g.get_state()
    first = cache.get(list(range(5)), g)
    second = cache.get(torch.arange(5), g)
    assert first.shape == (5, 4, 8, 8) and first.dtype == torch.float32 and first.device.type == "cpu"
    torch.testing.assert_close(first, expected)
    assert torch.equal(first, second)
    assert torch.equal(g.get_state(), state), "once without flip must not consume the generator"
    # A sample, not the mean: differs from the deterministic cache.
    assert not torch.allclose(first, _posterior(vae, images).mean * SF)
    assert len(cache) == 5 and cache.encoded_count == 5 and not cache.flip


def test_deterministic_is_the_scaled_mean_regardless_of_batching(vae, images) -> None:
    g = _gen(0)
    state = g.get_state()
    cache = LatentCache.encode(vae, images, "deterministic", _gen(1), batch_size=2)
    out = cache.get([4, 0, 4], g)
    mean = _posterior(vae, images).mean
    torch.testing.assert_close(out, mean[[4, 0, 4]] * SF, rtol=1e-5, atol=1e-6)
    assert torch.equal(g.get_state(), state)
    assert cache.latent_shape == (4, 8, 8)


def test_get_returns_a_copy(vae, images) -> None:
    cache = LatentCache.encode(vae, images, "deterministic", _gen(0))
    batch = cache.get([0], _gen(0))
    batch += 100.0
    assert cache.get([0], _gen(0)).abs().max() < 50


def test_random_resamples_reproducibly(vae, images) -> None:
    cache = LatentCache.encode(vae, images, "random", _gen(0))
    g = _gen(5)
    a, b = cache.get([0, 1], g), cache.get([0, 1], g)
    assert not torch.allclose(a, b), "random mode draws a new sample every get"
    g2 = _gen(5)
    assert torch.equal(cache.get([0, 1], g2), a) and torch.equal(cache.get([0, 1], g2), b)
    # Exactly mean + std * noise, all scaled: the documented use of the generator.
    dist = _posterior(vae, images[:2])
    noise = torch.randn((2, 4, 8, 8), generator=_gen(5))
    torch.testing.assert_close(a, (dist.mean + dist.std * noise) * SF, rtol=1e-4, atol=1e-5)


def test_flip_encodes_mirrors_and_get_picks_them(vae, images) -> None:
    cache = LatentCache.encode(vae, images, "deterministic", _gen(0), flip=True)
    assert cache.encoded_count == 10 and len(cache) == 5 and cache.flip
    orig = _posterior(vae, images).mean * SF
    mirrored = _posterior(vae, torch.flip(images, dims=[3])).mean * SF
    g = _gen(11)
    counts = [0, 0]
    for _ in range(10):
        batch = cache.get(range(5), g)
        for i in range(5):
            is_orig = torch.allclose(batch[i], orig[i], atol=1e-5)
            is_mirror = torch.allclose(batch[i], mirrored[i], atol=1e-5)
            assert is_orig != is_mirror  # each item is exactly one of the two encodings
            counts[is_mirror] += 1
    assert min(counts) >= 10, counts  # 50 draws at p=0.5: both kinds show up
    # Same generator state, same picks.
    assert torch.equal(cache.get([1, 3], _gen(99)), cache.get([1, 3], _gen(99)))


def test_flip_keeps_the_originals_once_samples(vae, images) -> None:
    # Mirrors are encoded after all originals, so turning flip on does not change the originals' samples.
    plain = LatentCache.encode(vae, images, "once", _gen(3)).get(range(5), _gen(0))
    cache = LatentCache.encode(vae, images, "once", _gen(3), flip=True)
    g = _gen(4)
    seen_orig = 0
    for _ in range(6):
        batch = cache.get(range(5), g)
        seen_orig += sum(torch.equal(batch[i], plain[i]) for i in range(5))
    assert 5 <= seen_orig <= 25


def test_scaling_and_shift_factor(vae, images) -> None:
    # A VAE whose config has a shift_factor (as SD3/Flux VAEs do): latents are (z - shift) * scale.
    shifted = SimpleNamespace(
        config={"scaling_factor": 2.0, "shift_factor": 0.5}, encode=vae.encode, parameters=vae.parameters
    )
    cache = LatentCache.encode(shifted, images, "deterministic", _gen(0))
    mean = _posterior(vae, images).mean
    torch.testing.assert_close(cache.get(range(5), _gen(0)), (mean - 0.5) * 2.0, rtol=1e-5, atol=1e-6)
    no_shift = SimpleNamespace(
        config={"scaling_factor": 2.0, "shift_factor": None}, encode=vae.encode, parameters=vae.parameters
    )
    cache = LatentCache.encode(no_shift, images, "deterministic", _gen(0))
    torch.testing.assert_close(cache.get(range(5), _gen(0)), mean * 2.0, rtol=1e-5, atol=1e-6)


def test_bad_arguments(vae, images) -> None:
    cache = LatentCache.encode(vae, images[:2], "deterministic", _gen(0))
    with pytest.raises(IndexError):
        cache.get([2], _gen(0))
    assert cache.get([], _gen(0)).shape == (0, 4, 8, 8)
    with pytest.raises(ValueError, match="mode"):
        LatentCache.encode(vae, images, "sometimes", _gen(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        LatentCache.encode(vae, images[0], "once", _gen(0))


def test_encode_batch_size_shrinks_with_the_image_side() -> None:
    from sdtune.data.latents import ENCODE_PIXEL_BUDGET, encode_batch_size

    assert encode_batch_size(64, 64) == 16  # capped
    assert encode_batch_size(512, 512) == ENCODE_PIXEL_BUDGET // (512 * 512) == 2
    assert encode_batch_size(1024, 1024) == 1
    assert encode_batch_size(4096, 4096) == 1  # never 0
    assert encode_batch_size(768, 512) * 768 * 512 <= ENCODE_PIXEL_BUDGET


@pytest.mark.parametrize("mode", ["once", "random"])
def test_image_files_are_decoded_a_chunk_at_a_time_with_the_same_latents(vae, images, mode) -> None:
    from sdtune.data.latents import ImageFiles

    chunks: list[int] = []
    loaded: list[int] = []

    def load(i: int) -> torch.Tensor:
        loaded.append(i)
        return images[i]

    class Counting(ImageFiles):
        def __getitem__(self, chunk: slice) -> torch.Tensor:
            out = super().__getitem__(chunk)
            chunks.append(out.shape[0])
            return out

    seen: list[tuple[int, int]] = []
    files = Counting(list(range(5)), load, (16, 16))
    progress = lambda done, total: seen.append((done, total))  # noqa: E731
    lazy = LatentCache.encode(vae, files, mode, _gen(5), batch_size=2, flip=True, progress=progress)
    eager = LatentCache.encode(vae, images, mode, _gen(5), batch_size=2, flip=True)
    assert chunks == [2, 2, 1, 2, 2, 1], "originals then mirrored copies, never more than batch_size decoded at once"
    assert sorted(loaded) == sorted(list(range(5)) * 2)
    g1, g2 = _gen(9), _gen(9)
    assert torch.equal(lazy.get(range(5), g1), eager.get(range(5), g2))
    assert seen == [(2, 10), (4, 10), (5, 10), (7, 10), (9, 10), (10, 10)]
