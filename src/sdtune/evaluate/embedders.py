"""CLIP and DINOv2 embeddings of images and prompts, from model folders on disk (nothing is fetched).

The real-model evaluation scores with them: CLIP-I (a generated image's similarity to the training images), CLIP-T
(an image's similarity to its prompt) and DINOv2 similarity, from the folders ``eval.clip_model`` (saved by
``CLIPModel.save_pretrained`` with its tokenizer, e.g. openai/clip-vit-large-patch14) and ``eval.dino_model``
(``Dinov2Model``, e.g. facebook/dinov2-base). Every embedding is a float32 CPU row of unit length, so a cosine
similarity is a dot product. Images are preprocessed by transformers' PIL-backed image processors (no
torchvision), configured by the folder's ``preprocessor_config.json``, or each model's usual settings without one.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sdtune.core.errors import ConfigError

BATCH = 16
CLIP_FIX = "give a folder saved by CLIPModel.save_pretrained with its tokenizer (e.g. openai/clip-vit-large-patch14)"
DINO_FIX = "give a folder saved by Dinov2Model.save_pretrained (e.g. facebook/dinov2-base)"
DINO_TYPES = ("dinov2", "dinov2_with_registers")
WEIGHT_FILES = (  # one file or a sharded index
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# DINOv2's own evaluation transform (and facebook/dinov2-*'s preprocessor_config.json): resize 256, crop 224, ImageNet
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@contextmanager
def _quiet() -> Iterator[None]:
    """transformers' notices, bars ("Loading weights") and Python warnings kept off the console while it runs."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _model_folder(path: str | Path, field: str, kinds: Sequence[str], what: str, fix: str) -> Path:
    """``path`` checked to be a saved model of one of ``kinds`` (``config.json``'s ``model_type``) with weights."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ConfigError(f"{field}: {folder} does not exist; {fix}")
    if not folder.is_dir():
        raise ConfigError(f"{field}: {folder} is a file, not a model folder; {fix}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        hint = " (it is a diffusers pipeline, not a scorer model)" if (folder / "model_index.json").is_file() else ""
        raise ConfigError(f"{field}: {folder} is not a model folder (no config.json){hint}; {fix}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{field}: {config_file} cannot be read ({exc}); {fix}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in kinds:
        says = f"model_type {model_type!r}" if model_type else "no model_type"
        raise ConfigError(f"{field}: {folder} is not a {what} model folder (config.json says {says}); {fix}")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(f"{field}: {folder} has no weights (model.safetensors or pytorch_model.bin); {fix}")
    return folder


def _load_failed(field: str, folder: Path, what: str, exc: BaseException, fix: str) -> ConfigError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ConfigError(f"{field}: {folder} cannot be loaded as a {what} model ({first}); {fix}")


_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError)


def _image_processor(folder: Path, name: str, defaults: dict[str, Any]) -> Any:
    """transformers' PIL-backed processor ``<name>Pil`` (transformers 5; its ``<name>`` needs torchvision there),
    else ``<name>`` (transformers 4: NumPy + PIL); from ``preprocessor_config.json``, else with ``defaults``."""
    import transformers

    cls = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)
    if (folder / "preprocessor_config.json").is_file():
        return cls.from_pretrained(str(folder), local_files_only=True)
    return cls(**defaults)


def _rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; transparent parts become white, as training's image loading makes them."""
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _features(out: Any) -> torch.Tensor:
    """A tensor, or (transformers 5's ``get_*_features``) an output whose ``pooler_output`` is the projection."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unit(rows: list[torch.Tensor], dim: int) -> torch.Tensor:
    if not rows:
        return torch.zeros(0, dim)
    out = torch.cat(rows).float().cpu()
    return torch.nn.functional.normalize(out, dim=-1)


class _ImageEmbedder:
    processor: Any
    model: Any
    device: torch.device
    batch_size: int
    dim: int

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(n, d)`` float32 CPU rows of unit length, one per image (any mode; alpha over white)."""
        rows = []
        for start in range(0, len(images), self.batch_size):
            batch = [_rgb(image) for image in images[start : start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            rows.append(self._embed(pixels.to(self.device, torch.float32)))
        return _unit(rows, self.dim)


class ClipEmbedder(_ImageEmbedder):
    """CLIP image embeddings (``get_image_features``) and prompt embeddings (``get_text_features``)."""

    def __init__(self, model: Any, tokenizer: Any, processor: Any, device: str | torch.device, batch_size: int):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.device, self.batch_size = torch.device(device), batch_size
        self.dim = int(model.config.projection_dim)
        # the tokenizer's length, within the text model's positions (a tokenizer_config without it says 1e30)
        self.max_length = min(int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))

    @classmethod
    def load(
        cls,
        path: str | Path,
        field: str = "eval.clip_model",
        device: str | torch.device = "cpu",
        batch_size: int = BATCH,
    ) -> ClipEmbedder:
        """The CLIP model, tokenizer and image processor in ``path``; a bad folder is a ConfigError on ``field``."""
        folder = _model_folder(path, field, ("clip",), "CLIP", CLIP_FIX)
        has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        if not (has_bpe or (folder / "tokenizer.json").is_file()):
            raise ConfigError(
                f"{field}: {folder} has no tokenizer (tokenizer.json, or vocab.json and merges.txt); save the "
                "model's CLIPTokenizer into the same folder (tokenizer.save_pretrained)"
            )
        from transformers import AutoTokenizer, CLIPModel

        with _quiet():
            try:
                model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
                tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
                processor = _image_processor(folder, "CLIPImageProcessor", {})  # 224 px, OpenAI CLIP mean and std
            except _LOAD_ERRORS as exc:
                raise _load_failed(field, folder, "CLIP", exc, CLIP_FIX) from None
        model.float().to(device).eval().requires_grad_(False)
        return cls(model, tokenizer, processor, device, batch_size)

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixel_values))

    @torch.no_grad()
    def texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(n, d)`` float32 CPU rows of unit length, one per prompt, each cut to the tokenizer's max length."""
        rows = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(
                list(prompts[start : start + self.batch_size]),
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            rows.append(_features(out))
        return _unit(rows, self.dim)


class DinoEmbedder(_ImageEmbedder):
    """DINOv2 image embeddings: the layer-normed CLS token (``pooler_output``), as DreamBooth's DINO metric uses."""

    def __init__(self, model: Any, processor: Any, device: str | torch.device, batch_size: int):
        self.model, self.processor = model, processor
        self.device, self.batch_size = torch.device(device), batch_size
        self.dim = int(model.config.hidden_size)

    @classmethod
    def load(
        cls,
        path: str | Path,
        field: str = "eval.dino_model",
        device: str | torch.device = "cpu",
        batch_size: int = BATCH,
    ) -> DinoEmbedder:
        """The DINOv2 model and image processor in ``path``; a bad folder is a ConfigError on ``field``."""
        folder = _model_folder(path, field, DINO_TYPES, "DINOv2", DINO_FIX)
        from transformers import AutoModel

        defaults = dict(
            size={"shortest_edge": 256},
            crop_size={"height": 224, "width": 224},
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        )
        with _quiet():
            try:
                model = AutoModel.from_pretrained(str(folder), local_files_only=True)  # Dinov2Model (or with registers)
                processor = _image_processor(folder, "BitImageProcessor", defaults)
            except _LOAD_ERRORS as exc:
                raise _load_failed(field, folder, "DINOv2", exc, DINO_FIX) from None
        model.float().to(device).eval().requires_grad_(False)
        return cls(model, processor, device, batch_size)

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).pooler_output
