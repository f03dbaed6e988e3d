"""`sdtune builtin dataset`: concept and style datasets as PNG + caption sidecars; unknown names are one line."""

from __future__ import annotations

from typer.testing import CliRunner

from sdtune.cli.main import app
from sdtune.core.errors import SdtuneError


def test_writes_concept_and_style_datasets(tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["builtin", "dataset", "star", str(tmp_path / "star"), "--n", "3"]).exit_code == 0
    assert len(list((tmp_path / "star").glob("*.png"))) == 3
    assert "star" in (tmp_path / "star" / "0000.txt").read_text()
    result = runner.invoke(app, ["builtin", "dataset", "night", str(tmp_path / "night"), "--n", "2"])
    assert result.exit_code == 0 and len(list((tmp_path / "night").glob("*.txt"))) == 2
    tokened = runner.invoke(
        app, ["builtin", "dataset", "teal_heart", str(tmp_path / "th"), "--n", "2", "--token", "<t>"]
    )
    assert tokened.exit_code == 0 and "<t>" in (tmp_path / "th" / "0000.txt").read_text()


def test_unknown_name_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["builtin", "dataset", "hexagon", str(tmp_path / "x")], standalone_mode=False)
    assert isinstance(result.exception, SdtuneError)
    assert str(result.exception) == (
        "concept: unknown 'hexagon'; choose one of teal_heart, star, night (--token is for concepts only)"
    )
    assert not (tmp_path / "x").exists()
