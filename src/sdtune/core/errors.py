"""User-facing errors.

Every error sdtune raises for bad input is an :class:`SdtuneError` whose message is one line that names
the thing that is wrong (a config field, a file) and how to fix it. The CLI prints the message alone,
never a traceback.
"""

from __future__ import annotations


class SdtuneError(Exception):
    """Base class: a one-line message naming the bad thing and the fix."""

    def __init__(self, message: str) -> None:
        # Keep messages to one line: the CLI and the UI show them verbatim.
        super().__init__(" ".join(str(message).split("\n")))


class ConfigError(SdtuneError):
    """A config file or override is invalid."""


class ModelError(SdtuneError):
    """A model file or folder cannot be read, is unsafe, or is of no known family."""


class DataError(SdtuneError):
    """A dataset is missing, empty or unusable."""


class TrainingError(SdtuneError):
    """Training cannot start or had to stop (e.g. a non-finite loss)."""
