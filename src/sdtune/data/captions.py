"""Image captions and their per-step randomisation.

Where a caption comes from follows AUTOMATIC1111's textual-inversion dataset (sidecar file, else the file
name without its leading number, optionally filtered by a word regex). The randomisation (caption dropout,
tag dropout, tag shuffling with a fixed prefix) combines A1111's options with kohya-ss sd-scripts'
``keep_tokens``.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from pathlib import Path

from sdtune.config.blocks import DataConfig
from sdtune.core.errors import DataError

# A1111 (modules/textual_inversion/dataset.py): "0001-a red circle.png" -> "a red circle".
_LEADING_NUMBERS = re.compile(r"^[-\d]+\s*")


@functools.lru_cache(maxsize=32)
def _compile_word_regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        message = f"data.filename_word_regex: {pattern!r} is not a valid regex ({exc}); fix or clear it"
        raise DataError(message) from None


def _read_sidecar(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # -sig: Windows editors often prepend a byte-order mark
    except UnicodeDecodeError:
        # Old tools write captions in a legacy 8-bit code page; latin-1 never fails and keeps ASCII intact.
        text = data.decode("latin-1")
    lines = [line.strip() for line in text.splitlines()]
    return ", ".join(line for line in lines if line)


def _findall_words(regex: re.Pattern[str], text: str, join: str) -> str:
    words: list[str] = []
    for match in regex.findall(text):
        # findall yields strings for 0 or 1 groups and tuples for several; keep the non-empty groups.
        if isinstance(match, tuple):
            words.extend(part for part in match if part)
        else:
            words.append(match)
    return join.join(words)


def caption_for(
    image: Path,
    extension: str = ".txt",
    filename_word_regex: str = "",
    filename_join: str = " ",
) -> str:
    """The caption of ``image`` (A1111 rules).

    1. The sidecar ``<stem><extension>`` next to the image, if it exists: read as UTF-8 (latin-1 if that
       fails), stripped, several lines joined with ", ". An empty sidecar gives an empty caption.
    2. Otherwise the file name without extension and without leading digits/dashes
       ("0001-a red circle.png" -> "a red circle"); if ``filename_word_regex`` is set, its ``findall``
       matches joined by ``filename_join`` (A1111's "Filename word regex" / "Filename join string").
    """
    image = Path(image)
    # Compile even when a sidecar wins, so a bad regex is reported on the first image, not by chance later.
    regex = _compile_word_regex(filename_word_regex) if filename_word_regex else None
    if extension and not extension.startswith("."):
        extension = "." + extension
    sidecar = image.with_name(image.stem + extension)
    if extension and sidecar != image and sidecar.is_file():
        try:
            return _read_sidecar(sidecar)
        except OSError as exc:
            raise DataError(f"{sidecar}: cannot read the caption ({exc.strerror}); check its permissions") from None
    text = _LEADING_NUMBERS.sub("", image.stem)
    if regex is not None:
        text = _findall_words(regex, text, filename_join)
    return text.strip()


@dataclass(frozen=True)
class CaptionOptions:
    """How captions are varied each time they are used (see :func:`process_caption`)."""

    shuffle_tags: bool = False
    keep_tags: int = 0
    tag_dropout: float = 0.0
    caption_dropout: float = 0.0

    @classmethod
    def from_data(cls, data: DataConfig) -> CaptionOptions:
        """The options as a run's ``data:`` block sets them."""
        return cls(data.shuffle_tags, data.keep_tags, data.tag_dropout, data.caption_dropout)

    def __post_init__(self) -> None:
        if self.keep_tags < 0:
            raise DataError(f"data.keep_tags: {self.keep_tags} is negative; use 0 or more")
        for name in ("tag_dropout", "caption_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise DataError(f"data.{name}: {value} is not a probability; use a value from 0 to 1")


def process_caption(caption: str, options: CaptionOptions, rng: random.Random) -> str:
    """Randomise ``caption`` for one training step.

    Order: with probability ``caption_dropout`` the whole caption becomes "" (kohya's
    ``caption_dropout_rate``); otherwise the caption is split on "," into stripped tags (empty ones
    dropped), the first ``keep_tags`` stay fixed (kohya's ``keep_tokens``), each other tag is dropped with
    probability ``tag_dropout`` and the survivors are shuffled if ``shuffle_tags`` (A1111's order: drop,
    then shuffle). With shuffling and both dropouts off the caption is returned unchanged and ``rng`` is
    not used, so switching the options off reproduces a run that never had them.
    """
    if options.caption_dropout > 0.0 and rng.random() < options.caption_dropout:
        return ""
    if not options.shuffle_tags and options.tag_dropout <= 0.0:
        return caption
    tags = [tag.strip() for tag in caption.split(",")]
    tags = [tag for tag in tags if tag]
    fixed, rest = tags[: options.keep_tags], tags[options.keep_tags :]
    if options.tag_dropout > 0.0:
        rest = [tag for tag in rest if rng.random() >= options.tag_dropout]
    if options.shuffle_tags:
        rng.shuffle(rest)
    return ", ".join(fixed + rest)
