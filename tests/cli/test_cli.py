"""The real ``sdtune`` command: exit codes, one-line errors, inspect output."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sdtune.formats.hashes import a1111_legacy_hash, a1111_short_hash
from sdtune.models.loading import save_model

GOOD = """\
method: textual_inversion
name: teal-heart
token: <teal-heart>
data: {path: ./data}
"""


def sdtune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdtune.cli.main", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    result = sdtune("--help")
    assert result.returncode == 0
    assert "validate" in result.stdout and "inspect" in result.stdout


def test_validate_good_config_prints_resolved_yaml(tmp_path):
    path = tmp_path / "ti.yaml"
    path.write_text(GOOD)
    result = sdtune("validate", str(path), "--set", "optimizer.lr=1e-3")
    assert result.returncode == 0, result.stderr
    assert "lr: 0.001" in result.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=-0.001", "optimizer.lr: must be > 0 (got -0.001); e.g. 1e-4"),
        ("optimizer.lrr=0.1", "optimizer.lrr: unknown key; did you mean 'lr'?"),
        ("train.max_steps=many", "train.max_steps: expected an integer (got 'many'); e.g. 1000"),
        ("num_vectors=80", "num_vectors: must be <= 75 (got 80)"),
        ("method=lora2", "method: unknown method 'lora2'"),
    ],
)
def test_bad_config_is_one_line_naming_field_and_fix(tmp_path, override, message):
    path = tmp_path / "ti.yaml"
    path.write_text(GOOD)
    result = sdtune("validate", str(path), "--set", override)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_inspect_model_shows_family_and_hashes(tiny_model, tmp_path):
    path = save_model(tiny_model("sdxl"), tmp_path / "tiny.safetensors", dtype=torch.float16)
    result = sdtune("inspect", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "family: sdxl" in out
    assert a1111_short_hash(path) in out and a1111_legacy_hash(path) in out
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert component in out
    assert "float16" in out
    assert "modelspec.architecture" in out


def test_inspect_bad_file_is_one_line(tmp_path):
    path = tmp_path / "x.ckpt"
    path.write_bytes(b"not a checkpoint at all")
    result = sdtune("inspect", str(path))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert str(path) in result.stderr
