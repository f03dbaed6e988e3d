"""A real training run on the bad-file corpus: bad files skipped by name, the rest trained on, the folder untouched."""

from __future__ import annotations

import io

import torch
from bad_corpus import build_corpus, snapshot
from rich.console import Console

from sdtune.config import TextualInversionConfig
from sdtune.methods.run import run
from sdtune.models.loading import save_model


def test_textual_inversion_on_the_corpus_skips_bad_files_by_name_and_trains(tmp_path, tiny_model):
    corpus = build_corpus(tmp_path / "corpus")
    before = snapshot(corpus.root)
    model = save_model(tiny_model("sd1"), tmp_path / "tiny.safetensors", dtype=torch.float32)
    cfg = TextualInversionConfig.model_validate(
        {
            "method": "textual_inversion",
            "name": "corpus",
            "output_dir": str(tmp_path / "runs"),
            "token": "<thing>",
            "init_text": "red",
            "model": {"base": str(model)},
            "data": {"path": str(corpus.root), "template": "subject", "resolution": 16, "batch_size": 2},
            "train": {"max_steps": 2},
            "preview": {"before_training": False, "steps": 2},
        }
    )
    out = io.StringIO()
    outputs = run(cfg, console=Console(file=out, width=400), progress=False)
    printed = out.getvalue()
    for name in corpus.skipped_by_training:
        assert f"{name}:" in printed, (name, printed)  # every skipped file is named, with its reason
    assert sorted(p.suffix for p in outputs) == [".png", ".pt", ".safetensors"]
    assert all(p.is_file() for p in outputs)
    metrics = (tmp_path / "runs" / "corpus" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2  # it trained on what was left
    assert snapshot(corpus.root) == before  # the source folder is untouched
