"""Where captions come from (A1111 rules) and how they are randomised per step."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from sdtune.core.errors import DataError
from sdtune.data import CaptionOptions, caption_for, process_caption


def test_sidecar_wins_over_file_name(tmp_path: Path) -> None:
    image = tmp_path / "0001-a red circle.png"
    image.touch()
    assert caption_for(image) == "a red circle"
    (tmp_path / "0001-a red circle.txt").write_text("  a blue square\nsmall\n\n", encoding="utf-8")
    assert caption_for(image) == "a blue square, small"
    # The regex applies to file names only, as in A1111.
    assert caption_for(image, filename_word_regex=r"\w{5,}") == "a blue square, small"


def test_sidecar_extension_and_encodings(tmp_path: Path) -> None:
    image = tmp_path / "img.jpg"
    image.touch()
    (tmp_path / "img.caption").write_bytes("\ufeffcaf\u00e9 au lait".encode())  # UTF-8 with BOM
    assert caption_for(image, extension=".caption") == "caf\u00e9 au lait"
    assert caption_for(image, extension="caption") == "caf\u00e9 au lait"  # missing dot tolerated
    assert caption_for(image) == "img"  # no .txt: file name
    (tmp_path / "img.txt").write_bytes("na\u00efve".encode("latin-1"))  # not valid UTF-8
    assert caption_for(image) == "na\u00efve"


def test_empty_sidecar_gives_empty_caption(tmp_path: Path) -> None:
    image = tmp_path / "42 dog.png"
    image.touch()
    (tmp_path / "42 dog.txt").write_text("\n")
    assert caption_for(image) == ""


@pytest.mark.parametrize(
    ("name", "regex", "join", "expected"),
    [
        ("0001-a red circle.png", "", " ", "a red circle"),
        ("12-34 cat.png", "", " ", "cat"),
        ("a 2nd try.png", "", " ", "a 2nd try"),  # only leading numbers go
        ("00012.png", "", " ", ""),
        ("0003-red_circle, big (2).png", r"[a-z]+", " ", "red circle big"),
        ("0003-red_circle.png", r"[a-z]+", "_", "red_circle"),
        ("x1-y2.png", r"([a-z])(\d)", "+", "x+1+y+2"),  # several groups: each group kept
    ],
)
def test_file_name_rules(tmp_path: Path, name: str, regex: str, join: str, expected: str) -> None:
    image = tmp_path / name
    image.touch()
    assert caption_for(image, filename_word_regex=regex, filename_join=join) == expected


def test_invalid_regex_is_data_error(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.touch()
    (tmp_path / "a.txt").write_text("sidecar")  # reported even when the regex would not be used
    with pytest.raises(DataError, match=r"^data.filename_word_regex: '\(\[a-z\]' is not a valid regex"):
        caption_for(image, filename_word_regex="([a-z]")


CAPTION = "sks dog, sitting, on grass, sunny, photo"
TAGS = ["sks dog", "sitting", "on grass", "sunny", "photo"]


class CountingRandom(random.Random):
    """A Random that counts the draws made from it."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.calls = 0

    def random(self) -> float:
        self.calls += 1
        return super().random()

    def getrandbits(self, k: int) -> int:
        self.calls += 1
        return super().getrandbits(k)


def test_all_off_is_identity_and_uses_no_randomness() -> None:
    rng = CountingRandom(0)
    odd = "  tags ,with   odd ,, spacing "
    for caption in (CAPTION, odd, ""):
        assert process_caption(caption, CaptionOptions(), rng) is caption
        assert process_caption(caption, CaptionOptions(keep_tags=3), rng) is caption
    assert rng.calls == 0


def test_caption_dropout_one_gives_empty() -> None:
    rng = random.Random(0)
    options = CaptionOptions(caption_dropout=1.0, shuffle_tags=True, keep_tags=2)
    assert all(process_caption(CAPTION, options, rng) == "" for _ in range(20))


def test_caption_dropout_rate_is_roughly_right() -> None:
    rng = random.Random(1)
    dropped = sum(process_caption(CAPTION, CaptionOptions(caption_dropout=0.25), rng) == "" for _ in range(2000))
    assert 400 < dropped < 600


def test_tag_dropout_one_keeps_only_the_fixed_tags() -> None:
    rng = random.Random(0)
    assert process_caption(CAPTION, CaptionOptions(tag_dropout=1.0, keep_tags=1), rng) == "sks dog"
    assert process_caption(CAPTION, CaptionOptions(tag_dropout=1.0), rng) == ""


def test_keep_tags_keeps_the_prefix_while_shuffling() -> None:
    rng = random.Random(3)
    options = CaptionOptions(shuffle_tags=True, keep_tags=2)
    tails = set()
    for _ in range(30):
        tags = process_caption(CAPTION, options, rng).split(", ")
        assert tags[:2] == TAGS[:2]
        assert sorted(tags[2:]) == sorted(TAGS[2:])
        tails.add(tuple(tags[2:]))
    assert len(tails) > 1  # it really shuffles


def test_shuffle_is_a_permutation_and_normalises_spacing() -> None:
    rng = random.Random(5)
    orders = set()
    for _ in range(30):
        out = process_caption("b ,a,  c,,d ", CaptionOptions(shuffle_tags=True), rng)
        assert sorted(out.split(", ")) == ["a", "b", "c", "d"]
        orders.add(out)
    assert len(orders) > 3


def test_tag_dropout_drops_some_but_keeps_order_without_shuffle() -> None:
    rng = random.Random(7)
    lengths = set()
    for _ in range(50):
        tags = process_caption(CAPTION, CaptionOptions(tag_dropout=0.5), rng).split(", ")
        assert [TAGS.index(t) for t in tags if t] == sorted(TAGS.index(t) for t in tags if t)
        lengths.add(len([t for t in tags if t]))
    assert len(lengths) > 2


def test_seeded_rng_is_deterministic() -> None:
    options = CaptionOptions(shuffle_tags=True, keep_tags=1, tag_dropout=0.3, caption_dropout=0.1)
    a = [process_caption(CAPTION, options, random.Random(42)) for _ in range(3)]
    run1 = [process_caption(CAPTION, options, rng) for rng in [random.Random(9)] for _ in range(40)]
    run2 = [process_caption(CAPTION, options, rng) for rng in [random.Random(9)] for _ in range(40)]
    assert a[0] == a[1] == a[2]
    assert run1 == run2 and len(set(run1)) > 5


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"keep_tags": -1}, "data.keep_tags"),
        ({"tag_dropout": 1.5}, "data.tag_dropout"),
        ({"caption_dropout": -0.1}, "data.caption_dropout"),
    ],
)
def test_invalid_options(kwargs: dict, field: str) -> None:
    with pytest.raises(DataError, match=rf"^{field}: "):
        CaptionOptions(**kwargs)
