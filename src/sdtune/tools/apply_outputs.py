"""What training wrote, put on a loaded model the way a user applies it: the one place for ``sdtune generate`` and
the web UI's "generate with this".

- LoRA files (kohya / LyCORIS / PEFT layouts) through :func:`sdtune.tools.lora_tools.apply_lora`, scaled by a
  weight (A1111's ``<lora:name:weight>``);
- A1111 hypernetworks through :func:`sdtune.inference.generate.apply_hypernetwork` at a strength (multiplier);
- textual-inversion embeddings as new words (A1111's convention: the file's name is the word; a run's own output
  is applied under the token it trained, so its preview prompts work as written);
- whole models (DreamBooth, fine-tune) in place of the base; below strength 1 blended with the base weight by
  weight, ``base + s * (tuned - base)`` (A1111's checkpoint merger, "weighted sum").

Strength 0 gives exactly the base model's weights for LoRA, hypernetworks and whole models; an embedding has no
strength (its word is simply known or not).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from sdtune.config import load_train_config
from sdtune.core.errors import ModelError, SdtuneError
from sdtune.models.components import SDComponents
from sdtune.models.loading import load_model
from sdtune.train.rundir import RunDir

Kind = Literal["embedding", "hypernetwork", "lora"]


@dataclass(frozen=True)
class Addition:
    """One file to add to a model: an embedding, a hypernetwork or a LoRA."""

    kind: Kind
    path: Path
    strength: float = 1.0  # LoRA weight / hypernetwork multiplier; embeddings have none
    word: str | None = None  # embeddings: the word prompts use (default: the file's name, as in A1111)


def parse_file_strength(text: str, option: str) -> tuple[Path, float]:
    """``FILE`` or ``FILE:strength`` (``--hypernetwork style.pt:0.6``); a missing file is a one-line error."""
    path, _, tail = text.rpartition(":")
    try:
        file, strength = (Path(path), float(tail)) if path else (Path(text), 1.0)
    except ValueError:
        file, strength = Path(text), 1.0  # a ':' that is part of the path (C:\...)
    if not file.is_file():
        raise SdtuneError(f"{option}: no such file {str(file)!r}; give FILE or FILE:strength, e.g. style.pt:0.8")
    return file, strength


def add_embedding(components: SDComponents, path: str | Path, word: str | None = None) -> tuple[str, int]:
    """Make the embedding file's word usable in prompts; returns (word, vectors). The word is ``word`` or the name
    the file gives (A1111: its file name)."""
    from sdtune.adapters.token_embedding import apply_embedding
    from sdtune.formats.embeddings import check_width, load_embedding

    emb = load_embedding(path, name=word)
    check_width(emb, tuple(e.get_input_embeddings().embedding_dim for e in components.text_encoders), path)
    keys = ("clip_l", "clip_g") if emb.is_sdxl else ("text_encoder",)
    try:
        apply_embedding(components.tokenizers, components.text_encoders, emb.name, [emb.vectors[k] for k in keys])
    except ValueError as exc:
        raise SdtuneError(f"{path}: {exc}; rename the file to use another trigger word") from None
    return emb.name, emb.num_vectors


def apply_additions(
    components: SDComponents,
    additions: Sequence[Addition],
    prompts: Sequence[str],
    report: Callable[[str], None] | None = None,
) -> list[str]:
    """Apply every addition in order (several hypernetworks chain, several LoRAs add up); return ``prompts`` with
    multi-vector embedding words written out in full (what the tokenizer needs)."""
    from sdtune.adapters.token_embedding import expand_token
    from sdtune.inference.generate import apply_hypernetwork
    from sdtune.tools.lora_tools import apply_lora

    prompts = list(prompts)
    for item in additions:
        if item.kind == "embedding":
            word, vectors = add_embedding(components, item.path, item.word)
            prompts = [expand_token(p, word, vectors) for p in prompts]
            message = f"embedding {item.path}: write '{word}' in prompts ({vectors} vectors)"
        elif item.kind == "hypernetwork":
            apply_hypernetwork(components, item.path, item.strength)
            message = f"hypernetwork {item.path} at strength {item.strength:g}"
        elif item.kind == "lora":
            apply_lora(components, item.path, item.strength)
            message = f"LoRA {item.path} at weight {item.strength:g}"
        else:
            raise ValueError(item.kind)
        if report is not None:
            report(message)
    return prompts


def blend_with_base(model: SDComponents, base: SDComponents, strength: float) -> None:
    """Make ``model``'s weights ``base + strength * (model - base)`` in place (0: the base, 1: unchanged)."""
    if model.family.arch != base.family.arch:
        raise ModelError(f"the output is a {model.family.arch} model but its base is {base.family.arch}; blend a pair")
    theirs = base.modules()
    with torch.no_grad():
        for name, module in model.modules().items():
            reference = theirs[name].state_dict()
            for key, value in module.state_dict().items():  # tensors that share the module's storage
                other = reference.get(key)
                if other is None or other.shape != value.shape:
                    raise ModelError(f"{name}.{key}: the output and its base differ in shape; blend a matching pair")
                if value.is_floating_point():
                    value.copy_(torch.lerp(other.to(value.dtype), value, float(strength)))


