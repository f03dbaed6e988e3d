"""Layer 4: one recipe per training method. A plain registry; a method never imports another method."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

# method name (the config's `method:`) -> module with `setup(cfg, accelerator, console) -> Job`
METHODS: dict[str, str] = {
    "textual_inversion": "sdtune.methods.textual_inversion",
    "lora": "sdtune.methods.lora",
    "hypernetwork": "sdtune.methods.hypernetwork",
    "dreambooth": "sdtune.methods.dreambooth",
    "finetune": "sdtune.methods.finetune",
}


def setup_function(method: str) -> Callable:
    """The ``setup`` of ``method``'s recipe module (imported on demand: each pulls in its own libraries)."""
    return import_module(METHODS[method]).setup
