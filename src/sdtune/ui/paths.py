"""The folders the web UI may touch, and the one function that turns user input into a path inside them.

Every path the UI reads or writes (a dataset folder, a caption file, a config to load or save, a run folder,
the paths inside a training config) goes through :meth:`Roots.resolve`. It resolves ``..`` and symbolic links
first and then checks the real location, so ``../``, an absolute path elsewhere and a link that points out of
the roots are all refused with a one-line message. Gradio's own file route is limited to the same roots (see
``app.launch``), so a file outside them is neither shown nor downloadable.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sdtune.config import parse_config
from sdtune.config.methods import RunBase
from sdtune.core.errors import SdtuneError


class PathRefused(SdtuneError):
    """A path points outside the folders the UI was started with."""


class Roots:
    """The allowed folders (real paths, symlinks resolved). Relative input is taken relative to the first."""

    def __init__(self, roots: Iterable[str | os.PathLike[str]]) -> None:
        resolved: list[Path] = []
        for root in roots:
            path = Path(root).expanduser()
            if not path.is_dir():
                raise PathRefused(f"--root {root}: no such folder; give an existing folder the UI may use")
            real = path.resolve()
            if real not in resolved:
                resolved.append(real)
        if not resolved:
            raise PathRefused("--root: give at least one folder the UI may read and write")
        self.folders: tuple[Path, ...] = tuple(resolved)

    @property
    def home(self) -> Path:
        """The first root: relative paths start here, and training jobs run here."""
        return self.folders[0]

    def shown(self) -> str:
        return ", ".join(str(f) for f in self.folders)

    def contains(self, path: str | os.PathLike[str]) -> bool:
        real = Path(path).resolve()
        return any(real == root or real.is_relative_to(root) for root in self.folders)

    def resolve(self, path: str | os.PathLike[str], *, what: str = "path", must_exist: bool = False) -> Path:
        """The real, absolute location of ``path`` if it lies inside a root; else :class:`PathRefused`.

        ``what`` names the input in the message (``data.path``, ``dataset folder``). Symbolic links are followed
        before the check, so a link inside a root that points elsewhere is refused like the place it points to.
        """
        text = str(path).strip()
        if not text:
            raise PathRefused(f"{what}: empty; give a path inside {self.shown()}")
        if "\0" in text:
            raise PathRefused(f"{what}: contains a NUL character; give a plain path inside {self.shown()}")
        given = Path(text)
        candidate = given if given.is_absolute() else self.home / given
        try:
            real = candidate.resolve()  # follows every symlink, also of missing trailing parts' parents
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise PathRefused(f"{what}: {text} cannot be resolved ({exc}); give a plain path") from None
        if not any(real == root or real.is_relative_to(root) for root in self.folders):
            how = "is a link that points" if _has_link(candidate) else "is"
            raise PathRefused(
                f"{what}: {text} {how} outside the folders this UI may use ({self.shown()}); "
                "choose a path inside them or start `sdtune ui --root DIR` with its folder"
            )
        if must_exist and not real.exists():
            raise PathRefused(f"{what}: {text} does not exist; give an existing path inside {self.shown()}")
        return real


def _has_link(path: Path) -> bool:
    """True if ``path`` or one of its parents is a symbolic link (for a clearer message)."""
    current = path
    while True:
        if current.is_symlink():
            return True
        if current.parent == current:
            return False
        current = current.parent


# Config values that are not paths although their field holds one.
_NOT_PATHS = {"model.base": {"builtin"}}


def _is_path_field(key: str) -> bool:
    return key in ("path", "base", "init_embedding", "template") or key.endswith(("_path", "_dir"))


def confine_config(cfg: RunBase, roots: Roots) -> RunBase:
    """``cfg`` with every path setting (``data.path``, ``output_dir``, ``model.base``, ``*_dir``, ...) made
    absolute inside the roots; :class:`PathRefused` names the first setting that points outside.

    Relative paths are taken relative to the first root (where UI jobs run), so the saved config trains the
    same data from any working folder. ``builtin`` and shipped template names are not paths.
    """
    from sdtune.data.templates import TEMPLATE_SETS

    data = cfg.model_dump(mode="json")

    def visit(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            dotted = prefix + key
            if isinstance(value, dict):
                visit(value, dotted + ".")
            elif isinstance(value, str) and value.strip() and _is_path_field(key):
                if value in _NOT_PATHS.get(dotted, ()) or (key == "template" and value in TEMPLATE_SETS):
                    continue
                node[key] = str(roots.resolve(value, what=dotted))

    visit(data, "")
    return parse_config(data, type(cfg))
