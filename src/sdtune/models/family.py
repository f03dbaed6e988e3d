"""Model families: the one place that decides what a model is.

A :class:`ModelFamily` is decided once, here, from a diffusers folder or from the keys of a single-file
checkpoint, and then passed along as a value. No other module looks at key names or tensor shapes to
guess what a model is.

Original (LDM / SGM) single-file layouts, by family::

    SD 1.x   model.diffusion_model.*  first_stage_model.*  cond_stage_model.transformer.*   (OpenAI CLIP-L)
    SD 2.x   model.diffusion_model.*  first_stage_model.*  cond_stage_model.model.*         (OpenCLIP ViT-H)
    SDXL     model.diffusion_model.*  first_stage_model.*  conditioner.embedders.0.transformer.* (CLIP-L)
                                                           conditioner.embedders.1.model.*       (OpenCLIP bigG)

Inpainting variants have a UNet with 9 input channels (4 latent + 4 masked-image latent + 1 mask).
v-prediction cannot be read from the weights; it comes from the scheduler config (diffusers folders),
from metadata (``modelspec.prediction_type``, sdtune's own ``sdtune.prediction_type``), from a ``v_pred``
marker key (ComfyUI's convention), or, for SD 2.x files with none of these, is assumed (768-v is the
common SD 2.x release) and said so in :attr:`Detection.notes`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sdtune.core.errors import ModelError

Arch = Literal["sd1", "sd2", "sdxl"]
Prediction = Literal["epsilon", "v_prediction"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Text-encoder prefixes in the original layout, per architecture, in text-encoder order.
TEXT_ENCODER_PREFIXES: dict[str, tuple[str, ...]] = {
    "sd1": ("cond_stage_model.transformer.",),
    "sd2": ("cond_stage_model.model.",),
    "sdxl": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
}
# Which text encoders use the OpenCLIP layout (fused in_proj) rather than the Hugging Face CLIP layout.
TEXT_ENCODER_STYLES: dict[str, tuple[str, ...]] = {
    "sd1": ("hf",),
    "sd2": ("openclip",),
    "sdxl": ("hf", "openclip"),
}
_UNET_IN = UNET_PREFIX + "input_blocks.0.0.weight"


@dataclass(frozen=True)
class ModelFamily:
    """What a Stable Diffusion model is: architecture, prediction type, inpainting or not."""

    arch: Arch
    prediction_type: Prediction = "epsilon"
    inpainting: bool = False

    @property
    def name(self) -> str:
        """Short name: ``sd1``, ``sd2-v``, ``sdxl-inpaint``, ..."""
        name = self.arch + ("-v" if self.prediction_type == "v_prediction" else "")
        return name + ("-inpaint" if self.inpainting else "")

    @property
    def config_name(self) -> str:
        """Name of the shipped config folder under ``models/assets/configs``. Only SD 2.x ships a v-prediction
        folder (768-v: a larger UNet sample size); SD 1.x and SDXL v-prediction models (e.g. trained with zero
        terminal SNR) use their architecture's folder, whose scheduler gets the prediction type applied."""
        if self.inpainting:
            return f"{self.arch}-inpaint"
        return self.name if self.arch == "sd2" else self.arch

    @property
    def resolution(self) -> int:
        """Native training and sampling resolution in pixels."""
        if self.arch == "sdxl":
            return 1024
        return 768 if self.arch == "sd2" and self.prediction_type == "v_prediction" else 512

    @property
    def num_text_encoders(self) -> int:
        return len(TEXT_ENCODER_PREFIXES[self.arch])

    @property
    def text_encoder_prefixes(self) -> tuple[str, ...]:
        return TEXT_ENCODER_PREFIXES[self.arch]

    @property
    def text_encoder_styles(self) -> tuple[str, ...]:
        return TEXT_ENCODER_STYLES[self.arch]

    @property
    def a1111_base_model_version(self) -> str:
        """The ``ss_base_model_version`` value kohya tools write for this family."""
        return {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[self.arch]

    @property
    def modelspec_architecture(self) -> str:
        """The ``modelspec.architecture`` identifier (Stability's model-spec convention)."""
        base = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}
        arch = base[self.arch]
        if self.arch == "sd2" and self.prediction_type == "v_prediction":
            arch = "stable-diffusion-v2-768-v"
        return arch + ("/inpaint" if self.inpainting else "")

    @classmethod
    def parse(cls, name: str) -> ModelFamily:
        """Parse a short name (``sd1``, ``sd2-v``, ``sdxl-inpaint``); the inverse of :attr:`name`."""
        parts = name.strip().lower().split("-")
        arch = parts[0]
        if arch not in TEXT_ENCODER_PREFIXES or any(p not in ("v", "inpaint") for p in parts[1:]):
            raise ModelError(f"unknown model family '{name}'; use one of sd1, sd2, sd2-v, sdxl, with -inpaint if so")
        return cls(arch, "v_prediction" if "v" in parts[1:] else "epsilon", "inpaint" in parts[1:])  # type: ignore[arg-type]


