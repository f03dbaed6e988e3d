"""Train / validation / test partitions that never move when images are added.

Each image's split is a pure function of its file name and ``data.split_seed``: the SHA-256 of both, read as a
number in [0, 1), falls into the validation share, then the test share, else training. Shuffling a file list
would reassign every image when one file is added; hashing assigns each file on its own, so adding or removing
images never moves the others (and the realised shares approach the configured fractions as the set grows).
Class (regularisation) images always train: they are not examples of the concept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

from sdtune.data.sources import Entry

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")


def split_position(name: str, seed: int) -> float:
    """Where ``name`` falls in [0, 1) for ``seed``: uniform over names, fixed per (name, seed)."""
    digest = hashlib.sha256(f"sdtune-split\0{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64)


def split_of(name: str, seed: int, validation: float, test: float = 0.0) -> Split:
    """The split of the file called ``name``: validation below ``validation``, test in the next ``test`` share."""
    u = split_position(name, seed)
    if u < validation:
        return "validation"
    if u < validation + test:
        return "test"
    return "train"


def split_entries(
    entries: Sequence[Entry], seed: int, validation: float, test: float = 0.0
) -> dict[Split, list[Entry]]:
    """``entries`` partitioned by :func:`split_of` on each image's file name (order kept within each split)."""
    out: dict[Split, list[Entry]] = {s: [] for s in SPLITS}
    for entry in entries:
        which = "train" if entry.is_reg else split_of(entry.image.name, seed, validation, test)
        out[which].append(entry)
    return out