# -- a run folder's output ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOutput:
    """What a run folder's ``output/`` holds, ready to apply: a whole model, or additions to its base."""

    method: str
    base: str  # the model the run trained on (config ``model.base``)
    model: Path | None = None  # DreamBooth / fine-tune: the exported whole model
    additions: tuple[Addition, ...] = ()  # at strength 1; LoRA and hypernetwork take the chosen strength

    def with_strength(self, strength: float) -> tuple[Addition, ...]:
        return tuple(
            Addition(a.kind, a.path, strength, a.word) if a.kind in ("lora", "hypernetwork") else a
            for a in self.additions
        )


def run_output(run_root: str | Path, last: bool = False) -> RunOutput:
    """The output files of the run at ``run_root`` by its method (read from its ``config.yaml``); with ``last`` the
    last step's (``output/last/``, where evaluation kept an earlier best step in ``output/``)."""
    run = RunDir(run_root)
    try:
        cfg = load_train_config(run.config_path)
    except SdtuneError as exc:
        raise SdtuneError(f"{run.root}: no readable config.yaml ({exc}); choose a run folder") from None
    output = run.output / "last" if last and (run.output / "last").is_dir() else run.output
    files = sorted(f for f in output.iterdir() if f.name != "last") if output.is_dir() else []
    if not files:
        raise SdtuneError(f"{run.root.name}: no output files yet; finish or stop the run first")
    token = getattr(cfg, "token", None)

    def named(name: str, what: str) -> Path:
        path = output / name
        if not path.exists():
            raise SdtuneError(f"{run.root.name}: no {what} {name} in output/; finish or stop the run first")
        return path

    def token_embedding() -> Path | None:  # TI's file, or LoRA's pivotal token: the .safetensors that is not `name`
        return next((f for f in files if f.suffix == ".safetensors" and f.stem != cfg.name), None)

    if cfg.method == "textual_inversion":
        embedding = token_embedding() or named(f"{cfg.name}.safetensors", "embedding file")
        return RunOutput(cfg.method, cfg.model.base, additions=(Addition("embedding", embedding, word=token),))
    if cfg.method == "lora":
        additions = [Addition("lora", named(f"{cfg.name}.safetensors", "LoRA file"))]
        pivotal = token_embedding() if token else None
        if pivotal is not None:
            additions.insert(0, Addition("embedding", pivotal, word=token))
        return RunOutput(cfg.method, cfg.model.base, additions=tuple(additions))
    if cfg.method == "hypernetwork":
        hypernetwork = named(f"{cfg.name}.pt", "hypernetwork file")
        return RunOutput(cfg.method, cfg.model.base, additions=(Addition("hypernetwork", hypernetwork),))
    if cfg.method in ("dreambooth", "finetune"):
        if getattr(cfg, "export", "full") != "full":
            raise SdtuneError(
                f"{run.root.name}: export: {cfg.export} holds only the trained components; load them with the base "
                "model in ComfyUI / diffusers, or train with export: full to generate here"
            )
        file = output / f"{cfg.name}.safetensors"
        return RunOutput(cfg.method, cfg.model.base, model=file if file.is_file() else named(cfg.name, "model"))
    raise SdtuneError(f"method {cfg.method}: no way to apply its output yet; load {output} in A1111 / ComfyUI")


def load_with_output(
    output: RunOutput,
    strength: float = 1.0,
    prompts: Sequence[str] = (),
    report: Callable[[str], None] | None = None,
) -> tuple[SDComponents, list[str]]:
    """The base model with the run's output applied at ``strength`` (a whole model: blended with its base below 1),
    and ``prompts`` as the tokenizer needs them."""
    if output.model is not None:
        model = load_model(output.model)
        if strength != 1.0:
            blend_with_base(model, load_model(output.base), strength)
        if report is not None:
            report(f"model {output.model} at strength {strength:g} over {output.base}")
        return model, list(prompts)
    model = load_model(output.base)
    return model, apply_additions(model, output.with_strength(strength), prompts, report)
