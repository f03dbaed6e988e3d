"""The run directory: the single source of truth for a run (the UI and resume read it).

    runs/<name>/config.yaml          the resolved config
                metrics.jsonl        one JSON object per step: step, loss, lr, images_per_second, ...
                events.log           human-readable log of what happened
                samples/step-<N>/    preview PNGs (with infotext) and grid.png
                checkpoints/step-<N>/ trainable.safetensors, optimizer.pt, state.json, rng.pt, export/
                output/              the exported artifacts

Every file is written atomically; a checkpoint folder is written under a temporary name and renamed, so a
crash never leaves a half checkpoint that resume would pick up.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdtune.core.atomic import atomic_dir, write_text

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    step: int
    path: Path

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
        """(trainable tensors, optimizer state, loop state, rng states)."""
        trainable = load_file(self.path / "trainable.safetensors")
        optimizer = torch.load(self.path / "optimizer.pt", map_location="cpu", weights_only=True)
        state = json.loads((self.path / "state.json").read_text(encoding="utf-8"))
        rng = torch.load(self.path / "rng.pt", map_location="cpu", weights_only=True)
        return trainable, optimizer, state, rng


class RunDir:
    """Paths and writers of one run folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.samples = self.root / "samples"
        self.output = self.root / "output"
        self.metrics_path = self.root / "metrics.jsonl"
        self.events_path = self.root / "events.log"
        self.config_path = self.root / "config.yaml"
        self.stop_path = self.root / "STOP"

    # -- graceful stop: any process (the web UI, a signal handler, a user with `touch`) may ask ---------
    def request_stop(self) -> None:
        """Ask a running job to stop after its current step, with a checkpoint and the exported files."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_text(self.stop_path, time.strftime("%Y-%m-%d %H:%M:%S\n"))

    def stop_requested(self) -> bool:
        return self.stop_path.exists()

    def clear_stop(self, older_than: float | None = None) -> None:
        """Remove the STOP file (only if it was written before ``older_than``, a ``time.time()``, when given)."""
        try:
            if older_than is None or self.stop_path.stat().st_mtime < older_than:
                self.stop_path.unlink(missing_ok=True)
        except FileNotFoundError:
            pass

    def ensure(self) -> None:
        """Create the run's folders (idempotent)."""
        for folder in (self.root, self.checkpoints, self.samples, self.output):
            folder.mkdir(parents=True, exist_ok=True)

    def create(self, config_yaml: str) -> None:
        self.ensure()
        write_text(self.config_path, config_yaml)

    # -- logs ----------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        with open(self.events_path, "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        rows = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: ignore it
                continue
        return rows

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric rows past ``after_step`` (steps a killed run did after its last checkpoint)."""
        rows = [r for r in self.metrics() if r.get("step", 0) <= after_step]
        write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    # -- checkpoints ---------------------------------------------------------------------------------
    def list_checkpoints(self) -> list[Checkpoint]:
        if not self.checkpoints.is_dir():
            return []
        found = []
        for path in self.checkpoints.iterdir():
            m = _STEP_DIR.match(path.name)
            if m and (path / "state.json").is_file():
                found.append(Checkpoint(int(m.group(1)), path))
        return sorted(found, key=lambda c: c.step)

    def latest_checkpoint(self) -> Checkpoint | None:
        found = self.list_checkpoints()
        return found[-1] if found else None

    def save_checkpoint(
        self,
        step: int,
        trainable: dict[str, torch.Tensor],
        optimizer: dict[str, Any],
        state: dict[str, Any],
        rng: dict[str, torch.Tensor],
        export=None,
        keep_last: int = 3,
    ) -> Path:
        """Write ``checkpoints/step-<step>/`` atomically; ``export(dir)`` may add exported files; prune old ones."""
        final = self.checkpoints / f"step-{step}"
        with atomic_dir(final) as tmp:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors")
            )
            torch.save(optimizer, tmp / "optimizer.pt")
            torch.save(rng, tmp / "rng.pt")
            if export is not None:
                export(tmp / "export")
            (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
        for old in self.list_checkpoints()[:-keep_last]:
            shutil.rmtree(old.path, ignore_errors=True)
        return final
