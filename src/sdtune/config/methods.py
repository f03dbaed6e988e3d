"""One schema per training method, joined in a union on `method:`.

A config file names its method; the matching schema validates it::

    method: textual_inversion
    name: my-embedding
    token: <my-concept>
    data: {path: ./datasets/my-concept}
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator

from sdtune.config.base import StrictModel
from sdtune.config.blocks import (
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    PreviewConfig,
    SaveConfig,
    ScheduleConfig,
    TrainConfig,
)


class RunBase(StrictModel):
    name: str = Field(examples=["my-concept"])
    """Run name: the run folder is `<output_dir>/<name>/` and exported files are named after it."""
    output_dir: str = Field("runs", examples=["runs"])
    """Folder that holds run folders."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    save: SaveConfig = Field(default_factory=SaveConfig)
    preview: PreviewConfig = Field(default_factory=PreviewConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,99}", value):
            raise ValueError(f"use letters, digits, '.', '_', '-' or spaces (got {value!r}); e.g. my-concept")
        return value


class TextualInversionConfig(RunBase):
    """Train new token embeddings (textual inversion); the model itself stays frozen."""

    method: Literal["textual_inversion"]
    token: str = Field(examples=["<my-concept>"])
    """The new word to train; use it in prompts. It must not already be in the tokenizer's vocabulary."""
    num_vectors: int = Field(1, ge=1, le=75, examples=[4])
    """Vectors per token (A1111 'Number of vectors per token'): more vectors hold more detail."""
    init_text: str = Field("*", examples=["a red circle"])
    """Initial value: the embeddings of this text, spread over the vectors (A1111's rule). Empty = zeros."""
    init_embedding: str | None = Field(None, examples=["embeddings/start.pt"])
    """Start from (and continue the step count of) an existing embedding file instead of `init_text`."""
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=5e-3))

    @field_validator("token")
    @classmethod
    def _token_is_one_word(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value) or "," in value:
            raise ValueError(f"one word without spaces or commas (got {value!r}); e.g. <my-concept>")
        return value


MethodConfig = Annotated[TextualInversionConfig, Field(discriminator="method")]
METHOD_SCHEMAS: dict[str, type[RunBase]] = {"textual_inversion": TextualInversionConfig}
