"""Shared by the run-folder tests (disk full, changed-config resume, run lock): a small textual-inversion run's
config file, and the CLI called in-process."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from sdtune.cli.main import main


def ti_run_config(tmp_path: Path, model: Path, data: Path, *, name: str, max_steps: int, seed: int, **extra) -> Path:
    """``<tmp_path>/<name>.yaml``: textual inversion at 16 px, batch 2, a checkpoint every 2 steps, into
    ``<tmp_path>/runs/<name>``; ``extra`` adds top-level fields (e.g. ``num_vectors``)."""
    path = tmp_path / f"{name}.yaml"
    raw = {
        "method": "textual_inversion",
        "name": name,
        "output_dir": str(tmp_path / "runs"),
        "token": "<thing>",
        "init_text": "red",
        "model": {"base": str(model)},
        "data": {"path": str(data), "template": "subject", "resolution": 16, "batch_size": 2},
        "train": {"max_steps": max_steps, "seed": seed},
        "save": {"every_n_steps": 2},
        "preview": {"before_training": False, "steps": 2},
    } | extra
    path.write_text(yaml.safe_dump(raw))
    return path


def sdtune_in_process(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``sdtune ARGS`` through the real entry point in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["sdtune", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
