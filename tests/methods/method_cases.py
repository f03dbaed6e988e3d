"""One table of small runs, one per method path, and the config writer the per-method tests share (precision,
gradient checkpointing, the estimate): each test picks the cases it needs and sets its own ``train`` fields."""

from __future__ import annotations

import yaml

from sdtune.config import load_train_config

_TOKEN = {"token": "<thing>", "init_text": "square", "data": {"template": "subject_filewords"}}
CASES = {
    "lora": {"method": "lora", "rank": 4, "optimizer": {"lr": 1e-2}},
    "loha": {"method": "lora", "adapter": "loha", "rank": 4, "optimizer": {"lr": 1e-2}},
    "lokr": {"method": "lora", "adapter": "lokr", "rank": 4, "optimizer": {"lr": 1e-2}},
    "oft": {"method": "lora", "adapter": "oft", "block_size": 4, "constraint": 0.05, "optimizer": {"lr": 1e-2}},
    "boft": {"method": "lora", "adapter": "boft", "block_size": 4, "rescaled": True, "optimizer": {"lr": 1e-2}},
    "lora_text_encoder": {"method": "lora", "rank": 4, "train_text_encoder": True, "optimizer": {"lr": 1e-2}},
    "pivotal": {"method": "lora", "rank": 4, "optimizer": {"lr": 1e-2}} | _TOKEN,
    "textual_inversion": {"method": "textual_inversion", "optimizer": {"lr": 0.05}} | _TOKEN,
    "hypernetwork": {"method": "hypernetwork", "optimizer": {"lr": 1e-2}},
    "dreambooth": {
        "method": "dreambooth",
        "instance_token": "sks",
        "instance_prompt": "a sks shape",
        "prior_preservation": False,
    },
    "finetune": {"method": "finetune", "train_text_encoder": True},
}


def case_config(tmp_path, base, folder, case: str, *, name: str | None = None, preview: dict | None = None, **train):
    """The validated config of ``CASES[case]`` on ``base`` and the images in ``folder`` (batch 2, 2 steps unless
    ``train`` says otherwise), written to ``<tmp_path>/<name>.yaml`` (``name`` defaults to the case)."""
    extra = dict(CASES[case])
    name = name or case
    raw = {
        "name": name,
        "output_dir": str(tmp_path / "runs"),
        "model": {"base": str(base)},
        "data": {"path": str(folder), "batch_size": 2} | extra.pop("data", {}),
        "train": {"max_steps": 2} | train,
        "preview": preview or {"steps": 2, "before_training": False},
    } | extra
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return load_train_config(path)
