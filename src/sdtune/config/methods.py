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
from sdtune.config.block_weights import BlockWeights, check_block_weights, parse_block_weights
from sdtune.config.blocks import (
    DataConfig,
    EvalConfig,
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
    eval: EvalConfig | None = None
    """Evaluation while training (fidelity, drift, the best step, early stop); see `EvalConfig`. None = off."""

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,99}", value):
            raise ValueError(f"use letters, digits, '.', '_', '-' or spaces (got {value!r}); e.g. my-concept")
        return value

    @model_validator(mode="after")
    def _eval_fits_run(self) -> RunBase:
        e, steps = self.eval, self.train.max_steps
        if e is not None and e.every_n_steps > steps:
            raise ValueError(
                f"eval.every_n_steps: {e.every_n_steps} is more than train.max_steps ({steps}), so only the start and "
                f"the end would be evaluated; set it to at most {steps} (e.g. {max(1, steps // 5)})"
            )
        return self

    @model_validator(mode="after")
    def _schedule_fits_prediction(self) -> RunBase:
        kind = self.model.prediction_type
        if self.train.zero_terminal_snr and kind != "v_prediction":
            raise ValueError(
                f"train.zero_terminal_snr: needs model.prediction_type: v_prediction (got {kind}); the noise cannot "
                "be predicted from pure noise at SNR 0. Set model.prediction_type: v_prediction or turn it off"
            )
        return self


class WeightAverageFields(StrictModel):
    """The EMA fields shared by the methods that can average their trained weights."""

    ema: bool = False
    """Keep an exponential moving average of the trained weights (diffusers' EMAModel); previews show it and it is
    what is exported. Costs one more copy of the trained weights in memory and in checkpoints."""
    ema_decay: float = Field(0.9999, gt=0.0, lt=1.0, examples=[0.9999])
    """EMA decay per step: the average spans about 1 / (1 - decay) steps. It ramps up as (1 + t) / (10 + t) first;
    for short runs use 0.99-0.999."""

    @model_validator(mode="after")
    def _one_average(self):
        if self.ema and self.optimizer.name == "schedulefree_adamw":  # the mixin always sits beside RunBase
            raise ValueError(
                "ema: schedulefree_adamw already averages the weights it exports; set ema: false "
                "(or use optimizer.name: adamw)"
            )
        return self


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


def _word_in(word: str, text: str) -> bool:
    """``word`` occurs in ``text`` as a whole word (not inside a longer word)."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def _class_prompt_error(class_prompt: str, token: str, field: str, example: str | None = None) -> str:
    """The message for a class prompt that names the instance token (the class images would teach the token)."""
    example = example or " ".join(re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", " ", class_prompt).split())
    return (
        f"{field}: contains the instance token {token!r} (got {class_prompt!r}); describe the class without it, "
        f"e.g. {example or 'a dog'}"
    )


class DreamBoothData(StrictModel):
    """DreamBooth prior preservation for a concept model: class images of `class_prompt` (made by the base model
    when fewer than `num_class_images` exist) train beside the instance images, with their own loss weight."""

    class_prompt: str = Field(examples=["a heart"])
    """What the subject is an instance of, without the trigger word (e.g. `a dog` for `a sks dog`)."""
    prior_loss_weight: float = Field(1.0, ge=0.0, examples=[1.0])
    """Weight of the class images' loss: loss = instance loss + prior_loss_weight x class loss."""
    num_class_images: int = Field(100, ge=1, le=100_000, examples=[100])
    """Class images to train with; missing ones are generated once with the base model (preview sampler, steps,
    cfg_scale and negative prompt; image i with seed i) and reused by later runs."""
    class_data_dir: str | None = Field(None, examples=["class-images/heart"])
    """Folder of class images (yours, or generated ones as PNG + .txt). Empty = `<output_dir>/<name>/class_images`."""


