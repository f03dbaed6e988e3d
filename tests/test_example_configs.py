"""Every shipped example config validates (and names its command in its header)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdtune.config import load_train_config

METHOD_ABBREVIATIONS = {
    "ti": "textual_inversion",
    "hn": "hypernetwork",
    "db": "dreambooth",
    "ft": "finetune",
} | dict.fromkeys(("lora", "dora", "locon", "loha", "lokr", "oft", "boft"), "lora")
CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_example_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_validates(path):
    cfg = load_train_config(path)
    assert cfg.method == METHOD_ABBREVIATIONS[path.name.split("_")[1]]  # <family>_<method>_<what>.yaml
    header = path.read_text().splitlines()[:6]
    assert any(line.startswith("# command:") for line in header), "header must show the command that runs it"
