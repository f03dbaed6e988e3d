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

from pydantic import Field, field_validator, model_validator

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


class LoraConfig(RunBase):
    """Train a concept model: low-rank adapters (LoRA family) on the UNet and, optionally, the text encoder(s)."""

    method: Literal["lora"]
    adapter: Literal["lora", "dora", "locon", "loha", "lokr"] = "lora"
    """Adapter kind: lora; dora (LoRA + learned magnitude); locon (LoRA on convolutions too: needs targets: all);
    loha (LyCORIS Hadamard); lokr (LyCORIS Kronecker)."""
    rank: int = Field(8, ge=1, le=1024, examples=[8])
    """Rank (kohya's network_dim): capacity of the adapter. 4-32 for a character or object."""
    alpha: float | None = Field(None, gt=0, examples=[4.0])
    """Scale numerator: the update is scaled by alpha / rank. Empty = rank (scale 1)."""
    conv_rank: int | None = Field(None, ge=1, le=1024, examples=[4])
    """Rank for convolution layers (with targets: all). Empty = rank."""
    conv_alpha: float | None = Field(None, gt=0, examples=[1.0])
    """Alpha for convolution layers. Empty = alpha."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0, examples=[0.1])
    """Dropout on the adapter input (lora/dora/locon) or whole-module dropout (loha/lokr)."""
    targets: Literal["attention", "attention_ff", "all"] = "attention_ff"
    """Which layers get adapters: attention projections; + feed-forward and projections; + convolutions."""
    target_modules: list[str] = Field(default_factory=list, examples=[["to_q", "to_v"]])
    """Explicit layer-name suffixes instead of the preset (e.g. to_q, ff.net.2, q_proj)."""
    train_unet: bool = True
    """Put adapters on the UNet."""
    train_text_encoder: bool = False
    """Put adapters on the text encoder(s) too (both for SDXL)."""
    unet_lr: float | None = Field(None, gt=0, examples=[1e-4])
    """Learning rate of the UNet adapters. Empty = optimizer.lr."""
    text_encoder_lr: float | None = Field(None, gt=0, examples=[5e-5])
    """Learning rate of the text-encoder adapters. Empty = optimizer.lr."""
    file_format: Literal["kohya", "peft"] = "kohya"
    """Output layout: kohya/LyCORIS keys (A1111, ComfyUI, InvokeAI) or PEFT keys (diffusers load_lora_weights)."""
    token: str | None = Field(None, examples=["<my-concept>"])
    """Pivotal tuning: also learn this new word (an embedding) together with the adapters. Write it in the captions
    (or use a template with [name]); it is exported as an embedding file next to the LoRA."""
    num_vectors: int = Field(1, ge=1, le=75, examples=[2])
    """Vectors of the pivotal token."""
    init_text: str = Field("*", examples=["a person"])
    """Initial value of the pivotal token (A1111's rule)."""
    token_lr: float = Field(1e-3, gt=0, examples=[1e-3])
    """Learning rate of the pivotal token."""
    token_train_fraction: float = Field(1.0, gt=0.0, le=1.0, examples=[0.5])
    """Train the pivotal token for this fraction of max_steps, then freeze it (the adapters go on)."""

    @model_validator(mode="after")
    def _consistent(self) -> LoraConfig:
        if self.adapter == "locon" and self.targets != "all" and not self.target_modules:
            raise ValueError("adapter: locon adapts convolutions; set targets: all (or use adapter: lora)")
        if not (self.train_unet or self.train_text_encoder):
            raise ValueError("train_unet: nothing to train; enable train_unet or train_text_encoder")
        if isinstance(self.optimizer.lr, str) and (self.unet_lr or self.text_encoder_lr):
            raise ValueError(
                "optimizer.lr: a rate:step schedule string applies to all adapters; "
                "leave unet_lr and text_encoder_lr empty"
            )
        if self.token is not None and (not self.token or any(c.isspace() or c == "," for c in self.token)):
            raise ValueError(f"token: one word without spaces or commas (got {self.token!r}); e.g. <my-concept>")
        if self.file_format == "peft" and self.adapter in ("loha", "lokr"):
            raise ValueError(f"file_format: diffusers cannot load {self.adapter} files; use file_format: kohya")
        return self


MethodConfig = Annotated[TextualInversionConfig | LoraConfig, Field(discriminator="method")]
METHOD_SCHEMAS: dict[str, type[RunBase]] = {"textual_inversion": TextualInversionConfig, "lora": LoraConfig}
