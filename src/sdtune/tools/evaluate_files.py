"""``sdtune eval``: the training-time evaluation for any finished file or run folder.

- A **run folder**: its ``output/`` applied to its base model as users apply it (:mod:`sdtune.tools.apply_outputs`),
  scored with the run's own ``eval:`` block (the same prompts, seeds and sampler), drift against the run's saved
  reference images of the base model (``eval/reference.safetensors``) when it has one. So a run's best step,
  re-evaluated from its exported files, gives its figures again.
- A **file** (sdtune's or another tool's): a LoRA / LyCORIS file, an embedding, an A1111 hypernetwork or a whole
  checkpoint, applied to ``--base``; prompts and scorer from the options (an :class:`EvalConfig`); drift against
  the base model's images made now.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sdtune.config import load_train_config
from sdtune.config.blocks import EvalConfig
from sdtune.core.errors import ConfigError, SdtuneError
from sdtune.evaluate.evaluation import Evaluation
from sdtune.methods.evaluation import Target, build_evaluation, load_scorers, target_of
from sdtune.models.components import SDComponents, native_size
from sdtune.models.loading import load_model
from sdtune.tools.apply_outputs import Addition, apply_additions, load_with_output, run_output
from sdtune.train.rundir import RunDir

LORA_MARKS = ("lora_down", "lora_up", "lora_A", "lora_B", "hada_w1", "lokr_w1", "oft_blocks", "oft_diag", "dora_scale")
EMBEDDING_KEYS = ("emb_params", "clip_l", "clip_g", "string_to_param")


def file_kind(path: Path) -> str:
    """``lora``, ``embedding``, ``hypernetwork`` or ``model`` from the file's keys (never unpickling unsafely)."""
    if path.is_dir():
        return "model"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            keys = list(fh.keys())
        if any(mark in key for key in keys for mark in LORA_MARKS):
            return "lora"
        if any(key.startswith(("model.diffusion_model.", "unet.", "down_blocks.")) for key in keys):
            return "model"
        if any(key in EMBEDDING_KEYS for key in keys) or len(keys) == 1:
            return "embedding"
        raise SdtuneError(f"{path}: not a LoRA, embedding or checkpoint sdtune knows; give --kind")
    if path.suffix in (".pt", ".bin", ".ckpt"):
        from sdtune.core.safe_load import load_torch_file

        data = load_torch_file(path, SdtuneError, "LoRA, embedding, hypernetwork or checkpoint")
        if isinstance(data, dict) and ("string_to_param" in data or "emb_params" in data):
            return "embedding"
        if isinstance(data, dict) and ("state_dict" in data or any(str(k).startswith("model.") for k in data)):
            return "model"
        if isinstance(data, dict) and any(isinstance(k, int) for k in data):
            return "hypernetwork"
        raise SdtuneError(f"{path}: not an embedding, hypernetwork or checkpoint sdtune knows; give --kind")
    raise SdtuneError(f"{path}: unknown file type {path.suffix!r}; give a .safetensors, .pt or .ckpt file")


def score(
    evaluation: Evaluation,
    model: SDComponents,
    to_model: Callable[[list[str]], list[str]],
    reference: dict | None,
    grid: Path | None = None,
) -> dict[str, float]:
    images = evaluation.images(model, to_model)
    if grid is not None:
        evaluation.save_grid(images, grid)
    return evaluation.figures(images, reference)


def base_reference(evaluation: Evaluation, base: str) -> dict | None:
    """Drift's baseline made now: the base model's images of the prior prompts."""
    if not evaluation.prior:
        return None
    images = evaluation.images(load_model(base))
    return evaluation.scorer.reference(images.prior)


def _expander(model: SDComponents, additions, prompts: list[str]) -> Callable[[list[str]], list[str]]:
    written = apply_additions(model, additions, prompts) if additions else list(prompts)
    table = dict(zip(prompts, written, strict=True))
    return lambda texts: [table.get(t, t) for t in texts]


def evaluate_run(root: str | Path, strength: float = 1.0, grid: Path | None = None) -> dict[str, float]:
    """The figures of a run's ``output/`` with the run's own evaluation."""
    run = RunDir(root)
    cfg = load_train_config(run.config_path) if run.config_path.is_file() else None
    if cfg is None:
        raise SdtuneError(f"{run.root}: not a run folder (no config.yaml); give a run folder or a file with --base")
    if cfg.eval is None:
        raise ConfigError(f"{run.root}: the run has no eval: block; evaluate its file with --concept or --prompt")
    scorers = load_scorers(cfg.eval, cfg.model.base)
    if scorers.kind is None:
        raise ConfigError(scorers.notice or "eval: no scorer")
    output = run_output(run.root)
    if output.model is not None:
        model, _ = load_with_output(output, strength)
        to_model = list
    else:
        model = load_model(output.base)
        to_model = None
    target = target_of(cfg, cfg.data.resolution or native_size(model))
    evaluation = build_evaluation(cfg.eval, scorers, target)
    if to_model is None:
        to_model = _expander(model, output.with_strength(strength), evaluation.concept)
    reference = evaluation.load_reference(run.eval_dir) if evaluation.prior else None
    if reference is None:
        reference = base_reference(evaluation, cfg.model.base)
    return score(evaluation, model, to_model, reference, grid)


def evaluate_file(
    path: str | Path,
    base: str,
    e: EvalConfig,
    word: str | None = None,
    kind: str | None = None,
    strength: float = 1.0,
    grid: Path | None = None,
    resolution: int | None = None,
) -> dict[str, float]:
    """The figures of ``path`` (a LoRA, embedding, hypernetwork or checkpoint) applied to ``base``, at
    ``resolution`` (default: the model's native size)."""
    path = Path(path)
    if not path.exists():
        raise SdtuneError(f"{path}: no such file; give a LoRA, embedding, hypernetwork, checkpoint or run folder")
    kind = kind or file_kind(path)
    scorers = load_scorers(e, base)
    if scorers.kind is None:
        raise ConfigError(scorers.notice or "eval: no scorer")
    if kind == "model":
        from sdtune.tools.apply_outputs import blend_with_base

        model = load_model(path)
        if strength != 1.0:
            blend_with_base(model, load_model(base), strength)
        additions = []
    elif kind == "embedding":  # A1111: the file's name is the word prompts use, unless --word says another
        from sdtune.formats.embeddings import load_embedding

        model = load_model(base)
        word = word or load_embedding(path).name
        additions = [Addition("embedding", path, word=word)]
    else:
        model = load_model(base)
        additions = [Addition(kind, path, strength)]
    method = "textual_inversion" if kind == "embedding" else "file"  # a new word: no prior prompts (no drift)
    # --word names an embedding's new token, or a LoRA's / model's trigger (written before the class word)
    target = Target(
        method, word, resolution or native_size(model), images=e.reference_images, trigger=kind != "embedding"
    )
    evaluation = build_evaluation(e, scorers, target)
    to_model = _expander(model, additions, evaluation.concept)
    return score(evaluation, model, to_model, base_reference(evaluation, base), grid)
