"""Reading YAML configs, --set overrides, validation and writing back (sdtune.config.loading)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import Field, TypeAdapter

from sdtune.config import StrictModel, apply_overrides, dump_yaml, load_config, load_yaml, parse_config
from sdtune.core.errors import ConfigError

SRC = Path(__file__).resolve().parents[2] / "src"


class Optimizer(StrictModel):
    name: Literal["adamw", "prodigy"] = "adamw"
    """Which optimizer updates the weights."""
    lr: float = Field(1e-4, gt=0, examples=[1e-4])
    """Learning rate."""


class Embedding(StrictModel):
    method: Literal["textual_inversion"]
    """The training method."""
    token: str = Field(examples=["<my-concept>"])
    """The word that stands for the concept."""
    init_text: str = Field("*", examples=["a photo of a cat"])
    """Words whose embedding starts the new one."""
    optimizer: Optimizer = Field(default_factory=Optimizer)
    """Optimizer settings."""
    tags: list[str] = Field(default_factory=list, examples=[["cat"]])
    """Tags."""
    output: Path = Field(Path("out"), examples=["out/embeddings"])
    """Where to write results."""


class Lora(StrictModel):
    method: Literal["lora"]
    """The training method."""
    rank: int = Field(8, ge=1, examples=[8])
    """LoRA rank."""


Method = Annotated[Embedding | Lora, Field(discriminator="method")]


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- load_yaml -------------------------------------------------------------------------------------------


def test_load_yaml_reads_a_mapping_and_scientific_notation(tmp_path: Path) -> None:
    path = write(tmp_path, "method: lora\nlr: 1e-4\nother: 2.5E+3\nquoted: '1e-4'\nname: e5\n")
    assert load_yaml(path) == {"method": "lora", "lr": 1e-4, "other": 2500.0, "quoted": "1e-4", "name": "e5"}


def test_load_yaml_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"^config file not found: .*nope\.yaml$"):
        load_yaml(missing)


def test_load_yaml_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder"):
        load_yaml(tmp_path)


def test_load_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "method: lora\noptimizer:\n  lr: [1, 2\nrank: 4\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    text = str(info.value)
    assert text.startswith(f"{path}: invalid YAML at line 4, column 5: ")
    assert "\n" not in text


@pytest.mark.parametrize(
    ("text", "kind"),
    [("- a\n- b\n", "a list"), ("just words\n", "a string"), ("42\n", "a number")],
)
def test_load_yaml_rejects_non_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    assert str(info.value) == (f"{path}: the top level must be a mapping of settings (key: value lines), not {kind}")


def test_load_yaml_rejects_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "# only a comment\n")
    with pytest.raises(ConfigError, match="the file is empty"):
        load_yaml(path)


# --- apply_overrides -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "value"),
    [
        ("x=1e-4", 1e-4),
        ("x=-2E5", -2e5),
        ("x=0.5", 0.5),
        ("x=3", 3),
        ("x=true", True),
        ("x=null", None),
        ("x=", None),
        ("x=[a, b]", ["a", "b"]),
        ("x={a: 1}", {"a": 1}),
        ("x=hello world", "hello world"),
        ("x='1e-4'", "1e-4"),
        ("x=a=b", "a=b"),
        ("x=#ff0000", "#ff0000"),
        ("x=a: b: c", "a: b: c"),
        ("x=0.005:100, 1e-3:1000, 1e-5", "0.005:100, 1e-3:1000, 1e-5"),
        (" x = 7 ", 7),
    ],
)
def test_override_values_are_read_as_yaml(override: str, value: object) -> None:
    result = apply_overrides({}, [override])
    assert result == {"x": value}
    assert type(result["x"]) is type(value)


def test_overrides_create_nested_mappings_without_touching_input() -> None:
    data = {"method": "textual_inversion", "optimizer": {"name": "adamw"}}
    result = apply_overrides(data, ["optimizer.lr=1e-4", "train.data.repeats=10", "method=lora"])
    assert result == {
        "method": "lora",
        "optimizer": {"name": "adamw", "lr": 1e-4},
        "train": {"data": {"repeats": 10}},
    }
    assert data == {"method": "textual_inversion", "optimizer": {"name": "adamw"}}


def test_later_overrides_win() -> None:
    assert apply_overrides({}, ["a.b=1", "a.b=2"]) == {"a": {"b": 2}}


@pytest.mark.parametrize("override", ["optimizer.lr", "=3", ".lr=3", "optimizer..lr=3", "optimizer.=3", ""])
def test_malformed_overrides_show_the_syntax(override: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, [override])
    assert str(info.value) == (f"invalid override {override!r}: expected key=value, e.g. --set optimizer.lr=1e-4")


def test_override_through_a_non_mapping_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({"optimizer": "adamw"}, ["optimizer.lr=1"])
    assert str(info.value) == (
        "invalid override 'optimizer.lr=1': 'optimizer' is a string, not a mapping, so it has no key 'lr'"
    )


# --- parse_config / load_config --------------------------------------------------------------------------


def test_parse_config_with_model_adapter_and_annotation() -> None:
    data = {"method": "lora", "rank": 4}
    assert parse_config(data, Lora) == Lora(method="lora", rank=4)
    assert parse_config(data, TypeAdapter(Method)) == Lora(method="lora", rank=4)
    assert parse_config(data, Method) == Lora(method="lora", rank=4)


def test_parse_config_raises_one_line_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"method": "textual_inversion", "token": "<t>", "optimizer": {"lr": -0.001}}, Method)
    assert str(info.value) == "optimizer.lr: must be > 0 (got -0.001); e.g. 0.0001"


def test_overrides_are_validated_like_file_values(tmp_path: Path) -> None:
    path = write(tmp_path, "method: textual_inversion\ntoken: <cat>\noptimizer:\n  lr: 5.0e-3\n")
    config = load_config(path, ["optimizer.lr=1e-4", "optimizer.name=prodigy"], schema=Method)
    assert isinstance(config, Embedding)
    assert config.optimizer == Optimizer(name="prodigy", lr=1e-4)

    with pytest.raises(ConfigError) as info:
        load_config(path, ["optimizer.lrr=1e-4"], schema=Method)
    assert str(info.value) == f"{path}: optimizer.lrr: unknown key; did you mean 'lr'?"


def test_load_config_reports_unknown_method(tmp_path: Path) -> None:
    path = write(tmp_path, "method: dreambooth2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, schema=Method)
    assert str(info.value) == (
        f"{path}: method: unknown method 'dreambooth2'; choose one of 'textual_inversion', 'lora'"
    )


# --- dump_yaml -------------------------------------------------------------------------------------------


def test_dump_then_load_gives_an_equal_config(tmp_path: Path) -> None:
    config = Embedding(
        method="textual_inversion",
        token="<cat-toy>",
        init_text="1e-4",  # a string that the loader would read as a float unless it is quoted
        optimizer=Optimizer(name="prodigy", lr=1e-5),
        tags=["yes", "null", "3", "x: y"],
        output=Path("out/embeddings"),
    )
    text = dump_yaml(config)
    path = write(tmp_path, text)
    assert load_config(path, schema=Method) == config


def test_dump_keeps_declared_key_order() -> None:
    config = Embedding(method="textual_inversion", token="<t>")
    keys = [line.split(":")[0] for line in dump_yaml(config).splitlines() if not line.startswith(" ")]
    assert keys == ["method", "token", "init_text", "optimizer", "tags", "output"]


# --- import cost -----------------------------------------------------------------------------------------


def test_importing_config_does_not_import_torch() -> None:
    code = "import sys, sdtune.config; print('torch' in sys.modules, 'numpy' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert result.stdout.split() == ["False", "False"]
