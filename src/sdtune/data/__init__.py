"""The dataset layer: images, captions, prompt templates and cached VAE latents for the training loop.

May import only :mod:`sdtune.core`, :mod:`sdtune.config`, the standard library and third-party libraries (torch,
numpy, Pillow, safetensors; transformers and onnxruntime only inside :mod:`sdtune.data.captioners`' classes).
"""

from __future__ import annotations

from sdtune.data.captions import CaptionOptions, caption_for, process_caption
from sdtune.data.images import IMAGE_SUFFIXES, Skipped, load_image, scan_images
from sdtune.data.latents import LatentCache, LatentMode
from sdtune.data.templates import TEMPLATE_SETS, Templates, load_templates

__all__ = [
    "IMAGE_SUFFIXES",
    "TEMPLATE_SETS",
    "CaptionOptions",
    "LatentCache",
    "LatentMode",
    "Skipped",
    "Templates",
    "caption_for",
    "load_image",
    "load_templates",
    "process_caption",
    "scan_images",
]
