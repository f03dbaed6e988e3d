"""Prompt templates: the text a training image is paired with.

As in AUTOMATIC1111's textual-inversion training, a template line such as ``a photo of [name], [filewords]``
is picked at random for each image each step; ``[name]`` becomes the token being learned (or the trigger
word) and ``[filewords]`` the image's caption (:mod:`sdtune.data.captions`).

Shipped sets (``src/sdtune/data/templates/*.txt``, written for sdtune, same idea as A1111's files):

- ``subject`` / ``style``: about 20 short neutral prompts for an object or a style; they describe photo or
  artwork qualities only (size, light, framing), never scene content the images may not show.
- ``subject_filewords`` / ``style_filewords``: the same kind of prompts plus ``[filewords]``, which is
  always set off by a comma so that an empty caption leaves a clean prompt.
- ``none``: the single line ``[name]``, so the prompt is the token alone. (A1111's ``none.txt`` is the
  word ``picture``, which suits hypernetworks but never shows a textual-inversion token; for captions
  alone, use a custom file with the line ``[filewords]``.)
"""

from __future__ import annotations

import difflib
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sdtune.core.errors import DataError

TEMPLATE_SETS = ("subject", "style", "subject_filewords", "style_filewords", "none", "filewords")

_PLACEHOLDER = re.compile(r"\[(name|filewords)\]")
_SPACES = re.compile(r"\s+")
# A comma with any spaces and further commas around it: what an empty [filewords] leaves behind.
_COMMA_RUN = re.compile(r"\s*,(?:\s*,)*\s*")


def _tidy(text: str) -> str:
    text = _SPACES.sub(" ", text)
    text = _COMMA_RUN.sub(", ", text)
    return text.strip(" ,")


@dataclass(frozen=True)
class Templates:
    """Template lines and where they came from (a shipped set name or a file path)."""

    lines: tuple[str, ...]
    source: str

    def render(self, name: str, filewords: str, rng: random.Random) -> str:
        """A prompt: a random line (``rng.choice``) with ``[name]`` and ``[filewords]`` filled in.

        Both are replaced in one pass, so a caption that itself contains "[name]" is left alone. The
        result is tidied: runs of spaces collapse, and the stray commas an empty ``[filewords]`` leaves
        ("a photo of x, " or ", , ") are removed.
        """
        line = rng.choice(self.lines)
        values = {"name": name, "filewords": filewords}
        return _tidy(_PLACEHOLDER.sub(lambda m: values[m.group(1)], line))


def _parse(text: str) -> tuple[str, ...]:
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def _shipped_text(name: str) -> str:
    return resources.files("sdtune.data").joinpath("templates", f"{name}.txt").read_text(encoding="utf-8")


def _unknown_spec(spec: str) -> DataError:
    sets = ", ".join(TEMPLATE_SETS)
    close = difflib.get_close_matches(spec, TEMPLATE_SETS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return DataError(f"data.template: '{spec}' is neither a shipped set ({sets}) nor a file{hint}")


def load_templates(spec: str, *, require_name: bool = True) -> Templates:
    """Load a shipped template set by name, or a text file of templates (one per line, UTF-8).

    Blank lines and lines starting with ``#`` are ignored. With ``require_name`` (textual inversion) at
    least one line must contain ``[name]``, otherwise the learned token would never be trained.
    """
    if spec in TEMPLATE_SETS:
        return Templates(_parse(_shipped_text(spec)), spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        if path.is_dir():
            raise DataError(f"data.template: '{spec}' is a folder; give a text file of templates or a shipped set")
        raise _unknown_spec(spec)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: templates are not UTF-8 text; save the file as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the templates ({exc.strerror}); check the file") from None
    lines = _parse(text)
    if not lines:
        raise DataError(f"{path}: no templates in the file; add one prompt per line, e.g. 'a photo of [name]'")
    if require_name and not any("[name]" in line for line in lines):
        raise DataError(
            f"{path}: no line contains [name], so the new token would never appear in a prompt; "
            "add [name] to the templates"
        )
    return Templates(lines, str(path))
