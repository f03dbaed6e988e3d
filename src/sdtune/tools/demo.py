"""``sdtune demo``: teach the built-in model a concept it has never seen, and show what was learned.

The concept is the shapes world's held-out pairing *teal heart*: the base model drew teal circles, squares, ...
and hearts of every other colour, but never a teal heart. The demo writes its small dataset and scores, on
prompts that put the concept on backgrounds its images never show:

* the new word before training (its vectors initialised from "heart", A1111's rule): hearts of any colour;
* the new word after training: the concept, if the embedding learned it;
* for reference, the base model asked in plain words ("a teal heart on a blue background");

plus the base prompts before and after (they do not contain the new word, so they must not move). It writes
before/after grids, the numbers, the loss plot and the embedding files.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from rich.console import Console

from sdtune.adapters.token_embedding import a1111_init, apply_embedding, expand_token
from sdtune.config import TextualInversionConfig
from sdtune.core.atomic import write_text
from sdtune.evaluate.world_eval import BUILTIN_EVAL, WorldScore, score_prompts
from sdtune.inference.generate import grid
from sdtune.inference.infotext import save_png
from sdtune.methods.run import run
from sdtune.models.components import SDComponents
from sdtune.models.loading import load_model
from sdtune.tools.apply_outputs import add_embedding
from sdtune.world import EvalPrompt, base_prompts, concept_dataset, eval_prompts, get_concept, render

TOKEN = "<teal-heart>"
CONCEPT = "teal_heart"
INIT_TEXT = "heart"


@dataclass
class DemoSettings:
    """The demo's recipe; the defaults train and score in about 70 s on 2 CPU cores (BENCHMARKS.md)."""

    steps: int = 500
    lr: float = 5e-3
    num_vectors: int = 2
    batch_size: int = 4
    images: int = 20
    base_prompts: int = 32
    seed: int = 0


def write_dataset(folder: Path, n: int, seed: int) -> Path:
    """Concept images with captions that name only the background (the template adds the token)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (scene, _) in enumerate(concept_dataset(get_concept(CONCEPT), n=n, seed=seed)):
        save_png(render(scene), folder / f"{i:04d}.png")
        write_text(folder / f"{i:04d}.txt", f"a {scene.bg} background")
    write_text(folder.parent / "template.txt", "a [name] on [filewords]\n")
    return folder


def score_word(model: SDComponents, prompts: list[EvalPrompt], num_vectors: int = 1) -> WorldScore:
    """The demo's score: ``prompts`` (with the new word written out as ``num_vectors`` tokens), 2 images each."""
    expanded = [EvalPrompt(expand_token(p.prompt, TOKEN, num_vectors), p.expect) for p in prompts]
    return score_prompts(model, expanded, BUILTIN_EVAL, seed=1000, images_per_prompt=2)


def _with_initial_token(model: SDComponents, num_vectors: int) -> SDComponents:
    """``model`` with the new word added as training starts it: A1111's initialisation from ``INIT_TEXT``."""
    tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
    ids = tokenizer(INIT_TEXT, add_special_tokens=False).input_ids
    vectors = a1111_init(encoder.get_input_embeddings().weight.detach(), ids, num_vectors)
    apply_embedding(model.tokenizers, model.text_encoders, TOKEN, [vectors])
    return model


def _labelled_grid(images: list[Image.Image], label: str) -> Image.Image:
    sheet = grid(images, columns=min(8, len(images)))
    out = Image.new("RGB", (sheet.width, sheet.height + 14), "white")
    out.paste(sheet, (0, 14))
    ImageDraw.Draw(out).text((2, 1), label, fill="black")
    return out


def demo_config(
    root: Path, data: Path, settings: DemoSettings, base: str = "builtin", preview_every: int = 100
) -> TextualInversionConfig:
    """The demo's textual-inversion run (into ``root/run``) on ``data`` as :func:`write_dataset` wrote it."""
    preview_prompts = [p.prompt for p in eval_prompts(CONCEPT, token=TOKEN)[:4]]
    return TextualInversionConfig.model_validate(
        {
            "method": "textual_inversion",
            "name": "run",
            "output_dir": str(root),
            "token": TOKEN,
            "num_vectors": settings.num_vectors,
            "init_text": INIT_TEXT,
            "model": {"base": base},
            "data": {"path": str(data), "template": str(root / "template.txt"), "batch_size": settings.batch_size},
            "optimizer": {"lr": settings.lr},
            "train": {"max_steps": settings.steps, "seed": settings.seed},
            "save": {"every_n_steps": 0},
            "preview": {"every_n_steps": preview_every, "prompts": preview_prompts, "cfg_scale": 5.0},
        }
    )


def with_trained_word(model: SDComponents, outputs: list[Path]) -> SDComponents:
    """``model`` with the embedding the demo's run wrote (``outputs``) known as :data:`TOKEN`."""
    add_embedding(model, next(p for p in outputs if p.suffix == ".safetensors"), word=TOKEN)
    return model


def run_demo(out_root: Path, settings: DemoSettings, console: Console | None = None) -> dict:
    """Run the demo into ``out_root/demo-teal-heart``; returns the report dict (also written as report.json)."""
    console = console or Console()
    start = time.perf_counter()
    root = Path(out_root) / "demo-teal-heart"
    data = write_dataset(root / "data", settings.images, settings.seed)
    concept_set = eval_prompts(CONCEPT, token=TOKEN)
    words_set = eval_prompts(CONCEPT)  # the same prompts and expectations, the concept in words
    base_set = base_prompts(settings.base_prompts, seed=0)

    console.print("scoring the built-in model before training ...")
    base_model = load_model("builtin")
    words_concept = score_word(base_model, words_set)
    before_concept = score_word(
        _with_initial_token(load_model("builtin"), settings.num_vectors), concept_set, settings.num_vectors
    )
    before_base = score_prompts(base_model, base_set, BUILTIN_EVAL, seed=1000)

    cfg = demo_config(root, data, settings)
    run_folder = root / "run"
    if run_folder.exists():
        import shutil

        shutil.rmtree(run_folder)  # the demo always starts fresh
    outputs = run(cfg, console=console)

    console.print("scoring again with the trained embedding ...")
    after_model = with_trained_word(load_model("builtin"), outputs)
    after_concept = score_word(after_model, concept_set, settings.num_vectors)
    after_base = score_prompts(after_model, base_set, BUILTIN_EVAL, seed=1000)

    before_after = root / "before_after.png"
    rows = [
        _labelled_grid(before_concept.images[:16], f"before training: {TOKEN} prompts (initialised as '{INIT_TEXT}')"),
        _labelled_grid(after_concept.images[:16], f"after {settings.steps} steps: {TOKEN} prompts"),
    ]
    canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    canvas.paste(rows[0], (0, 0))
    canvas.paste(rows[1], (0, rows[0].height))
    save_png(canvas, before_after)
    report = {
        "concept": CONCEPT,
        "token": TOKEN,
        "steps": settings.steps,
        # the new word before and after training; for reference the base model asked in plain words
        "concept_fidelity": {
            "before": before_concept.full,
            "after": after_concept.full,
            "words": words_concept.full,
            "n": after_concept.n,
        },
        "base_accuracy": {"before": before_base.full, "after": after_base.full, "n": after_base.n},
        "files": {
            "before_after": str(before_after),
            "loss_plot": str(run_folder / "loss.png"),
            "samples": str(run_folder / "samples"),
            "embeddings": [str(p) for p in outputs],
        },
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_text(root / "report.json", json.dumps(report, indent=1))
    return report