class PreservationConfig(StrictModel):
    """Prior-prediction regularisation: on regularisation samples the trained model must predict what the frozen
    base model predicts (its adapters switched off, or a frozen copy of the weights), so what it drew before is
    kept. Regularisation images (`images`, or rendered once by the base model from `prompts`) with their
    captions; and/or the trigger-free variant (`trigger`): each training image with the trigger word removed from
    its caption. Each extra sample costs a training sample plus one no-grad forward pass of the base model."""

    images: str | None = Field(None, examples=["reg-images/shapes"])
    """Folder of regularisation images, each captioned by its `.txt` sidecar (or the prompt it was rendered
    from). With `prompts`, also where the rendered ones are kept. Empty = `<output_dir>/<name>/preservation_images`."""
    prompts: list[str] | None = Field(None, examples=[["a red circle on a blue background"]])
    """Prompts the base model renders regularisation images of (in turn, image i with seed i, preview sampler)
    until the folder holds `num_images`; reused by later runs."""
    num_images: int = Field(40, ge=1, le=100_000, examples=[40])
    """Regularisation images to train with (the first by name)."""
    weight: float = Field(1.0, ge=0.0, examples=[1.0])
    """Loss = training loss + weight x regularisation loss (the mean over regularisation samples)."""
    ratio: float = Field(1.0, gt=0.0, le=8.0, examples=[0.5])
    """Regularisation samples per training sample in every batch (rounded up; 0.5 with batch 4 = 2)."""
    unconditional: float = Field(0.0, ge=0.0, le=1.0, examples=[0.25])
    """Fraction of the regularisation samples trained with the empty prompt instead of their caption, so the
    unconditional prediction (what classifier-free guidance subtracts, amplified by the CFG scale) is kept too."""
    trigger: str | None = Field(None, examples=["sks"])
    """The trigger-free variant (ai-toolkit's Differential Output Preservation): each training sample is repeated
    with this word removed from its prompt, and must then predict what the base model predicts."""
    trigger_weight: float = Field(1.0, ge=0.0, examples=[1.0])
    """Loss weight of the trigger-free samples (as `weight`)."""

    @model_validator(mode="after")
    def _something(self) -> PreservationConfig:
        if self.trigger is None and not self.images and not self.prompts:
            raise ValueError(
                "preservation: give images (a folder of regularisation images), prompts (the base model renders "
                "them) or trigger (the trigger-free variant); or remove the preservation block"
            )
        if self.trigger is not None and (not self.trigger.strip() or "," in self.trigger):
            raise ValueError(f"preservation.trigger: a word or phrase without commas (got {self.trigger!r}); e.g. sks")
        if self.prompts is not None and not [p for p in self.prompts if p.strip()]:
            raise ValueError("preservation.prompts: empty; give at least one prompt or remove prompts")
        return self

    @property
    def has_images(self) -> bool:
        return bool(self.images or self.prompts)


_BLOCK_OPTIONS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_dims", "block_alphas")
DEFAULT_BLOCK_SIZE = {"oft": 8, "boft": 16}  # block_size when empty (LoraConfig.block_size says why)


