"""``sdtune data check``: every bad file named with the right kind, the exit code, the contact sheet, and a
dataset folder left exactly as it was."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
from bad_corpus import build_corpus, pattern, png_bytes, snapshot
from PIL import Image, ImageEnhance
from typer.testing import CliRunner

from sdtune.cli.main import app
from sdtune.core.errors import DataError
from sdtune.data.check import KINDS, CheckOptions, check_dataset, hamming, perceptual_hash, write_contact_sheet
from sdtune.models.tokenizers import clip_token_counter


@pytest.fixture(scope="module")
def count_tokens():
    return clip_token_counter()


@pytest.fixture
def corpus(tmp_path: Path):
    return build_corpus(tmp_path / "corpus")


def _kinds_by_name(report) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for f in report.findings:
        found.setdefault(f.path.name, set()).add(f.kind)
    return found


def _clean_folder(root: Path, n: int = 3) -> Path:
    root.mkdir()
    for i in range(n):
        pattern(100 + i).save(root / f"img_{i}.png")
        (root / f"img_{i}.txt").write_text(f"a picture number {i}")
    return root


def test_every_kind_is_named_on_its_file(corpus, count_tokens) -> None:
    before = snapshot(corpus.root)
    report = check_dataset(corpus.root, CheckOptions(count_tokens=count_tokens))
    found = _kinds_by_name(report)

    # the exact mapping: every expected kind on its file, nothing else on any file
    expected = {name: kinds for name, kinds in corpus.kinds.items() if kinds}
    assert found == expected
    assert len(set().union(*expected.values())) >= 25
    assert all(name not in found for name in corpus.good)
    # severities follow from what training does: skipped files are errors (hidden ones are not data at all)
    for name in corpus.skipped_by_training - {".hidden.png"}:
        assert {KINDS[k][0] for k in found[name]} == {"error"}, name
    for name in corpus.used_by_training:
        assert all(KINDS[k][0] == "warning" for k in found.get(name, ())), name
    assert report.images_used == len(corpus.used_by_training)
    assert not report.passed()
    assert snapshot(corpus.root) == before  # the check only reads


def test_findings_state_what_training_does(corpus, count_tokens) -> None:
    report = check_dataset(corpus.root, CheckOptions(count_tokens=count_tokens))
    by = {(f.path.name, f.kind): f for f in report.findings}
    assert by[("rgba.png", "alpha")].action == "transparent pixels flattened onto white"
    assert by[("rotated.jpg", "exif_rotated")].action == "rotated upright: turned 90° clockwise"
    assert by[("truncated.png", "truncated")].action == "skipped: truncated file"
    assert by[("no_caption.png", "missing_caption")].action == "caption from the file name: 'no_caption'"
    assert "read as Latin-1: 'café au lait'" in by[("nonutf8.png", "caption_not_utf8")].action
    assert by[("long_caption.png", "caption_too_long")].message.endswith("the window holds 75")
    assert by[("dup_b.png", "exact_duplicate")].message == "same bytes as dup_a.png"
    assert "near_a.png" in by[("near_b.jpg", "near_duplicate")].message
    assert "<= 10" in by[("near_b.jpg", "near_duplicate")].message  # the threshold is shown
    assert by[("wide.png", "extreme_aspect")].action == "the centre square crop keeps 16% of it"
    assert "not read" in by[("anim.gif", "unsupported_format")].action


def test_thresholds_are_options(corpus) -> None:
    report = check_dataset(corpus.root, CheckOptions(min_side=100, max_aspect=10.0, near_duplicate_distance=0))
    found = _kinds_by_name(report)
    assert "too_small" in found["good_a.png"]  # 96 px < 100
    assert "extreme_aspect" not in found.get("wide.png", set())  # 6.25:1 <= 10:1
    assert "caption_too_long" not in found.get("long_caption.png", set())  # no token counter given


def test_unreadable_file_is_an_error(corpus, monkeypatch) -> None:
    """chmod 000 denies reads except to root; the corpus test covers it as a user, this one everywhere."""
    target = corpus.root / "good_a.png"
    real = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    report = check_dataset(corpus.root)
    (finding,) = [f for f in report.findings if f.path == target]
    assert (finding.kind, finding.severity, finding.action) == (
        "unreadable",
        "error",
        "skipped: unreadable: Permission denied",
    )


def test_huge_image_is_reported_without_decoding(tmp_path: Path) -> None:
    # Over Pillow's warning limit (89 MP) but under its error limit: training would decode it; the check must not.
    # The pixel data is missing, so a decode would report "truncated".
    root = tmp_path / "big"
    root.mkdir()
    (root / "huge.png").write_bytes(png_bytes(10_000, 10_000, 8, 0, b"\x00" * 10))
    limit = Image.MAX_IMAGE_PIXELS
    report = check_dataset(root)
    assert Image.MAX_IMAGE_PIXELS == limit
    assert [(f.kind, f.severity) for f in report.findings] == [
        ("huge_image", "warning"),
        ("missing_caption", "warning"),
    ]


def test_perceptual_hash() -> None:
    im = pattern(1)
    h = perceptual_hash(im)
    assert h is not None and h.bit_length() <= 63
    assert hamming(h, perceptual_hash(im.resize((300, 300)))) <= 4
    assert hamming(h, perceptual_hash(ImageEnhance.Brightness(im).enhance(1.1))) <= 6
    assert hamming(h, perceptual_hash(pattern(2))) > 10
    assert perceptual_hash(Image.new("RGB", (50, 50), (9, 9, 9))) is None  # flat: no structure to compare


def test_options_are_validated() -> None:
    with pytest.raises(DataError, match="min side: 0 must be >= 1"):
        CheckOptions(min_side=0)
    with pytest.raises(DataError, match="near-duplicate distance"):
        CheckOptions(near_duplicate_distance=64)


def test_contact_sheet_shows_undecodable_files_as_grey_tiles(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    (root / "a_text.png").write_text("not a picture")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(root / "b_small.png")
    report = check_dataset(root)
    sheet = write_contact_sheet(report, tmp_path / "out" / "sheet.png", tile=100)
    with Image.open(sheet) as im:
        assert im.format == "PNG"
        im = im.convert("RGB")
        assert im.getpixel((6 + 50, 6 + 20)) == (150, 150, 150)  # tile 1: the text file, grey
        assert im.getpixel((6 + 106 + 50, 6 + 50)) == (0, 0, 255)  # tile 2: the small blue picture itself
    assert write_contact_sheet(check_dataset(_clean_folder(tmp_path / "clean")), tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_a_folder_without_usable_images_fails(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    (root / "only.gif").write_bytes(b"GIF89a")
    report = check_dataset(root)
    assert [(f.path, f.kind) for f in report.findings] == [
        (root, "no_images"),
        (root / "only.gif", "unsupported_format"),
    ]
    assert not report.passed() and write_contact_sheet(report, tmp_path / "s.png") is not None  # the gif tile


def test_kohya_and_manifest_sources_are_checked(tmp_path: Path) -> None:
    sub = tmp_path / "train" / "5_teal heart"
    sub.mkdir(parents=True)
    pattern(1).save(sub / "a.png")
    (sub / "broken.png").write_bytes(b"")
    (tmp_path / "train" / "notes").mkdir()
    report = check_dataset(tmp_path / "train")
    assert report.source_kind == "kohya_folders"
    assert {(f.path.name, f.kind) for f in report.findings} == {
        ("a.png", "missing_caption"),
        ("broken.png", "zero_byte"),
        ("notes", "directory"),
    }
    assert "'teal heart'" in next(f.action for f in report.findings if f.kind == "missing_caption")

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "train/5_teal heart/a.png", "caption": "x"}\n{"image": "gone.png"}\n')
    report = check_dataset(manifest)
    assert [(f.path.name, f.kind, f.severity) for f in report.findings] == [("gone.png", "missing", "error")]


# -- the CLI ---------------------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_fails_on_errors_writes_sheet_and_json_and_leaves_the_folder_alone(corpus, tmp_path: Path) -> None:
    before = snapshot(corpus.root)
    sheet, out = tmp_path / "sheet.png", tmp_path / "report.json"
    result = runner.invoke(app, ["data", "check", str(corpus.root), "--sheet", str(sheet), "--json", str(out)])
    assert result.exit_code == 1, result.output
    assert "truncated" in result.output and "fail" in result.output
    with Image.open(sheet) as im:
        im.verify()
        assert im.format == "PNG"
    with Image.open(sheet) as im:
        assert im.width > 100 and im.height > 100 and np.asarray(im.convert("L")).std() > 10
    data = json.loads(out.read_text())
    assert (
        data["passed"] is False
        and data["counts"]["truncated"] == 2
        and data["options"]["near_duplicate_distance"] == 10
    )
    by_name = {Path(f["path"]).name: {x["kind"] for x in f["findings"]} for f in data["files"]}
    assert by_name["long_caption.png"] == {"caption_too_long"}  # the CLI counts tokens with the CLIP tokenizer
    assert snapshot(corpus.root) == before


def test_cli_passes_a_clean_folder_and_strict_fails_on_warnings(tmp_path: Path) -> None:
    clean = _clean_folder(tmp_path / "clean")
    result = runner.invoke(app, ["data", "check", str(clean), "--sheet", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    assert "pass" in result.output and not (tmp_path / "s.png").exists()  # nothing flagged: no sheet
    (clean / "img_0.txt").unlink()  # a warning: missing caption
    assert runner.invoke(app, ["data", "check", str(clean), "--sheet", str(tmp_path / "s.png")]).exit_code == 0
    strict = runner.invoke(app, ["data", "check", str(clean), "--strict", "--sheet", str(tmp_path / "s.png")])
    assert strict.exit_code == 1 and "missing_caption" in strict.output
    assert sorted(p.name for p in clean.iterdir()) == ["img_0.png", "img_1.png", "img_1.txt", "img_2.png", "img_2.txt"]
