"""Tag frequencies and bulk tag edits on real sidecar files: encodings, newlines and dry runs."""

from __future__ import annotations

import codecs
import hashlib
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdtune.cli.main import app
from sdtune.core.errors import DataError
from sdtune.data.tags import TagEdit, edit_folder, edit_text, parse_replace, split_tags, tag_frequencies

LATIN1 = "caf\u00e9, red hat".encode("latin-1")  # not valid UTF-8


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "ds"
    d.mkdir()
    for name in ("a.png", "b.jpg", "c.png", "d.webp", "e.png"):
        (d / name).write_bytes(b"")  # tags never decode images
    (d / "a.txt").write_bytes(b"1girl, red hat, smile\n")
    (d / "b.txt").write_bytes(codecs.BOM_UTF8 + b"1girl,red hat,outdoors\r\n")  # BOM, CRLF, no spaces
    (d / "c.txt").write_bytes(b"cat, smile, cat")  # no final newline; a repeated tag
    (d / "d.txt").write_bytes(LATIN1)
    (d / "orphan.txt").write_bytes(b"not a sidecar")  # no image: not a caption file
    return d


def test_frequencies_count_files_per_tag(folder: Path) -> None:
    counts, read, bad = tag_frequencies(folder)
    assert read == 3 and [p.name for p in bad] == ["d.txt"]
    assert counts == {"1girl": 2, "red hat": 2, "smile": 2, "outdoors": 1, "cat": 1}


@pytest.mark.parametrize(
    ("text", "edit", "expected"),
    [
        ("a, b, c\n", TagEdit(add=("x",)), "x, a, b, c\n"),
        ("a, b, c\n", TagEdit(add=("x", "y"), position="back"), "a, b, c, x, y\n"),
        ("a, b, c\n", TagEdit(add=("b",)), "a, b, c\n"),  # already there
        ("a,b,c\r\n", TagEdit(remove=("b",)), "a,c\r\n"),  # comma style and CRLF kept
        ("a, b, c", TagEdit(replace=(("b", "z"),)), "a, z, c"),  # no final newline added
        ("a, b, z", TagEdit(replace=(("b", "z"),)), "a, z"),  # the new tag was there: one copy stays
        ("a, a, b", TagEdit(remove=("b",)), "a, a"),  # other repeats are not touched
        ("a, b\n  c ,d\n", TagEdit(remove=("a",)), "b\n  c ,d\n"),  # untouched lines stay byte for byte
        ("a\nb, c\n", TagEdit(add=("x",), position="back"), "a\nb, c, x\n"),  # back = end of the last line
        ("", TagEdit(add=("x",)), "x"),
        ("\n", TagEdit(add=("x",)), "x\n"),
        ("a, b", TagEdit(replace=(("a", "b"),), remove=("c",)), "b"),
        ("a, b", TagEdit(replace=(("a", "x"),), add=("a",)), "a, x, b"),  # order: replace, remove, add
    ],
)
def test_edit_text(text: str, edit: TagEdit, expected: str) -> None:
    assert edit_text(text, edit) == expected


def test_split_tags_across_lines() -> None:
    assert split_tags(" a ,b,, \r\nc\n") == ["a", "b", "c"]


def test_edit_folder_writes_and_preserves_encoding_details(folder: Path) -> None:
    os.chmod(folder / "a.txt", 0o640)
    before = snapshot(folder)
    report = edit_folder(folder, TagEdit(add=("masterpiece",), replace=(("red hat", "hat"),)))
    assert report.written and report.files == 4 and [p.name for p in report.not_utf8] == ["d.txt"]
    assert {c.path.name for c in report.changes} == {"a.txt", "b.txt", "c.txt"}
    assert (folder / "a.txt").read_bytes() == b"masterpiece, 1girl, hat, smile\n"
    assert (folder / "b.txt").read_bytes() == codecs.BOM_UTF8 + b"masterpiece,1girl,hat,outdoors\r\n"
    assert (folder / "c.txt").read_bytes() == b"masterpiece, cat, smile, cat"
    assert (folder / "d.txt").read_bytes() == LATIN1  # not UTF-8: untouched
    assert (folder / "orphan.txt").read_bytes() == b"not a sidecar"
    assert (folder / "a.txt").stat().st_mode & 0o777 == 0o640
    after = snapshot(folder)
    assert {n for n in before if before[n] != after[n]} == {"a.txt", "b.txt", "c.txt"}
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    # Running the same edit again changes nothing.
    assert edit_folder(folder, TagEdit(add=("masterpiece",), replace=(("red hat", "hat"),))).changes == []


def test_dry_run_changes_nothing_and_shows_the_diff(folder: Path) -> None:
    before = snapshot(folder)
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    report = edit_folder(folder, TagEdit(remove=("smile",)), dry_run=True)
    assert snapshot(folder) == before
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    assert not report.written
    diffs = {c.path.name: c.diff() for c in report.changes}
    assert set(diffs) == {"a.txt", "c.txt"}
    assert diffs["a.txt"][-2:] == ["-1girl, red hat, smile", "+1girl, red hat"]


def test_bad_edits_are_one_line_errors(folder: Path) -> None:
    with pytest.raises(DataError, match="expected OLD=NEW"):
        parse_replace("cat")
    assert parse_replace(" cat = tabby cat ") == ("cat", "tabby cat")
    with pytest.raises(DataError, match="without commas"):
        TagEdit(add=("a, b",))
    with pytest.raises(DataError, match="position: 'middle' is not front or back"):
        TagEdit(add=("a",), position="middle")
    with pytest.raises(DataError, match="nothing to do"):
        edit_folder(folder, TagEdit())
    with pytest.raises(DataError, match="no such folder"):
        tag_frequencies(folder / "missing")


def test_cli_tags(folder: Path) -> None:
    runner = CliRunner()
    shown = runner.invoke(app, ["data", "tags", str(folder), "--top", "2"])
    assert shown.exit_code == 0, shown.output
    assert "5 tags in 3 caption files" in shown.output and "not UTF-8, skipped d.txt" in shown.output
    assert "outdoors" not in shown.output  # only the top 2

    before = snapshot(folder)
    dry = runner.invoke(app, ["data", "tags", str(folder), "--replace", "smile=grin", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "-1girl, red hat, smile" in dry.output and "+1girl, red hat, grin" in dry.output
    assert "would change 2 of 4 caption files" in dry.output
    assert snapshot(folder) == before

    done = runner.invoke(app, ["data", "tags", str(folder), "--add", "solo", "--position", "back", "--remove", "cat"])
    assert done.exit_code == 0, done.output
    assert "changed 3 of 4 caption files" in done.output
    assert (folder / "c.txt").read_bytes() == b"smile, solo"

    bad = runner.invoke(app, ["data", "tags", str(folder), "--replace", "nope"])
    assert isinstance(bad.exception, DataError)
