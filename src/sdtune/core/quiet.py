"""Keep third-party chatter off sdtune's console: the console (and the web UI's event log, which reads a run's
output) shows sdtune's lines only.

transformers, diffusers, accelerate, huggingface_hub, peft and torch log notices ("requires torchvision ...",
"should be kept in float32 ..."), draw progress bars ("Loading weights", "Loading pipeline components") and raise
Python warnings (FutureWarning, dtype casts). :func:`install` (once, at CLI start; imports nothing heavy, so
``sdtune --help`` stays fast) turns their bars off, lowers their loggers' output to errors and catches their Python
warnings; :func:`run_log` (around a run) writes all of it into the run's ``events.log`` as ``debug`` lines, with
what arrived before the run folder existed. Set ``TRANSFORMERS_VERBOSITY`` / ``DIFFUSERS_VERBOSITY`` yourself
to see a library's messages on the console again. Warnings raised in sdtune's own code are printed as they are.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LIBRARIES = (
    "transformers",
    "diffusers",
    "accelerate",
    "huggingface_hub",
    "peft",
    "torch",
    "torchao",
    "safetensors",
    "PIL",
)
_SDTUNE_DIR = str(Path(__file__).resolve().parents[1])
_WARNINGS = "sdtune.third_party"


class _Sink(logging.Handler):
    """Third-party records: kept (the last ``keep``) until a run log is attached, then written there."""

    def __init__(self, keep: int = 500) -> None:
        super().__init__(logging.DEBUG)
        self.pending: deque[logging.LogRecord] = deque(maxlen=keep)
        self.path: Path | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.path is None:
            self.pending.append(record)
            return
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(self.line(record))
        except OSError:
            pass  # a full disk or a removed run folder must not turn a library's notice into a failure

    def line(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        text = " ".join(record.getMessage().split())  # one line per record
        return f"{stamp} debug {record.name}: {text}\n"

    def attach(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            while self.pending:
                self.emit(self.pending.popleft())


_sink = _Sink()
_installed = False
_user_verbosity: set[str] = set()  # libraries whose verbosity the user set: left as they are


def install() -> None:
    """Silence third-party logging, progress bars and warnings on the console (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    _user_verbosity.update(lib for lib in ("transformers", "diffusers") if f"{lib.upper()}_VERBOSITY" in os.environ)
    # read by the libraries when they are first imported; a user's own setting wins
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # huggingface_hub and transformers' bars
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # torch puts its own stderr handler on its loggers when imported (e.g. the pytree notices torchao's import
    # triggers); TORCH_LOGS=-all sets them to errors only
    os.environ.setdefault("TORCH_LOGS", "-all")
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        logger.addHandler(_sink)
        logger.propagate = False  # and no last-resort printing of loggers without handlers
    logging.getLogger(_WARNINGS).addHandler(_sink)
    logging.getLogger(_WARNINGS).propagate = False
    logging.getLogger(_WARNINGS).setLevel(logging.DEBUG)
    warnings.showwarning = _show_warning
    _configure_loaded()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if str(filename).startswith(_SDTUNE_DIR):  # sdtune's own warning: the user should see it
        print(f"warning: {message}", file=file or sys.stderr)
        return
    logging.getLogger(_WARNINGS).debug("%s: %s (%s:%s)", category.__name__, message, filename, lineno)


def _configure_loaded() -> None:
    """Route the libraries already imported: their own console handlers off, records into the sink."""
    for module, name in (("transformers.utils.logging", "transformers"), ("diffusers.utils.logging", "diffusers")):
        lib = sys.modules.get(module)
        if lib is None or name in _user_verbosity:
            continue
        lib.disable_progress_bar()
        lib.disable_default_handler()
        logger = logging.getLogger(name)
        if _sink not in logger.handlers:
            logger.addHandler(_sink)
        logger.propagate = False
        logger.setLevel(logging.WARNING)  # their warnings reach events.log; the console sees none


@contextmanager
def run_log(path: Path) -> Iterator[None]:
    """While a run trains: third-party messages (and those kept since start-up) go to ``path`` (its events.log)."""
    if not _installed:  # used as a library (tests, notebooks): leave the caller's logging alone
        yield
        return
    _configure_loaded()  # the models' libraries are imported by now
    previous = _sink.path
    _sink.attach(path)
    try:
        yield
    finally:
        _configure_loaded()
        _sink.attach(previous)