@dataclass(frozen=True)
class Detection:
    """The result of looking at a model path: family, layout, and anything that was assumed."""

    family: ModelFamily
    layout: Literal["diffusers", "safetensors", "ckpt"]
    notes: tuple[str, ...] = field(default=())


def detect_diffusers_folder(path: str | Path) -> Detection:
    """Decide the family of a diffusers pipeline folder from its JSON configs (no weights are read)."""
    path = Path(path)
    index = _read_json(path / "model_index.json")
    unet = _read_json(path / "unet" / "config.json")
    te = _read_json(path / "text_encoder" / "config.json")
    try:
        sched = _read_json(path / "scheduler" / "scheduler_config.json")
    except ModelError:
        sched = {}
    if "text_encoder_2" in index or unet.get("addition_embed_type") == "text_time":
        arch: Arch = "sdxl"
    elif te.get("hidden_act") == "gelu":
        arch = "sd2"  # OpenCLIP text encoders use gelu; OpenAI CLIP-L (SD 1.x) uses quick_gelu
    else:
        arch = "sd1"
    pred = "v_prediction" if sched.get("prediction_type") == "v_prediction" else "epsilon"
    family = ModelFamily(arch, pred, int(unet.get("in_channels", 4)) == 9)  # type: ignore[arg-type]
    return Detection(family, "diffusers")


def detect_state_dict(
    keys: Collection[str],
    shape_of: Callable[[str], tuple[int, ...]],
    metadata: Mapping[str, str] | None = None,
    *,
    source: str = "checkpoint",
    layout: Literal["safetensors", "ckpt"] = "safetensors",
) -> Detection:
    """Decide the family of a single-file checkpoint in the original layout from its keys.

    ``shape_of(key)`` returns a tensor's shape without loading it (only the UNet's first conv is asked).
    Raises :class:`ModelError` naming ``source`` when the keys fit no known family.
    """
    metadata = metadata or {}
    keyset = keys if isinstance(keys, (set, frozenset, dict)) else set(keys)

    def has_prefix(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keyset)

    if _UNET_IN not in keyset:
        raise ModelError(f"{source}: {_describe_foreign(keyset)}")
    if has_prefix("conditioner.embedders.1.model."):
        if not has_prefix("conditioner.embedders.0.transformer."):
            raise ModelError(
                f"{source}: looks like the SDXL refiner (one OpenCLIP text encoder), which is not supported"
            )
        arch: Arch = "sdxl"
    elif has_prefix("cond_stage_model.model."):
        arch = "sd2"
    elif has_prefix("cond_stage_model.transformer."):
        arch = "sd1"
    else:
        raise ModelError(
            f"{source}: has a UNet but no known text encoder (expected cond_stage_model.* for SD 1.x/2.x "
            "or conditioner.embedders.* for SDXL); not a Stable Diffusion 1.x, 2.x or XL checkpoint"
        )
    inpainting = int(shape_of(_UNET_IN)[1]) == 9
    notes: list[str] = []
    pred = _prediction_from_metadata(metadata, keyset)
    if pred is None:
        if arch == "sd2":
            pred = "v_prediction"
            notes.append(
                "prediction type not recorded in the file: assumed v-prediction (SD 2.x 768-v); "
                "set model.prediction_type: epsilon for the 512 base model"
            )
        else:
            pred = "epsilon"
    return Detection(ModelFamily(arch, pred, inpainting), layout, tuple(notes))


def _prediction_from_metadata(metadata: Mapping[str, str], keys: Collection[str]) -> Prediction | None:
    value = (metadata.get("sdtune.prediction_type") or metadata.get("modelspec.prediction_type") or "").lower()
    if value in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    if value in ("epsilon", "eps"):
        return "epsilon"
    if "v_pred" in keys:
        return "v_prediction"
    if "-v" in metadata.get("modelspec.architecture", "").split("/")[0][-3:]:
        return "v_prediction"
    return None


def _describe_foreign(keys: Collection[str]) -> str:
    """Say what a file that is not a full checkpoint probably is."""
    sample = sorted(keys)[:3]
    if any(k.startswith(("lora_unet_", "lora_te", "unet.", "text_encoder.")) and "lora" in k for k in keys):
        return "is a LoRA file, not a model checkpoint; load it as a LoRA"
    if {"string_to_param", "emb_params", "clip_l", "clip_g"} & set(keys):
        return "is a textual-inversion embedding, not a model checkpoint"
    if any(k.startswith(("encoder.", "decoder.")) for k in keys) and len(keys) < 400:
        return "looks like a VAE on its own, not a full checkpoint"
    return (
        f"no UNet weights under {UNET_PREFIX} (found {len(keys)} keys, e.g. {', '.join(sample) or 'none'}); "
        "expected an SD 1.x, 2.x or XL checkpoint in the original single-file layout"
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(
            f"{path}: missing; a diffusers model folder needs model_index.json and per-component config.json"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(
            f"{path}: not valid JSON ({exc.__class__.__name__}); re-download or re-save the model"
        ) from None
