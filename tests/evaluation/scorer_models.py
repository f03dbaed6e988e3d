"""Tiny random scorer models built in code and saved like downloaded ones (the evaluation tests' CLIP and DINOv2).

``tiny_clip_folder``: a ``CLIPModel`` with 32-wide, 2-layer towers (32 px images, 8 px patches, 16-d projections),
its tokenizer (sdtune's shipped CLIP BPE) and a 32 px ``preprocessor_config.json`` in the old format the OpenAI
folders use; ``tiny_dino_folder``: a ``Dinov2Model`` with 32-wide, 2-layer blocks (32 px, 8 px patches) and a
32 px ``BitImageProcessor`` config like facebook/dinov2's. Both are seeded, so every build has the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdtune.models.tokenizers import load_tokenizer

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def tiny_clip_folder(path: str | Path, seed: int = 0) -> Path:
    """A random tiny ``CLIPModel`` saved with ``save_pretrained``, with its tokenizer and a 32 px preprocessor."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer()  # SD 1.x's: the OpenAI CLIP BPE (49,408 tokens), padded with <|endoftext|>
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = layers | dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = CLIPConfig(text_config=text, vision_config=layers | dict(image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    preprocessor = {
        "crop_size": 32,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
        "size": 32,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n", encoding="utf-8")
    return folder


def tiny_dino_folder(path: str | Path, seed: int = 0) -> Path:
    """A random tiny ``Dinov2Model`` saved with ``save_pretrained``, with a 32 px preprocessor config."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8
    )
    torch.manual_seed(seed)
    Dinov2Model(config).save_pretrained(folder)
    preprocessor = {
        "crop_size": {"height": 32, "width": 32},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": IMAGENET_MEAN,
        "image_processor_type": "BitImageProcessor",
        "image_std": IMAGENET_STD,
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 32},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n", encoding="utf-8")
    return folder
