"""Every usage error of every command is one ``error:`` line on stderr with exit 2, never a traceback.

The commands are read from the typer app itself, so a command added later is covered without editing this file.
"""

from __future__ import annotations

import subprocess
import sys
import types
import typing

import pytest
import typer

from sdtune.cli.main import app, main


def _walk(command, path: tuple[str, ...] = ()):
    yield path, command
    for name, sub in sorted((getattr(command, "commands", None) or {}).items()):
        yield from _walk(sub, (*path, name))


ALL = list(_walk(typer.main.get_command(app)))
LEAVES = [(path, cmd) for path, cmd in ALL if not getattr(cmd, "commands", None)]


def _annotation(param) -> object:
    """The Python type of a parameter (``int | None`` -> ``int``)."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if annotation is None:  # click's own parameter types
        name = getattr(getattr(param, "type", None), "name", "")
        return {"integer": int, "float": float}.get(name)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else annotation
    return annotation


def _options(cmd, kind: type) -> list[str]:
    return [
        p.opts[0]
        for p in cmd.params
        if p.param_type_name == "option" and not getattr(p, "is_flag", False) and _annotation(p) is kind
    ]


REQUIRED = [(path, cmd) for path, cmd in LEAVES if any(p.required for p in cmd.params)]
NUMERIC = [(path, opt) for path, cmd in LEAVES for kind in (int, float) for opt in _options(cmd, kind)]


def _ids(cases) -> list[str]:
    return [" ".join(case[0]) + (f" {case[1]}" if isinstance(case[1], str) else "") for case in cases]


def _run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["sdtune", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def _assert_one_error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_the_walk_sees_the_commands():
    paths = {" ".join(path) for path, _ in LEAVES}
    assert {"train", "validate", "generate", "lora merge", "data check", "builtin dataset"} <= paths
    assert len(REQUIRED) >= 10 and len(NUMERIC) >= 10


@pytest.mark.parametrize(("path", "cmd"), ALL, ids=_ids(ALL))
def test_unknown_option_is_one_line(monkeypatch, capsys, path, cmd):
    code, _, err = _run_main(monkeypatch, capsys, *path, "--bogus")
    line = _assert_one_error_line(code, err)
    assert "--bogus" in line


@pytest.mark.parametrize(("path", "cmd"), REQUIRED, ids=_ids(REQUIRED))
def test_missing_argument_is_one_line_naming_it(monkeypatch, capsys, path, cmd):
    code, _, err = _run_main(monkeypatch, capsys, *path)
    line = _assert_one_error_line(code, err)
    first_required = next(p for p in cmd.params if p.required)
    assert first_required.name.lower() in line.lower() or any(o in line for o in first_required.opts)
    assert f"Try 'sdtune {' '.join(path)} --help'" in line


@pytest.mark.parametrize(("path", "option"), NUMERIC, ids=_ids(NUMERIC))
def test_non_number_for_a_number_option_is_one_line(monkeypatch, capsys, path, option):
    code, _, err = _run_main(monkeypatch, capsys, *path, option, "not-a-number")
    line = _assert_one_error_line(code, err)
    assert option in line


def test_unknown_command_is_one_line(monkeypatch, capsys):
    code, _, err = _run_main(monkeypatch, capsys, "trian")
    assert "trian" in _assert_one_error_line(code, err)


GROUPS = [path for path, cmd in ALL if getattr(cmd, "commands", None)]


@pytest.mark.parametrize("group", GROUPS, ids=[" ".join(("sdtune", *g)) for g in GROUPS])
def test_a_bare_group_shows_its_help(monkeypatch, capsys, group):
    code, out, err = _run_main(monkeypatch, capsys, *group)
    assert code == 0, err
    assert "Usage" in out and "Traceback" not in out + err


@pytest.mark.parametrize("word", ["[name]", "[/filewords]", "[red]x[/red]"])
def test_square_brackets_in_an_error_are_printed_literally(monkeypatch, capsys, tmp_path, word):
    code, _, err = _run_main(monkeypatch, capsys, "builtin", "dataset", word, str(tmp_path / "out"))
    line = _assert_one_error_line(code, err)
    assert f"concept: unknown {word!r}" in line


def test_the_real_command_prints_one_line_for_the_reported_cases():
    for args in (["train"], ["train", "--bogus"]):
        result = subprocess.run(
            [sys.executable, "-m", "sdtune.cli.main", *args], capture_output=True, text=True, timeout=120
        )
        line = _assert_one_error_line(result.returncode, result.stderr)
        assert ("Missing argument" in line) if args == ["train"] else ("No such option: --bogus" in line)
