"""Dataset sources: plain folders, kohya N_name folders, kohya TOML configs and JSONL manifests, as one list."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sdtune.core.errors import DataError
from sdtune.data.sources import Entry, SourceSetting, load_sources, mix


def _img(path: Path, caption: str | None = None, colour: tuple[int, int, int] = (10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def test_plain_folder_leaves_captions_to_the_data_rules(tmp_path: Path) -> None:
    _img(tmp_path / "b.png", "bee")
    _img(tmp_path / "a.jpg")
    _img(tmp_path / ".c.png")
    _img(tmp_path / "10_sub" / "x.png")  # a folder with images of its own is not a kohya layout
    src = load_sources(tmp_path)
    assert src.kind == "folder" and src.folders == [tmp_path]
    assert src.entries == [
        Entry(tmp_path / "a.jpg", source=tmp_path.name),
        Entry(tmp_path / "b.png", source=tmp_path.name),
    ]
    assert [(s.path.name, s.reason) for s in src.skipped] == [(".c.png", "hidden file")]


def test_kohya_folders_give_repeats_and_class_words(tmp_path: Path) -> None:
    teal = tmp_path / "10_teal heart"
    _img(teal / "a.png", "a teal heart on blue")
    _img(teal / "b.png")
    _img(tmp_path / "3_star" / "s.png")
    _img(tmp_path / "notes" / "n.png")  # no N_ prefix: kohya ignores it
    src = load_sources(tmp_path)
    assert src.kind == "kohya_folders"
    assert src.folders == [teal, tmp_path / "3_star"] or src.folders == [
        tmp_path / "10_teal heart",
        tmp_path / "3_star",
    ]
    assert [(e.image.name, e.caption, e.repeats, e.source, e.is_reg) for e in src.entries] == [
        ("a.png", "a teal heart on blue", 10, "10_teal heart", False),
        ("b.png", "teal heart", 10, "10_teal heart", False),
        ("s.png", "star", 3, "3_star", False),
    ]
    assert src.entries[0].caption_file == teal / "a.txt" and src.entries[1].caption_file is None


def test_kohya_folder_with_zero_repeats(tmp_path: Path) -> None:
    _img(tmp_path / "0_cat" / "a.png")
    with pytest.raises(DataError, match=r"0_cat: a kohya folder with 0 repeats trains nothing; rename it to 1_cat"):
        load_sources(tmp_path)


TOML = """
[general]
caption_extension = ".txt"
shuffle_caption = false
keep_tokens = 1
enable_bucket = false

[[datasets]]
resolution = 512
batch_size = 2

  [[datasets.subsets]]
  image_dir = "train"
  num_repeats = 10
  class_tokens = "sks dog"

  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
  class_tokens = "dog"
  caption_extension = ".caption"

[[datasets]]
num_repeats = 2
  [[datasets.subsets]]
  image_dir = "train"
