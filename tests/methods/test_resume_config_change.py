"""Resuming with an edited config names every changed field; changes that break the exact resume are refused
unless --allow-config-change is given, and then recorded in events.log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tests.methods.run_configs import sdtune_in_process, ti_run_config

from sdtune.train.config_changes import HARMLESS, Change, config_changes
from sdtune.train.rundir import RunDir


def _config(tmp_path: Path, model: Path, data: Path) -> Path:
    return ti_run_config(tmp_path, model, data, name="edited", max_steps=2, seed=3)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_with_changes_names_them_refuses_breaking_ones_and_records_allowed_ones(
    tmp_path, tiny_checkpoint, image_folder, monkeypatch, capsys
):
    cfg = _config(tmp_path, tiny_checkpoint("sd1"), image_folder)
    root = tmp_path / "runs" / "edited"
    code, _, err = sdtune_in_process(monkeypatch, capsys, "train", str(cfg))
    assert code == 0, err

    # A change of the batch size (and a harmless one) is refused: one line naming both, nothing written.
    before = _snapshot(root)
    code, _, err = sdtune_in_process(
        monkeypatch, capsys, "train", str(root), "--set", "data.batch_size=3", "--set", "train.max_steps=4"
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "data.batch_size 2 -> 3" in lines[0] and "train.max_steps 2 -> 4" in lines[0]
    assert "--allow-config-change" in lines[0]
    assert _snapshot(root) == before

    # Editing the run folder's own config.yaml is seen too: the checkpoint keeps the config it was trained with.
    stored = yaml.safe_load((root / "config.yaml").read_text())
    stored["train"]["seed"] = 4
    (root / "config.yaml").write_text(yaml.safe_dump(stored))
    code, _, err = sdtune_in_process(monkeypatch, capsys, "train", str(root), "--set", "train.max_steps=4")
    assert code == 2 and "train.seed 3 -> 4" in err, err
    stored["train"]["seed"] = 3
    (root / "config.yaml").write_text(yaml.safe_dump(stored))

    # Harmless changes are printed, recorded and go ahead.
    code, out, err = sdtune_in_process(
        monkeypatch, capsys, "train", str(root), "--set", "train.max_steps=4", "--set", "preview.steps=3"
    )
    assert code == 0, err
    line = "resuming with a changed config: train.max_steps 2 -> 4, preview.steps 2 -> 3"
    assert line in out
    assert line in (root / "events.log").read_text()
    assert RunDir(root).latest_checkpoint().step == 4

    # With the flag, a breaking change goes ahead and the log says so, with the changes.
    code, out, err = sdtune_in_process(
        monkeypatch,
        capsys,
        "train",
        str(root),
        "--set",
        "train.max_steps=6",
        "--set",
        "data.batch_size=3",
        "--allow-config-change",
    )
    assert code == 0, err
    line = "resuming with a changed config (--allow-config-change): data.batch_size 2 -> 3, train.max_steps 4 -> 6"
    assert line in out and line in (root / "events.log").read_text()
    assert "effective batch 3" in (root / "events.log").read_text()
    assert yaml.safe_load((root / "config.yaml").read_text())["data"]["batch_size"] == 3  # the new resolved config
    steps = [json.loads(row)["step"] for row in (root / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))

    # Resuming with the unchanged config says nothing about changes.
    code, out, err = sdtune_in_process(monkeypatch, capsys, "train", str(root), "--set", "train.max_steps=7")
    assert code == 0, err
    assert "(--allow-config-change)" not in out and "data.batch_size" not in out


@pytest.mark.parametrize(
    ("field", "harmless"),
    [
        ("train.max_steps", True),
        ("save.every_n_steps", True),
        ("preview.prompts", True),
        ("train.validation_every_n_steps", True),
        ("data.batch_size", False),
        ("data.path", False),
        ("data.repeats", False),
        ("data.resolution", False),
        ("data.buckets", False),
        ("train.grad_accum", False),
        ("train.seed", False),
        ("method", False),
        ("model.base", False),
        ("rank", False),
        ("optimizer.lr", False),
        ("train.some_field_added_later", False),  # the allowlist: a new field is breaking until listed
    ],
)
def test_which_changes_break_the_exact_resume(field, harmless):
    assert Change(field, 1, 2).harmless is harmless
    assert all(isinstance(h, str) for h in HARMLESS)


def test_config_changes_walks_nested_blocks_and_names_added_and_removed_fields():
    old = {"data": {"path": "a", "batch_size": 2}, "preview": {"prompts": ["x"]}, "rank": 4}
    new = {"data": {"path": "a", "batch_size": 3}, "preview": {"prompts": ["x", "y"]}, "alpha": 1.0}
    assert [str(c) for c in config_changes(old, new)] == [
        "data.batch_size 2 -> 3",
        'preview.prompts ["x"] -> ["x", "y"]',
        "alpha (unset) -> 1.0",
        "rank 4 -> (unset)",
    ]
