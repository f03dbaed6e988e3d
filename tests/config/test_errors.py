"""One-line messages for pydantic validation errors (sdtune.config.errors)."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
from pydantic import Field, TypeAdapter, ValidationError, field_validator

from sdtune.config import StrictModel, config_error, format_validation_error
from sdtune.core.errors import ConfigError


class Optimizer(StrictModel):
    name: Literal["adamw", "adamw8bit", "prodigy"] = "adamw"
    """Which optimizer updates the weights."""
    lr: float = Field(1e-4, gt=0, examples=[1e-4])
    """Learning rate."""
    schedule: float | str = Field(1e-4, examples=["0.005:100, 1e-5"])
    """A rate or an AUTOMATIC1111 schedule."""


class Train(StrictModel):
    max_steps: int = Field(1000, ge=1, examples=[1000])
    """How many optimizer steps to train."""
    mixed: bool = False
    """Train in half precision."""
    caption_ext: str = Field(".txt", examples=[".txt"])
    """Extension of caption files."""
    tags: list[str] = Field(default_factory=list, examples=[["a", "b"]])
    """Tags added to every caption."""


class TextualInversion(StrictModel):
    method: Literal["textual_inversion"]
    """The training method."""
    token: str = Field(examples=["<my-concept>"])
    """The word that stands for the new concept in prompts."""
    vectors: int = Field(1, ge=1, le=75, examples=[4])
    """Embedding vectors per token."""
    optimizer: Optimizer = Field(default_factory=Optimizer)
    """Optimizer settings."""
    train: Train | None = None
    """Training length and options."""

    @field_validator("token")
    @classmethod
    def _no_spaces(cls, value: str) -> str:
        if " " in value:
            raise ValueError("the token must be one word, e.g. <my-concept>")
        return value


class Lora(StrictModel):
    method: Literal["lora"]
    """The training method."""
    rank: int = Field(8, ge=1, le=128, examples=[8])
    """LoRA rank."""


Method = Annotated[TextualInversion | Lora, Field(discriminator="method")]


class Project(StrictModel):
    runs: list[Method] = Field(default_factory=list)
    """Runs to train one after the other."""
    named: dict[str, Optimizer] = Field(default_factory=dict)
    """Optimizers by name."""


def message(data: object, schema: object = Method) -> str:
    adapter = schema if isinstance(schema, TypeAdapter) else TypeAdapter(schema)
    with pytest.raises(ValidationError) as info:
        adapter.validate_python(data)
    return format_validation_error(info.value, schema)


def ti(**fields: object) -> dict[str, object]:
    return {"method": "textual_inversion", "token": "<x>", **fields}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (ti(optimizer={"lr": -0.001}), "optimizer.lr: must be > 0 (got -0.001); e.g. 0.0001"),
        (ti(optimizer={"lrr": 0.1}), "optimizer.lrr: unknown key; did you mean 'lr'?"),
        (
            ti(optimizer={"zzz": 1}),
            "optimizer.zzz: unknown key; allowed keys: 'name', 'lr', 'schedule'",
        ),
        (ti(train={"max_steps": "many"}), "train.max_steps: expected an integer (got 'many'); e.g. 1000"),
        (ti(train={"max_steps": 1.5}), "train.max_steps: expected an integer (got 1.5); e.g. 1000"),
        (ti(train={"max_steps": 0}), "train.max_steps: must be >= 1 (got 0); e.g. 1000"),
        (ti(optimizer={"lr": "fast"}), "optimizer.lr: expected a number (got 'fast'); e.g. 0.0001"),
        (ti(train={"mixed": "maybe"}), "train.mixed: expected true or false (got 'maybe')"),
        (ti(train={"caption_ext": 3}), "train.caption_ext: expected a string (got 3); e.g. .txt"),
        (ti(train={"tags": "a"}), 'train.tags: expected a list (got \'a\'); e.g. ["a", "b"]'),
        (ti(train={"tags": ["a", None]}), "train.tags[1]: expected a string (got null)"),
        (ti(train=5), "train: expected a mapping (key: value lines) (got 5)"),
        (
            ti(optimizer={"name": "adam"}),
            "optimizer.name: must be one of 'adamw', 'adamw8bit', 'prodigy' (got 'adam')",
        ),
        (ti(vectors=100), "vectors: must be <= 75 (got 100); e.g. 4"),
        ({"method": "lora", "rank": 0}, "rank: must be >= 1 (got 0); e.g. 8"),
        ({"method": "lora2"}, "method: unknown method 'lora2'; choose one of 'textual_inversion', 'lora'"),
        ({"rank": 4}, "method: required; choose one of 'textual_inversion', 'lora'"),
        ({"method": "textual_inversion"}, "token: required; e.g. <my-concept>"),
        (ti(token="my concept"), "token: the token must be one word, e.g. <my-concept>"),
        # A plain union reports one error per member; users see one message.
        (
            ti(optimizer={"schedule": [1]}),
            "optimizer.schedule: expected a number or a string (got [1]); e.g. 0.005:100, 1e-5",
        ),
    ],
)
def test_message_shapes(data: object, expected: str) -> None:
    assert message(data) == expected


def test_several_errors_are_joined_on_one_line() -> None:
    text = message(ti(optimizer={"lr": 0, "name": "sgd"}, vectors=0))
    assert text == (
        "vectors: must be >= 1 (got 0); e.g. 4; "
        "optimizer.name: must be one of 'adamw', 'adamw8bit', 'prodigy' (got 'sgd'); "
        "optimizer.lr: must be > 0 (got 0); e.g. 0.0001"
    )
    assert "\n" not in text


def test_many_errors_are_capped() -> None:
    data = ti(optimizer={"lr": 0, "name": "sgd", "a": 1, "b": 2}, vectors=0, train={"max_steps": 0, "c": 3})
    text = message(data)
    # Seven errors: the first five are shown, train.max_steps and train.c are summarised.
    assert text.split("; ")[-1] == "and 2 more"
    assert "optimizer.b: unknown key" in text
    assert "train." not in text


def test_locations_in_lists_and_dicts_drop_union_tags() -> None:
    data = {
        "runs": [{"method": "lora", "rank": 500}, {"method": "x"}, ti(optimizer={"lr": -1})],
        "named": {"fast": {"lr": 0}},
    }
    assert message(data, Project) == (
        "runs[0].rank: must be <= 128 (got 500); e.g. 8; "
        "runs[1].method: unknown method 'x'; choose one of 'textual_inversion', 'lora'; "
        "runs[2].optimizer.lr: must be > 0 (got -1); e.g. 0.0001; "
        "named.fast.lr: must be > 0 (got 0); e.g. 0.0001"
    )


def test_type_adapter_is_accepted_as_the_model() -> None:
    adapter = TypeAdapter(Method)
    assert message(ti(optimizer={"lr": -1}), adapter) == "optimizer.lr: must be > 0 (got -1); e.g. 0.0001"


def test_without_a_model_the_raw_location_is_kept() -> None:
    with pytest.raises(ValidationError) as info:
        TypeAdapter(Method).validate_python(ti(optimizer={"lrr": 1}))
    assert format_validation_error(info.value) == "textual_inversion.optimizer.lrr: unknown key"


def test_assignment_errors_are_formatted() -> None:
    optimizer = Optimizer()
    with pytest.raises(ValidationError) as info:
        optimizer.lr = -5.0
    assert format_validation_error(info.value, Optimizer) == "lr: must be > 0 (got -5.0); e.g. 0.0001"


def test_config_error_is_a_one_line_config_error() -> None:
    with pytest.raises(ValidationError) as info:
        TypeAdapter(Method).validate_python({"method": "lora", "rank": "big"})
    error = config_error(info.value, Method)
    assert isinstance(error, ConfigError)
    assert str(error) == "rank: expected an integer (got 'big'); e.g. 8"


def test_long_inputs_are_shortened() -> None:
    text = message(ti(train={"caption_ext": ["x" * 200]}))
    assert text.startswith("train.caption_ext: expected a string (got ['xxxx")
    assert "...)" in text
    assert len(text) < 120


def test_field_docstrings_become_descriptions() -> None:
    # The CLI help and the web UI form read these; StrictModel must keep use_attribute_docstrings on.
    assert Optimizer.model_fields["lr"].description == "Learning rate."
    assert TextualInversion.model_json_schema()["properties"]["token"]["description"].startswith("The word")
