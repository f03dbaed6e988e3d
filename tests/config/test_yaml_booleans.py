"""YAML 1.1 reads yes/no/on/off as booleans; sdtune's configs read them as the strings the schema documents."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdtune.config import load_train_config, load_yaml
from sdtune.core.errors import ConfigError

BASE = """\
method: textual_inversion
name: t
token: <t>
model:
  base: builtin
data:
  path: data
"""


def write(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(BASE + extra, encoding="utf-8")
    return path


@pytest.mark.parametrize("word", ["no", "fp16", "bf16", "auto"])
def test_mixed_precision_words_in_a_file_are_strings(tmp_path: Path, word: str) -> None:
    cfg = load_train_config(write(tmp_path, f"train:\n  mixed_precision: {word}\n"))
    assert cfg.train.mixed_precision == word


@pytest.mark.parametrize("word", ["no", "bf16"])
def test_mixed_precision_words_in_an_override_are_strings(tmp_path: Path, word: str) -> None:
    cfg = load_train_config(write(tmp_path, ""), [f"train.mixed_precision={word}"])
    assert cfg.train.mixed_precision == word


@pytest.mark.parametrize("word", ["no", "off", "yes", "on", "No", "OFF", "Yes", "y", "n"])
def test_yaml_1_1_boolean_words_stay_strings(tmp_path: Path, word: str) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(f"key: {word}\n", encoding="utf-8")
    assert load_yaml(path) == {"key": word}


@pytest.mark.parametrize(
    ("text", "value"), [("true", True), ("false", False), ("True", True), ("FALSE", False), ("'true'", "true")]
)
def test_true_and_false_are_still_booleans(tmp_path: Path, text: str, value: object) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(f"key: {text}\n", encoding="utf-8")
    assert load_yaml(path) == {"key": value}


@pytest.mark.parametrize(
    ("written", "expected"), [("false", False), ("true", True), ("no", False), ("off", False), ("yes", True)]
)
def test_boolean_fields_take_real_booleans_and_the_words(tmp_path: Path, written: str, expected: bool) -> None:
    from_file = load_train_config(write(tmp_path, f"preview:\n  before_training: {written}\n"))
    from_override = load_train_config(write(tmp_path, ""), [f"preview.before_training={written}"])
    assert from_file.preview.before_training is expected
    assert from_override.preview.before_training is expected


def test_a_wrong_word_still_names_the_field_and_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_train_config(write(tmp_path, "train:\n  mixed_precision: off\n"))
    message = str(info.value)
    assert "train.mixed_precision" in message and "'off'" in message and "no" in message
    assert "\n" not in message
