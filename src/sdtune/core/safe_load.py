"""Loading PyTorch pickles without ever running their code.

``.ckpt`` / ``.pt`` / ``.bin`` files are pickles, and a pickle can import and call anything. They are read only
with ``torch.load(weights_only=True)``, whose unpickler refuses every global it does not know; the first bytes
are checked first so a renamed text file gets a clear message instead of an unpickler error.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sdtune.core.errors import SdtuneError


def load_torch_file(path: Path, error: type[SdtuneError], what: str, allowed_globals: Sequence[type] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` with every failure turned into a one-line ``error``.

    ``what`` names what the file should be ("checkpoint", "embedding"); ``allowed_globals`` are extra classes
    the weights-only unpickler may build (their contents are still checked by it).
    """
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # torch zip archive, or a raw pickle
        raise error(f"{path}: not a PyTorch {what} (neither a zip archive nor a pickle)")
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses globals it does not know: the file wants to import or run code.
        reason = str(exc).split("\n")[0][:200]
        raise error(
            f"{path}: refused to load: this pickle would import or run code ({reason}); "
            "use a .safetensors file or convert it with a tool you trust"
        ) from None
    except Exception as exc:  # noqa: BLE001 - the unpickler fails in many ways on damaged files
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:160] or type(exc).__name__
        raise error(f"{path}: not a readable PyTorch {what} ({detail}); re-download or re-export it") from None
