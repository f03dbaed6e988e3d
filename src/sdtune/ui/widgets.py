"""Small pieces every page uses: the one-line ok / error messages and the message box, and short file names."""

from __future__ import annotations

import traceback
from pathlib import Path

from sdtune.core.errors import SdtuneError


def ok(text: str) -> str:
    return f"**ok:** {text}"


def error(exc: BaseException) -> str:
    """The one-line message of an sdtune error (as the CLI prints it); other exceptions with their type."""
    if isinstance(exc, SdtuneError):
        return f"**error:** {exc}"
    traceback.print_exc()
    return f"**error:** {type(exc).__name__}: {exc}"


def message(gr, elem_id: str):
    """A Markdown box for a page's ok / error line."""
    return gr.Markdown("", elem_id=elem_id, elem_classes=["sdtune-message"])


def short(path: Path, base: Path | None) -> str:
    """``path`` relative to ``base`` when inside it, else its file name."""
    path = Path(path)
    if base is not None and path.is_relative_to(base):
        return str(path.relative_to(base)) or path.name
    return path.name