class LoraConfig(WeightAverageFields, RunBase):
    """Train a concept model: low-rank adapters (LoRA family) on the UNet and, optionally, the text encoder(s)."""

    method: Literal["lora"]
    adapter: Literal["lora", "dora", "locon", "loha", "lokr", "oft", "boft"] = "lora"
    """Adapter kind: lora; dora (LoRA + learned magnitude); locon (LoRA on convolutions too: needs targets: all);
    loha (LyCORIS Hadamard); lokr (LyCORIS Kronecker); oft (LyCORIS diag-OFT: a learned rotation of each layer's
    output channels, in blocks); boft (LyCORIS BOFT: the rotation built from butterfly factors). oft and boft have no
    rank: block_size sets their size (A1111 loads oft; ComfyUI loads both)."""
    rank: int = Field(8, ge=1, le=1024, examples=[8])
    """Rank (kohya's network_dim): capacity of the adapter. 4-32 for a character or object. Not for oft/boft."""
    alpha: float | None = Field(None, gt=0, examples=[4.0])
    """Scale numerator: the update is scaled by alpha / rank. Empty = rank (scale 1). Not for oft/boft."""
    conv_rank: int | None = Field(None, ge=1, le=1024, examples=[4])
    """Rank for convolution layers (with targets: all). Empty = rank. Not for oft/boft."""
    conv_alpha: float | None = Field(None, gt=0, examples=[1.0])
    """Alpha for convolution layers. Empty = alpha. Not for oft/boft."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0, examples=[0.1])
    """Dropout on the adapter input (lora/dora/locon) or whole-module dropout (loha/lokr/oft/boft)."""
    block_size: int | None = Field(None, ge=2, le=1024, examples=[8])
    """oft/boft: block size (LyCORIS' network_dim for diag-oft and boft). oft: every adapted layer's output channels
    are rotated in blocks of exactly this many, so it must divide each layer's width; bigger = more freedom, more
    parameters. boft: the largest block size; each layer takes the largest even size up to it that splits its width
    into a power-of-two number of blocks (LyCORIS' rule; SD 1.5/SDXL widths are 5 x 2^k in the UNet and 3 x 2^k in
    CLIP-L, so 16 gives blocks of 10 and 12 there, 8 none in the UNet). Empty = 8 for oft, 16 for boft."""
    constraint: float | None = Field(None, gt=0, examples=[1e-3])
    """oft/boft: COFT (LyCORIS' constraint, kohya OFT's network_alpha): the rotation's skew-symmetric generator Q is
    scaled down whenever its norm exceeds constraint x the layer's width, bounding how far the model can move.
    Empty = unconstrained."""
    rescaled: bool = False
    """oft/boft: also learn a scale per output channel after the rotation (LyCORIS' rescaled). ComfyUI ignores it
    for oft (its oft.py never applies it; the export warns)."""
    butterfly_factors: int | None = Field(None, ge=1, le=16, examples=[2])
    """boft: number of butterfly factors (PEFT's boft_n_butterfly_factor). Empty = all, log2(width / block) + 1 per
    layer: what LyCORIS builds, and the only layout its own loader reads; fewer = cheaper, sparser rotations that
    ComfyUI applies too."""
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
    dreambooth: DreamBoothData | None = None
    """LoRA-DreamBooth: also train on class images with prior preservation (see the block's fields). Empty = off."""
    preservation: PreservationConfig | None = None
    """Prior-prediction regularisation against the base model (see the block's fields). Empty = off."""
    fp8_base: bool = False
    """Hold the frozen UNet's linear layers (attention, feed-forward, projections) in float8 with one scale per
    row, computed in the run's bf16/fp16 (kohya's `--fp8_base`; torchao's weight-only float8, `pip install
    torchao`): SD 1.5's UNet takes 0.25 GiB less (31 % of its weights are linear), SDXL's 2.1 GiB (87 %). Needs
    train.mixed_precision bf16 or fp16 and an additive adapter (not dora, oft or boft, which compute from the exact
    base weight). Meant for GPUs; on a CPU each use of a layer dequantizes it, so steps are slower."""
    down_lr_weight: BlockWeights | None = Field(None, examples=["sine"])
    """Block-wise learning rate (kohya's `down_lr_weight`): one multiplier of the UNet adapters' rate per UNet input
    block, shallowest first (IN00-IN11 on SD 1.x/2.x: 12 values; IN00-IN08 on SDXL: 9; the built-in model: 6), or a
    preset: sine, cosine, linear, reverse_linear, zeros, optionally +base (`sine+0.5`). A block at 0 gets no
    adapters. Empty = 1 for every block."""
    mid_lr_weight: list[float] | None = Field(None, examples=[[1.0]])
    """Block-wise learning rate of the middle block (kohya's `mid_lr_weight`): 1 value on SD 1.x/2.x, 3 on SDXL
    (its middle block's resnet, transformer, resnet). Empty = 1."""
    up_lr_weight: BlockWeights | None = Field(None, examples=["cosine"])
    """Block-wise learning rate of the UNet output blocks (kohya's `up_lr_weight`), deepest first (OUT00-OUT11 on
    SD 1.x/2.x, OUT00-OUT08 on SDXL), or a preset as for down_lr_weight. Empty = 1 for every block."""
    block_dims: list[int] | None = Field(None, examples=[[4] * 25])
    """Rank per UNet block (kohya's `block_dims`): IN00-IN11, MID, OUT00-OUT11 on SD 1.x/2.x (25 values), BASE,
    IN00-IN08, MID0-MID2, OUT00-OUT08, OUT on SDXL (23); 0 = no adapters in that block. The convolutions keep
    conv_rank when it is set. Empty = rank everywhere."""
    block_alphas: list[float] | None = Field(None, examples=[[2.0] * 25])
    """Alpha per UNet block (kohya's `block_alphas`), one per block_dims entry. Empty = alpha (or each block's rank
    when alpha is empty: scale 1). The kohya file holds one alpha and folds each block's own alpha / rank into its
    `lora_up` (diffusers' kohya converter misreads per-module alphas): every tool applies the same weights."""

    @field_validator("down_lr_weight", "up_lr_weight", mode="before")
    @classmethod
    def _weights_from_text(cls, value):
        return parse_block_weights(value)

    @field_validator("mid_lr_weight", "block_dims", "block_alphas", mode="before")
    @classmethod
    def _numbers_from_text(cls, value):
        """kohya writes these as text: "1,1,0.5"."""
        if isinstance(value, str):
            try:
                return [float(x) for x in value.split(",") if x.strip()]
            except ValueError:
                raise ValueError(f"expected numbers separated by commas (got {value!r}); e.g. 4, 4, 8") from None
        return value

    @field_validator("down_lr_weight", "mid_lr_weight", "up_lr_weight")
    @classmethod
    def _valid_weights(cls, value):
        return check_block_weights(value)

    @field_validator("block_dims", "block_alphas")
    @classmethod
    def _non_negative(cls, value):
        if value is not None and (not value or any(v < 0 for v in value)):
            raise ValueError(f"one number >= 0 per UNet block (got {value}); e.g. 4 for each of SD 1.x's 25 blocks")
        return value

    @model_validator(mode="after")
    def _consistent_blocks(self) -> LoraConfig:
        down, mid, up = self.down_lr_weight, self.mid_lr_weight, self.up_lr_weight
        if isinstance(down, list) and isinstance(up, list) and len(down) != len(up):
            raise ValueError(
                f"up_lr_weight: the UNet has as many output blocks as input blocks; give {len(down)} values like "
                f"down_lr_weight (got {len(up)})"
            )
        if mid is not None and len(mid) not in (1, 3):
            raise ValueError(f"mid_lr_weight: 1 value (SD 1.x/2.x) or 3 (SDXL) (got {len(mid)}); e.g. [1.0]")
        weights = down is not None or mid is not None or up is not None
        if self.block_alphas is not None and self.block_dims is None:
            raise ValueError("block_alphas: set block_dims too (one rank per block), or remove block_alphas")
        dims, alphas = self.block_dims, self.block_alphas
        if dims is not None and alphas is not None and len(alphas) != len(dims):
            raise ValueError(f"block_alphas: one per block_dims entry: {len(dims)} values (got {len(alphas)})")
        if (weights or self.block_dims is not None) and self.adapter in ("oft", "boft"):
            given = [n for n in _BLOCK_OPTIONS if getattr(self, n) is not None]
            raise ValueError(
                f"{given[0]}: block options are for the rank-based kinds (lora, dora, locon, loha, lokr), not "
                f"{self.adapter}; remove {', '.join(given)}"
            )
        if (weights or self.block_dims is not None) and not self.train_unet:
            given = [n for n in _BLOCK_OPTIONS if getattr(self, n) is not None]
            raise ValueError(
                f"{given[0]}: block options apply to the UNet adapters; set train_unet: true "
                f"or remove {', '.join(given)}"
            )
        if weights and isinstance(self.optimizer.lr, str):
            raise ValueError(
                "optimizer.lr: a rate:step schedule string sets every adapter's rate; use a number with "
                "down_lr_weight / mid_lr_weight / up_lr_weight"
            )
        return self

    @model_validator(mode="after")
    def _consistent(self) -> LoraConfig:
        if self.adapter == "locon" and self.targets != "all" and not self.target_modules:
            raise ValueError("adapter: locon adapts convolutions; set targets: all (or use adapter: lora)")
        if self.fp8_base and self.adapter in ("dora", "oft", "boft"):
            raise ValueError(
                f"fp8_base: {self.adapter} computes from the exact base weight (DoRA's norm, OFT's rotated weight); "
                "use adapter: lora, locon, loha or lokr"
            )
        if self.fp8_base and self.train.mixed_precision == "no":
            raise ValueError("fp8_base: float8 weights compute in bf16 or fp16; set train.mixed_precision: bf16")
        if not (self.train_unet or self.train_text_encoder):
            raise ValueError("train_unet: nothing to train; enable train_unet or train_text_encoder")
        if isinstance(self.optimizer.lr, str) and (self.unet_lr or self.text_encoder_lr):
            raise ValueError(
                "optimizer.lr: a rate:step schedule string applies to all adapters; "
                "leave unet_lr and text_encoder_lr empty"
            )
        if self.token is not None and (not self.token or any(c.isspace() or c == "," for c in self.token)):
            raise ValueError(f"token: one word without spaces or commas (got {self.token!r}); e.g. <my-concept>")
        if self.file_format == "peft" and self.adapter in ("loha", "lokr", "oft", "boft"):
            raise ValueError(f"file_format: diffusers cannot load {self.adapter} files; use file_format: kohya")
        self._orthogonal_fields()
        if self.dreambooth and self.token and _word_in(self.token, self.dreambooth.class_prompt):
            raise ValueError(_class_prompt_error(self.dreambooth.class_prompt, self.token, "dreambooth.class_prompt"))
        return self

    def _orthogonal_fields(self) -> None:
        """oft/boft take block_size, constraint, rescaled (and boft butterfly_factors); the rank fields none."""
        orthogonal = self.adapter in ("oft", "boft")
        if orthogonal:
            set_rank = [f"{k}: {v}" for k, v in (("rank", self.rank if self.rank != 8 else None), ("alpha", self.alpha),
                        ("conv_rank", self.conv_rank), ("conv_alpha", self.conv_alpha)) if v is not None]  # fmt: skip
            if set_rank:
                name = set_rank[0].split(":")[0]
                raise ValueError(
                    f"{name}: adapter: {self.adapter} has no rank or alpha (block_size sets its size; constraint "
                    f"bounds it); remove {', '.join(set_rank)}"
                )
        else:
            used = [k for k in ("block_size", "constraint", "butterfly_factors") if getattr(self, k) is not None]
            used += ["rescaled"] * self.rescaled
            if used:
                raise ValueError(f"{used[0]}: applies to adapter: oft or boft only (got adapter: {self.adapter})")
        if self.butterfly_factors is not None and self.adapter != "boft":
            raise ValueError(f"butterfly_factors: applies to adapter: boft only (got adapter: {self.adapter})")


# The names of sdtune.adapters.hypernetwork.ACTIVATIONS (A1111's activation list; a test keeps them equal).
HypernetworkActivation = Literal[
    "linear",
    "relu",
    "leakyrelu",
    "elu",
    "swish",
    "tanh",
    "sigmoid",
    "celu",
    "gelu",
    "hardsigmoid",
    "hardswish",
    "hardtanh",
    "logsigmoid",
    "mish",
    "prelu",
    "relu6",
    "rrelu",
    "selu",
    "silu",
    "softplus",
    "softsign",
    "tanhshrink",
]


class HypernetworkConfig(RunBase):
    """Train an AUTOMATIC1111 hypernetwork: small residual networks that rewrite the attention context before the
    k and v projections; the model stays frozen. Exported as `<name>.pt` for A1111's models/hypernetworks/.
    Prompts: the captions as they are (`data.template` empty = filewords); `[name]` in templates = the run name."""

    method: Literal["hypernetwork"]
    layer_structure: list[float] = Field(default_factory=lambda: [1.0, 2.0, 1.0], examples=[[1, 2, 1]])
    """Layer widths as multiples of the context width (A1111 'layer structure', also written "1, 2, 1"): first and
    last must be 1. `1, 2, 1` = two Linear layers 768 -> 1536 -> 768 on SD1; `1, 2, 2, 1` adds a hidden layer."""
    activation: HypernetworkActivation = "linear"
    """Activation after each Linear except the last (A1111 recommends swish or linear; `swish` is A1111's Hardswish,
    `silu` the smooth one)."""
    weight_init: Literal["Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"] = "Normal"
    """Weight initialisation: Normal (N(0, 0.01), A1111's default), Kaiming for relu-like, Xavier for sigmoid-like."""
    layer_norm: bool = False
    """Add a LayerNorm after each Linear (A1111 'Add layer normalization')."""
    activate_output: bool = False
    """Apply the activation after the last Linear too (A1111 writes false for new hypernetworks)."""
    dropout: bool = False
    """Use dropout while training (A1111 'Use dropout'); see dropout_structure."""
    dropout_structure: list[float] | None = Field(None, examples=[[0, 0.05, 0.15, 0]])
    """With dropout: one probability per layer_structure entry, first and last 0 (A1111 recommends an increasing
    sequence up to 0.35). Empty = A1111's older rule: 0.3 after each hidden layer, the last one only with
    last_layer_dropout."""
    last_layer_dropout: bool = False
    """With dropout and no dropout_structure: also drop out after the last hidden layer (A1111's older option)."""
    sizes: list[int] = Field(default_factory=list, examples=[[768, 320, 640, 1280]])
    """Context widths to give modules (A1111 'Modules'). Empty = the model's cross-attention width (768 SD1,
    1024 SD2): the text context. 320, 640, 1280 add the self-attention layers of those widths (A1111's default)."""
    multiplier: float = Field(1.0, ge=0.0, examples=[0.8])
    """Strength in previews (A1111's hypernetwork strength); training always uses 1, as A1111 does."""
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=1e-5))

    @field_validator("layer_structure", "dropout_structure", mode="before")
    @classmethod
    def _from_a1111_text(cls, value):
        """A1111 writes these as text: "1, 2, 1"."""
        if isinstance(value, str):
            try:
                return [float(x) for x in value.split(",") if x.strip()]
            except ValueError:
                raise ValueError(f"expected numbers separated by commas (got {value!r}); e.g. 1, 2, 1") from None
        return value

    @field_validator("layer_structure")
    @classmethod
    def _starts_and_ends_with_one(cls, value: list[float]) -> list[float]:
        shown = ", ".join(f"{v:g}" for v in value)
        if len(value) < 2 or value[0] != 1 or value[-1] != 1:
            raise ValueError(f"must start and end with 1 (got [{shown}]); e.g. [1, 2, 1]")
        if any(not v > 0 for v in value):
            raise ValueError(f"every entry must be > 0 (got [{shown}]); e.g. [1, 2, 1]")
        return value

    @field_validator("sizes")
    @classmethod
    def _positive_sizes(cls, value: list[int]) -> list[int]:
        if any(v <= 0 for v in value) or len(set(value)) != len(value):
            raise ValueError(f"distinct positive widths (got {value}); e.g. [768, 320, 640, 1280]")
        return value

    @model_validator(mode="after")
    def _consistent_dropout(self) -> HypernetworkConfig:
        ds, n = self.dropout_structure, len(self.layer_structure)
        if ds is not None:
            if not self.dropout:
                raise ValueError("dropout_structure: set dropout: true to use it, or remove dropout_structure")
            if len(ds) != n or ds[0] != 0 or ds[-1] != 0 or any(not 0 <= p < 1 for p in ds):
                raise ValueError(
                    f"dropout_structure: needs {n} probabilities in [0, 1), first and last 0, one per "
                    f"layer_structure entry (got {ds}); e.g. {[0] + [0.1] * (n - 2) + [0]}"
                )
        elif self.dropout and n <= 3 and not self.last_layer_dropout:
            raise ValueError(
                f"dropout: with {n} layer_structure entries A1111's rule would add no dropout (only after the last "
                f"hidden layer, with last_layer_dropout); set last_layer_dropout: true or give dropout_structure, "
                f"e.g. {[0] + [0.1] * (n - 2) + [0]}"
            )
        return self


_CAPTION_OPTIONS = ("shuffle_tags", "keep_tags", "tag_dropout", "caption_dropout")


class DreamBoothConfig(RunBase):
    """DreamBooth: fine-tune the model's own weights (UNet, optionally the text encoders) on a few images of one
    subject named by a rare word, with prior preservation on class images so the class keeps its meaning. Exported
    as a whole model: a diffusers folder and one `.safetensors` checkpoint (A1111, ComfyUI)."""

    method: Literal["dreambooth"]
    instance_token: str = Field(examples=["sks"])
    """The rare word that names your subject (e.g. `sks`); write it in prompts to get the subject."""
    instance_prompt: str = Field(examples=["a sks heart"])
    """The prompt every instance image trains with; contains instance_token. `[filewords]` inserts the image's
    caption (then the captions must contain instance_token, and the data.* caption options apply to them)."""
    prior_preservation: bool = True
    """Train on class images of class_prompt too (Ruiz et al. 2023), so the class keeps its meaning."""
    preservation: PreservationConfig | None = None
    """Prior-prediction regularisation against a frozen copy of the base model (see the block's fields)."""
    class_prompt: str | None = Field(None, examples=["a heart"])
    """What the subject is an instance of, without instance_token (e.g. `a dog` for `a sks dog`)."""
    prior_loss_weight: float = Field(1.0, ge=0.0, examples=[1.0])
    """Weight of the class images' loss: loss = instance loss + prior_loss_weight x class loss."""
    num_class_images: int = Field(100, ge=1, le=100_000, examples=[100])
    """Class images to train with; missing ones are generated once with the base model (preview sampler, steps,
    cfg_scale and negative prompt; image i with seed i) and reused by later runs."""
    class_data_dir: str | None = Field(None, examples=["class-images/heart"])
    """Folder of class images (yours, or generated ones as PNG + .txt). Empty = `<output_dir>/<name>/class_images`."""
    train_text_encoder: bool = False
    """Train the text encoder(s) too (both for SDXL): learns the token faster, needs more memory."""
    unet_lr: float | None = Field(None, gt=0, examples=[5e-6])
    """Learning rate of the UNet. Empty = optimizer.lr."""
    text_encoder_lr: float | None = Field(None, gt=0, examples=[2e-6])
    """Learning rate of the text encoder(s). Empty = optimizer.lr."""
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=5e-6))
    save: SaveConfig = Field(default_factory=lambda: SaveConfig(dtype="fp16"))

    @field_validator("instance_token")
    @classmethod
    def _token_is_one_word(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value) or "," in value:
            raise ValueError(f"one word without spaces or commas (got {value!r}); e.g. sks")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DreamBoothConfig:
        token, prompt = self.instance_token, self.instance_prompt
        uses_captions = "[filewords]" in prompt
        if not uses_captions and not _word_in(token, prompt):
            raise ValueError(
                f"instance_prompt: must contain instance_token {token!r} (got {prompt!r}); e.g. a {token} dog"
            )
        if self.prior_preservation and not self.class_prompt:
            raise ValueError(
                "class_prompt: prior_preservation needs the class of the subject, e.g. a heart "
                "(or set prior_preservation: false)"
            )
        if self.class_prompt and _word_in(token, self.class_prompt):
            example = " ".join(re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", " ", prompt).split())
            raise ValueError(_class_prompt_error(self.class_prompt, token, "class_prompt", example or None))
        if self.data.template:
            raise ValueError(
                "data.template: DreamBooth trains every instance image with instance_prompt; remove data.template "
                "(write [filewords] in instance_prompt to use the captions)"
            )
        if not uses_captions:
            for name in _CAPTION_OPTIONS:
                if getattr(self.data, name):
                    raise ValueError(
                        f"data.{name}: applies to captions, which DreamBooth uses only through [filewords] in "
                        f"instance_prompt; add [filewords] or turn data.{name} off"
                    )
        _check_rates(self.optimizer.lr, self.unet_lr, self.text_encoder_lr)
        return self


class FinetuneConfig(WeightAverageFields, RunBase):
    """Full fine-tune: train the model's own weights (UNet and/or text encoders) on captioned images, optionally
    with an EMA of the weights. Exported as a diffusers folder and one `.safetensors` file (A1111, ComfyUI)."""

    method: Literal["finetune"]
    train_unet: bool = True
    """Train the UNet."""
    train_text_encoder: bool = False
    """Train the text encoder(s) too (both for SDXL)."""
    unet_lr: float | None = Field(None, gt=0, examples=[1e-5])
    """Learning rate of the UNet. Empty = optimizer.lr."""
    text_encoder_lr: float | None = Field(None, gt=0, examples=[5e-6])
    """Learning rate of the text encoder(s). Empty = optimizer.lr."""
    export: Literal["full", "trained"] = "full"
    """What the output holds: `full` = the whole model (diffusers pipeline folder + A1111/ComfyUI checkpoint);
    `trained` = only the trained components (diffusers sub-folders such as `unet/`, and a file with only their keys
    in the checkpoint layout, e.g. a UNet for ComfyUI's diffusion-model loader)."""
    preservation: PreservationConfig | None = None
    """Prior-prediction regularisation against a frozen copy of the base model (see the block's fields)."""
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=1e-5))
    save: SaveConfig = Field(default_factory=lambda: SaveConfig(dtype="fp16"))

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        if not (self.train_unet or self.train_text_encoder):
            raise ValueError("train_unet: nothing to train; enable train_unet or train_text_encoder")
        _check_rates(self.optimizer.lr, self.unet_lr, self.text_encoder_lr)
        return self


def _check_rates(lr: float | str, unet_lr: float | None, text_encoder_lr: float | None) -> None:
    if isinstance(lr, str) and (unet_lr or text_encoder_lr):
        raise ValueError(
            "optimizer.lr: a rate:step schedule string applies to every component; "
            "leave unet_lr and text_encoder_lr empty"
        )


MethodConfig = Annotated[
    TextualInversionConfig | LoraConfig | HypernetworkConfig | DreamBoothConfig | FinetuneConfig,
    Field(discriminator="method"),
]
METHOD_SCHEMAS: dict[str, type[RunBase]] = {
    "textual_inversion": TextualInversionConfig,
    "lora": LoraConfig,
    "hypernetwork": HypernetworkConfig,
    "dreambooth": DreamBoothConfig,
    "finetune": FinetuneConfig,
}
