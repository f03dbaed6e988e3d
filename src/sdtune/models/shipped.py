"""The per-family configs shipped inside the package (``models/assets/configs/<family>/``).

Each folder is a diffusers pipeline folder without weights: ``model_index.json`` and one ``config.json``
per component, plus ``tokenizer_config.json`` files that point at the one shipped CLIP BPE. Real
checkpoints in the original single-file layout are loaded with these; nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from transformers import CLIPTokenizer

from sdtune.models.family import ModelFamily
from sdtune.models.tokenizers import ASSETS, CLIP_BPE_DIR, load_tokenizer

CONFIGS_DIR = ASSETS / "configs"


def config_dir(family: ModelFamily) -> Path:
    """The shipped config folder of ``family``."""
    return CONFIGS_DIR / family.config_name


def shipped_configs(family: ModelFamily) -> dict[str, dict[str, Any]]:
    """Component configs of the real model of ``family``, with its prediction type applied."""
    root = config_dir(family)
    out = {
        name: _json(root / name / "config.json")
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
        if (root / name / "config.json").is_file()
    }
    out["scheduler"] = _json(root / "scheduler" / "scheduler_config.json") | {"prediction_type": family.prediction_type}
    return out


def shipped_tokenizers(family: ModelFamily) -> list[CLIPTokenizer]:
    """The tokenizer(s) of ``family`` from the shipped BPE files."""
    root = config_dir(family)
    return [load_tokenizer(root / name) for name in ("tokenizer", "tokenizer_2") if (root / name).is_dir()]


def materialize_config_dir(family: ModelFamily, dest: str | Path, configs: dict[str, dict] | None = None) -> Path:
    """Write a complete weight-less diffusers folder for ``family`` (tokenizer files included) to ``dest``.

    diffusers' ``from_single_file(..., config=dest)`` reads it; ``configs`` replaces component configs
    (e.g. a tiny model's).
    """
    dest = Path(dest)
    shutil.copytree(config_dir(family), dest, dirs_exist_ok=True)
    for tok in ("tokenizer", "tokenizer_2"):
        if (dest / tok).is_dir():
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(CLIP_BPE_DIR / name, dest / tok / name)
    for name, cfg in (configs or {}).items():
        target = dest / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
        original = _json(target) if target.is_file() else {}
        target.write_text(json.dumps(original | cfg, indent=2), encoding="utf-8")
    return dest


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))
