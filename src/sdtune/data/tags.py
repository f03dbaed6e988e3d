"""Tags in caption sidecars: how often each occurs, and bulk add / remove / replace.

A caption sidecar is ``<image stem><extension>`` next to an image (as in :func:`sdtune.data.captions.caption_for`);
its tags are the comma-separated pieces of each line, stripped. Tags match exactly (case and spaces inside a tag
count). Edits keep each file's encoding details: a UTF-8 byte-order mark, the line endings, a final newline, the
comma style (``", "`` or ``","``), and every line no edit touches, byte for byte. A sidecar that is not UTF-8 is
reported and never rewritten (re-encoding a legacy code page could silently change its text).
"""

from __future__ import annotations

import codecs
import difflib
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sdtune.core.atomic import write_bytes
from sdtune.core.errors import DataError
from sdtune.data.images import IMAGE_SUFFIXES

_LINE_BREAK = re.compile(r"(\r\n|\r|\n)")


@dataclass(frozen=True)
class TagEdit:
    """Bulk edits, applied to each file in this order: ``replace`` (old, new) pairs, ``remove``, ``add``.

    ``add`` puts tags a file lacks at the ``front`` of its first line or the ``back`` of its last line (in the
    given order); a tag already present is not added again. A replacement whose new tag is already in the file
    leaves one copy (the first).
    """

    add: tuple[str, ...] = ()
    position: str = "front"
    remove: tuple[str, ...] = ()
    replace: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.position not in ("front", "back"):
            raise DataError(f"position: '{self.position}' is not front or back; use --position front or back")
        for tag in [*self.add, *self.remove, *(t for pair in self.replace for t in pair)]:
            if not tag.strip() or "," in tag or "\n" in tag or "\r" in tag:
                raise DataError(f"tag {tag!r}: must be non-empty, without commas or line breaks; e.g. 'red hat'")

    @property
    def empty(self) -> bool:
        return not (self.add or self.remove or self.replace)


def parse_replace(spec: str) -> tuple[str, str]:
    """``"OLD=NEW"`` -> ``("OLD", "NEW")`` (stripped); the first ``=`` splits."""
    old, sep, new = spec.partition("=")
    if not sep or not old.strip() or not new.strip():
        raise DataError(
            f"--replace {spec!r}: expected OLD=NEW with both tags non-empty; e.g. --replace 'cat=tabby cat'"
        )
    return old.strip(), new.strip()


@dataclass(frozen=True)
class TagChange:
    """One sidecar's text before and after an edit."""

    path: Path
    before: str
    after: str

    def diff(self) -> list[str]:
        """The change as unified-diff lines (``---``/``+++`` header, ``-`` old lines, ``+`` new lines)."""
        return list(
            difflib.unified_diff(
                self.before.splitlines(), self.after.splitlines(), str(self.path), str(self.path), n=0, lineterm=""
            )
        )


@dataclass
class TagReport:
    """The result of :func:`edit_folder` (``written`` is False on a dry run)."""

    files: int = 0
    changes: list[TagChange] = field(default_factory=list)
    not_utf8: list[Path] = field(default_factory=list)
    written: bool = False


