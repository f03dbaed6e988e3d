"""Shipped and custom prompt templates: loading, rendering, and the errors users can hit."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from sdtune.core.errors import DataError
from sdtune.data import TEMPLATE_SETS, Templates, load_templates


@pytest.mark.parametrize("name", TEMPLATE_SETS)
def test_shipped_sets_load(name: str) -> None:
    templates = load_templates(name, require_name=name != "filewords")
    assert templates.source == name
    assert len(set(templates.lines)) == len(templates.lines)  # no duplicate lines skewing the draw
    if name == "filewords":  # the captions alone (they carry the token themselves)
        assert templates.lines == ("[filewords]",)
        return
    assert all("[name]" in line for line in templates.lines)
    if name == "none":
        assert templates.lines == ("[name]",)
    else:
        assert 15 <= len(templates.lines) <= 25
    if name.endswith("_filewords"):
        assert all("[filewords]" in line for line in templates.lines)
    else:
        assert not any("[filewords]" in line for line in templates.lines)


def test_every_shipped_line_renders_cleanly() -> None:
    # An empty caption must never leave stray commas or double spaces, in any shipped line.
    for name in TEMPLATE_SETS:
        for line in load_templates(name, require_name=False).lines:
            one = Templates((line,), "test")
            for filewords in ("", "a red ball, grass"):
                out = one.render("sks", filewords, random.Random(0))
                assert ("sks" in out or "[name]" not in line) and "[" not in out
                assert "  " not in out and ", ," not in out and not out.startswith(",") and not out.endswith(",")
                if "[filewords]" in line:
                    assert filewords in out


def test_render_replaces_and_tidies() -> None:
    t = Templates(("a photo of [name], [filewords]",), "test")
    rng = random.Random(0)
    assert t.render("sks", "on a table", rng) == "a photo of sks, on a table"
    assert t.render("sks", "", rng) == "a photo of sks"
    t = Templates(("[filewords],  [name]  style, [filewords]",), "test")
    assert t.render("sks", "", rng) == "sks style"
    # Replacement is one pass: a caption mentioning "[name]" is not expanded.
    assert Templates(("[name]: [filewords]",), "t").render("sks", "see [name]", rng) == "sks: see [name]"


def test_render_picks_lines_with_the_rng() -> None:
    t = load_templates("subject")
    a = [t.render("x", "", random.Random(4)) for _ in range(3)]
    assert len(set(a)) == 1
    rng = random.Random(11)
    seen = {t.render("x", "", rng) for _ in range(200)}
    assert len(seen) == len(t.lines)


def test_custom_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.txt"
    path.write_text("# my templates\n\n  a sketch of [name]  \n[filewords] only\n", encoding="utf-8")
    t = load_templates(str(path))
    assert t.lines == ("a sketch of [name]", "[filewords] only")
    assert t.source == str(path)


def test_custom_file_without_name_is_allowed_when_not_required(tmp_path: Path) -> None:
    path = tmp_path / "captions_only.txt"
    path.write_text("[filewords]\n")
    assert load_templates(str(path), require_name=False).lines == ("[filewords]",)


def test_unknown_set(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_templates("subjekt")
    message = str(info.value)
    assert message.startswith("data.template: 'subjekt' is neither a shipped set (subject, style, ")
    assert "nor a file" in message and "did you mean 'subject'" in message


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("# only a comment\n\n   \n")
    with pytest.raises(DataError, match=r"empty.txt: no templates"):
        load_templates(str(path))


def test_file_without_name(tmp_path: Path) -> None:
    path = tmp_path / "noname.txt"
    path.write_text("a photo, [filewords]\na picture\n")
    with pytest.raises(DataError) as info:
        load_templates(str(path))
    why = "no line contains [name], so the new token would never appear in a prompt"
    assert str(info.value) == f"{path}: {why}; add [name] to the templates"


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\u00e9 [name]\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8"):
        load_templates(str(path))