"""


def test_kohya_toml(tmp_path: Path) -> None:
    _img(tmp_path / "train" / "t1.png", "sks dog on grass")
    _img(tmp_path / "train" / "t2.png")
    _img(tmp_path / "reg" / "r1.png", "ignored: not the subset's .caption extension")
    (tmp_path / "reg" / "r2.png").write_bytes((tmp_path / "reg" / "r1.png").read_bytes())
    (tmp_path / "reg" / "r2.caption").write_text("a dog, sitting")
    config = tmp_path / "dataset.toml"
    config.write_text(TOML)
    src = load_sources(config)
    assert src.kind == "kohya_toml"
    rows = [(e.image.parent.name, e.image.name, e.caption, e.repeats, e.is_reg, e.source) for e in src.entries]
    assert rows == [
        ("train", "t1.png", "sks dog on grass", 10, False, "datasets[0].subsets[0]"),
        ("train", "t2.png", "sks dog", 10, False, "datasets[0].subsets[0]"),
        ("reg", "r1.png", "dog", 1, True, "datasets[0].subsets[1]"),
        ("reg", "r2.png", "a dog, sitting", 1, True, "datasets[0].subsets[1]"),
        # the same folder again in another dataset (allowed, as in kohya); repeats from the dataset level
        ("train", "t1.png", "sks dog on grass", 2, False, "datasets[1].subsets[0]"),
        ("train", "t2.png", None, 2, False, "datasets[1].subsets[0]"),
    ]
    assert set(src.settings) == {
        SourceSetting("[general]", "shuffle_caption", False),
        SourceSetting("[general]", "keep_tokens", 1),
        SourceSetting("[general]", "enable_bucket", False),
        SourceSetting("datasets[0]", "resolution", 512),
        SourceSetting("datasets[0]", "batch_size", 2),
    }


def _toml_error(tmp_path: Path, text: str, make_dir: bool = True) -> str:
    if make_dir:
        _img(tmp_path / "imgs" / "a.png")
    config = tmp_path / "d.toml"
    config.write_text(text)
    with pytest.raises(DataError) as info:
        load_sources(config)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize(
    ("subset", "expected"),
    [
        (
            "num_repeats = 0\nimage_dir = 'imgs'",
            "d.toml: datasets[0].subsets[0].num_repeats: 0 is not a whole number >= 1",
        ),
        ("num_repeats = 3", "d.toml: datasets[0].subsets[0]: image_dir is missing"),
        ("image_dir = 'nope'", "datasets[0].subsets[0].image_dir:"),
        ("image_dir = 'imgs'\nnum_repeat = 3", "datasets[0].subsets[0]: unknown or unsupported key 'num_repeat'"),
        ("image_dir = 'imgs'\ncolor_aug = true", "datasets[0].subsets[0].color_aug: True is not supported by sdtune"),
        ("image_dir = 'imgs'\nshuffle_caption = 'yes'", "shuffle_caption: 'yes' is not true or false"),
        ("image_dir = 'imgs'\ncaption_dropout_rate = 2", "caption_dropout_rate: 2 is not a probability"),
        ("image_dir = 'imgs'\nresolution = 512", "unknown or unsupported key 'resolution'"),  # dataset level only
    ],
)
def test_kohya_toml_bad_subsets(tmp_path: Path, subset: str, expected: str) -> None:
    assert expected in _toml_error(tmp_path, f"[[datasets]]\n[[datasets.subsets]]\n{subset}\n")


def test_kohya_toml_bad_files(tmp_path: Path) -> None:
    assert "not a valid TOML file" in _toml_error(tmp_path, "[[datasets]\n")
    assert "no [[datasets]]" in _toml_error(tmp_path, "[general]\nnum_repeats = 2\n")
    assert "datasets[0]: no [[datasets.subsets]]" in _toml_error(tmp_path, "[[datasets]]\nbatch_size = 1\n")
    assert "unknown top-level key 'dataset'" in _toml_error(tmp_path, "[[dataset]]\n")
    assert "[general]: unknown or unsupported key 'image_dirs'" in _toml_error(
        tmp_path, "[general]\nimage_dirs = 'x'\n"
    )
    with pytest.raises(DataError, match="no such file"):
        load_sources(tmp_path / "missing.toml")


def test_jsonl_manifest(tmp_path: Path) -> None:
    _img(tmp_path / "imgs" / "a.png", "sidecar caption")
    _img(tmp_path / "imgs" / "b.png")
    _img(tmp_path / "masks" / "b.png")
    manifest = tmp_path / "data" / "m.jsonl"
    manifest.parent.mkdir()
    manifest.write_text(
        '{"image": "../imgs/a.png"}\n'
        "\n"
        '{"image": "../imgs/b.png", "caption": "a blue square", "mask": "../masks/b.png", "repeats": 3}\n'
        '{"image": "../imgs/gone.png", "caption": "x"}\n'
        '{"image": "../imgs/b.png", "caption": "class image", "is_reg": true}\n'
        '{"image": "../imgs/a.png", "mask": "../masks/none.png"}\n'
        '{"image": "../imgs/anim.gif"}\n'
    )
    src = load_sources(manifest)
    assert src.kind == "jsonl"
    a, b = (tmp_path / "data" / "../imgs/a.png"), (tmp_path / "data" / "../imgs/b.png")
    assert src.entries == [
        Entry(a, None, None, 1, False, "m.jsonl"),
        Entry(b, "a blue square", tmp_path / "data" / "../masks/b.png", 3, False, "m.jsonl"),
        Entry(b, "class image", None, 1, True, "m.jsonl"),
    ]
    assert [(s.path.name, s.reason) for s in src.skipped] == [
        ("gone.png", "no such file (line 4)"),
        ("a.png", "mask none.png: no such file (line 6)"),
        ("anim.gif", "unsupported format .gif (line 7)"),
    ]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ('{"image": "a.png"}\n{"image": "a.png"\n', r"m.jsonl:2: not valid JSON"),
        ('{"image": "a.png"}\n\n["a.png"]\n', r"m.jsonl:3: expected a JSON object"),
        ('{"image": "a.png", "weight": 2}\n', r"m.jsonl:1: unknown key 'weight'"),
        ('{"caption": "x"}\n', r"m.jsonl:1: no \"image\" key"),
        ('{"image": "a.png", "repeats": 0}\n', r"m.jsonl:1: repeats must be a whole number >= 1, got 0"),
        ('{"image": "a.png", "caption": 5}\n', r"m.jsonl:1: caption must be a string or null"),
        ('{"image": 7}\n', r"m.jsonl:1: image must be a path string"),
    ],
)
def test_jsonl_bad_lines(tmp_path: Path, lines: str, expected: str) -> None:
    _img(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(lines)
    with pytest.raises(DataError, match=expected):
        load_sources(tmp_path / "m.jsonl")


def test_mix_turns_weights_into_repeats(tmp_path: Path) -> None:
    big = [Entry(tmp_path / f"b{i}.png") for i in range(30)]
    small = [Entry(tmp_path / f"s{i}.png", repeats=2) for i in range(3)]  # 6 repeats in all
    mixed = mix([(big, 1.0), (small, 1.0)])
    share = {p: sum(e.repeats for e in mixed if e.image.name.startswith(p)) for p in "bs"}
    assert share == {"b": 30, "s": 30}  # equal weights: equal shares of an epoch
    assert [e.repeats for e in mixed if e.image.name.startswith("s")] == [10, 10, 10]  # relative repeats kept
    mixed = mix([(big, 3.0), (small, 1.0), ([Entry(tmp_path / "z.png")], 0.0)])
    share = {p: sum(e.repeats for e in mixed if e.image.name.startswith(p)) for p in "bsz"}
    assert share["b"] == 3 * share["s"] and share["z"] == 0
    with pytest.raises(DataError, match="weights must be finite and >= 0"):
        mix([(big, -1.0)])
