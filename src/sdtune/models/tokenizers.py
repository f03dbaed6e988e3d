"""The CLIP BPE tokenizer, shipped with sdtune so nothing is fetched at run time.

One copy of OpenAI CLIP's byte-level BPE (``vocab.json`` + ``merges.txt``, 49,408 tokens) serves every
family; what differs is the padding token: SD 1.x pads with ``<|endoftext|>``, the OpenCLIP encoders of
SD 2.x and SDXL's second encoder pad with ``!`` (id 0). Each shipped family config carries its own
``tokenizer_config.json`` with those settings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from transformers import CLIPTokenizer

ASSETS = Path(__file__).parent / "assets"
CLIP_BPE_DIR = ASSETS / "clip_tokenizer"


def load_tokenizer(folder: str | Path | None = None) -> CLIPTokenizer:
    """Load a CLIP tokenizer from ``folder`` if it holds vocab files, else the shipped BPE with its settings.

    ``folder`` may be a diffusers ``tokenizer/`` folder (real model: its own files are used) or a shipped
    config folder holding only ``tokenizer_config.json`` (the shipped BPE files are used with its settings).
    ``None`` gives the SD 1.x tokenizer.
    """
    if folder is not None and (Path(folder) / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    settings: dict = {}
    if folder is not None and (Path(folder) / "tokenizer_config.json").is_file():
        settings = json.loads((Path(folder) / "tokenizer_config.json").read_text(encoding="utf-8"))
    kwargs = {k: settings[k] for k in ("pad_token", "model_max_length") if k in settings}
    return CLIPTokenizer.from_pretrained(str(CLIP_BPE_DIR), local_files_only=True, **kwargs)


def clip_token_counter(folder: str | Path | None = None) -> Callable[[str], int]:
    """Count a caption's CLIP tokens (start/end tokens not counted) with :func:`load_tokenizer` ``(folder)``,
    loaded on first use: the dataset check's ``count_tokens`` for ``sdtune data check`` and the web UI."""
    tokenizer: CLIPTokenizer | None = None

    def count(text: str) -> int:
        nonlocal tokenizer
        if tokenizer is None:
            tokenizer = load_tokenizer(folder)
            tokenizer.model_max_length = 1 << 30  # count long captions without transformers' length warning
        return len(tokenizer.tokenize(text))

    return count
