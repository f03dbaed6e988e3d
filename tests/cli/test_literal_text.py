"""User text (file names, captions, tags, paths, messages) prints literally: rich would read `[name]` and
`[filewords]` as markup tags and drop them."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from sdtune.cli.main import app
from sdtune.data.images import Skipped
from sdtune.train.recipe import ConsoleReport

runner = CliRunner()


def dataset(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of [name], [filewords], tag{i}\n", encoding="utf-8")
    (folder / "[name].png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


def test_console_report_prints_skipped_files_and_messages_literally():
    out = io.StringIO()
    report = ConsoleReport(Console(file=out, width=200))
    report.skipped(Skipped(Path("data/[name] 1.png"), "cannot decode [bold]"))
    report.log("caption of data/[b]x.png has [filewords] left in it")
    assert out.getvalue().splitlines() == [
        "skipped data/[name] 1.png: cannot decode [bold]",
        "caption of data/[b]x.png has [filewords] left in it",
    ]


def test_data_check_names_a_bracketed_file_literally(tmp_path):
    folder = dataset(tmp_path / "d")
    result = runner.invoke(app, ["data", "check", str(folder), "--sheet", str(tmp_path / "sheet.png")])
    assert result.exit_code == 1, result.output
    assert "[name].png" in result.output


def test_data_tags_shows_bracketed_tags_literally(tmp_path):
    folder = dataset(tmp_path / "d")
    result = runner.invoke(app, ["data", "tags", str(folder)])
    assert result.exit_code == 0, result.output
    assert "[name]" in result.output and "[filewords]" in result.output


def test_data_buckets_names_a_skipped_bracketed_file_literally(tmp_path):
    folder = dataset(tmp_path / "d")
    result = runner.invoke(app, ["data", "buckets", str(folder)])
    assert "skipped [name].png" in result.output, result.output


def test_validate_prints_a_bracketed_config_path_literally(tmp_path):
    path = tmp_path / "[name] run.yaml"
    path.write_text("method: textual_inversion\nname: t\ntoken: <t>\ndata:\n  path: d\n", encoding="utf-8")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert f"ok {path}: method textual_inversion" in result.output
