"""AUTOMATIC1111-style generation parameters ("infotext") in a PNG's ``parameters`` text chunk.

Format (A1111 ``processing.create_infotext``): the prompt, then ``Negative prompt: ...`` if any, then one line of
``Key: value`` pairs joined by ``, ``. A value containing ``,``, ``:`` or a newline is written JSON-quoted
(``infotext_utils.quote``), so A1111's "PNG Info" and "send to txt2img" parse it back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdtune.core.atomic import atomic_path

_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",\n:") else text


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """The text A1111 writes for one image; ``None`` values are left out."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None))
    return "\n".join(lines)


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Inverse of :func:`format_infotext`: (prompt, negative prompt, parameters)."""
    lines = text.strip().split("\n")
    params: dict[str, str] = {}
    if lines and len(_PARAM.findall(lines[-1])) >= 3:
        for key, value in _PARAM.findall(lines.pop()):
            params[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    negative = ""
    prompt_lines = []
    for line in lines:
        if line.startswith("Negative prompt:"):
            negative = line[len("Negative prompt:") :].strip()
        elif negative:
            negative += "\n" + line
        else:
            prompt_lines.append(line)
    return "\n".join(prompt_lines), negative, params


def save_png(image: Image.Image, path: str | Path, infotext: str | None = None, extra: Mapping[str, str] = ()) -> Path:
    """Save a PNG atomically with ``infotext`` in its ``parameters`` chunk (and any extra text chunks)."""
    info = PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    for key, value in dict(extra).items():
        info.add_text(key, value)
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path