def find_sidecars(folder: str | Path, extension: str = ".txt") -> tuple[list[Path], int]:
    """The caption sidecars of the images directly in ``folder`` (sorted), and how many images have none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; give the folder of images and caption files")
    if not extension.startswith("."):
        extension = "." + extension
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DataError(f"{folder}: no images found ({', '.join(IMAGE_SUFFIXES)}); tags live in their sidecars")
    found: dict[Path, None] = {}
    missing = 0
    for image in images:
        sidecar = image.with_name(image.stem + extension)
        if sidecar.is_file():
            found[sidecar] = None  # a.jpg and a.png share a.txt: count it once
        else:
            missing += 1
    return sorted(found), missing


def read_utf8(path: Path) -> tuple[str, bool] | None:
    """``(text, had_bom)`` of a UTF-8 file, or ``None`` if it is not valid UTF-8."""
    data = path.read_bytes()
    bom = data.startswith(codecs.BOM_UTF8)
    try:
        return data[len(codecs.BOM_UTF8) if bom else 0 :].decode("utf-8"), bom
    except UnicodeDecodeError:
        return None


def split_tags(text: str) -> list[str]:
    """All tags of a caption text, in order: comma-separated pieces of every line, stripped, empty ones dropped."""
    return [tag.strip() for line in _LINE_BREAK.split(text)[::2] for tag in line.split(",") if tag.strip()]


def tag_frequencies(folder: str | Path, extension: str = ".txt") -> tuple[Counter[str], int, list[Path]]:
    """How many sidecars contain each tag (a tag twice in one file counts once), the number of sidecars read,
    and the sidecars skipped because they are not UTF-8."""
    sidecars, _ = find_sidecars(folder, extension)
    counts: Counter[str] = Counter()
    bad: list[Path] = []
    read = 0
    for path in sidecars:
        decoded = read_utf8(path)
        if decoded is None:
            bad.append(path)
            continue
        counts.update(set(split_tags(decoded[0])))
        read += 1
    return counts, read, bad


def _separator(text: str) -> str:
    """The file's comma style: ", " unless most of its commas are followed directly by a non-space."""
    commas = text.count(",")
    spaced = len(re.findall(r",\s", text))
    return ", " if commas == 0 or spaced * 2 >= commas else ","


def edit_text(text: str, edit: TagEdit) -> str:
    """``text`` with ``edit`` applied; lines with nothing to change are kept exactly (see the module docstring)."""
    parts = _LINE_BREAK.split(text)  # [line, break, line, break, ..., line]
    lines = parts[::2]
    sep = _separator(text)
    replace = dict(edit.replace)
    remove = set(edit.remove)
    # Only the new names of tags this file really had replaced are de-duplicated; other repeats stay as written.
    dedupe = {replace[tag] for tag in split_tags(text) if tag in replace}
    seen: set[str] = set()
    for i, line in enumerate(lines):
        tags = [t.strip() for t in line.split(",") if t.strip()]
        new_tags: list[str] = []
        for tag in tags:
            renamed = replace.get(tag, tag)
            if renamed in remove or (renamed in dedupe and renamed in seen):
                continue
            seen.add(renamed)
            new_tags.append(renamed)
        if new_tags != tags:
            lines[i] = sep.join(new_tags)
    missing = [tag for tag in edit.add if tag not in seen]
    missing = list(dict.fromkeys(missing))
    if missing:
        filled = [i for i, line in enumerate(lines) if line.strip()]
        if not filled:
            lines[0] = sep.join(missing)
        elif edit.position == "front":
            i = filled[0]
            lines[i] = sep.join([*missing, *(t.strip() for t in lines[i].split(",") if t.strip())])
        else:
            i = filled[-1]
            lines[i] = sep.join([*(t.strip() for t in lines[i].split(",") if t.strip()), *missing])
    parts[::2] = lines
    return "".join(parts)


def edit_folder(folder: str | Path, edit: TagEdit, extension: str = ".txt", dry_run: bool = False) -> TagReport:
    """Apply ``edit`` to every sidecar in ``folder``; with ``dry_run`` only report the changes.

    Each changed file is written atomically and keeps its permissions; non-UTF-8 sidecars are listed in the
    report and left untouched.
    """
    if edit.empty:
        raise DataError("tags: nothing to do; give --add, --remove or --replace")
    sidecars, _ = find_sidecars(folder, extension)
    report = TagReport(files=len(sidecars), written=not dry_run)
    for path in sidecars:
        decoded = read_utf8(path)
        if decoded is None:
            report.not_utf8.append(path)
            continue
        before, bom = decoded
        after = edit_text(before, edit)
        if after == before:
            continue
        report.changes.append(TagChange(path, before, after))
        if not dry_run:
            mode = path.stat().st_mode & 0o7777
            write_bytes(path, (codecs.BOM_UTF8 if bom else b"") + after.encode("utf-8"))
            os.chmod(path, mode)
    return report
