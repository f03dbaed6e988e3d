"""Training a model's own weights (DreamBooth, full fine-tune): what trains, its checkpoint state, what is exported.

The adapter methods train small additions and export those; these methods train whole components (the UNet, the
text encoders) and export the whole model, or the trained components alone, in diffusers' and the original layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from sdtune.models.components import TEXT_ENCODER_NAMES, SDComponents
from sdtune.models.loading import save_model
from sdtune.train.recipe import checkpoint_activations


def trained_modules(model: SDComponents, *, unet: bool, text_encoders: bool) -> dict[str, torch.nn.Module]:
    """The components that train, by diffusers name (``unet``, ``text_encoder``, ``text_encoder_2``)."""
    chosen: dict[str, torch.nn.Module] = {"unet": model.unet} if unet else {}
    if text_encoders:
        chosen |= dict(zip(TEXT_ENCODER_NAMES, model.text_encoders, strict=False))
    return chosen


def unfreeze(modules: dict[str, torch.nn.Module], gradient_checkpointing: bool = False) -> None:
    """Make every parameter of ``modules`` trainable (training mode); gradient checkpointing recomputes
    activations in the backward pass instead of keeping them (less memory, about a third more compute)."""
    for module in modules.values():
        module.requires_grad_(True).train()
    if gradient_checkpointing:
        checkpoint_activations(modules)


def named_parameters(modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """Every parameter as ``<component>.<name>``: the keys of checkpoints."""
    return {f"{name}.{key}": p for name, module in modules.items() for key, p in module.named_parameters()}


def weights_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The trained weights on the CPU for a checkpoint: the live tensors themselves where they are on the CPU
    already (no second copy of a whole UNet at the peak; the checkpoint is written before the next step changes
    them), a copy from a GPU."""
    return {key: p.detach().to("cpu") for key, p in named_parameters(modules).items()}


def load_weights_state(modules: dict[str, torch.nn.Module], state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, p in named_parameters(modules).items():
            p.copy_(state[key])


def export_model(
    model: SDComponents, out_dir: Path, name: str, dtype: torch.dtype, only: Sequence[str] | None = None
) -> list[Path]:
    """``<name>/`` (diffusers folder) and ``<name>.safetensors`` (original layout: A1111, ComfyUI) in ``dtype``;
    with ``only`` (component names) just those components in both."""
    out_dir = Path(out_dir)
    folder = save_model(model, out_dir / name, layout="diffusers", dtype=dtype, overwrite=True, only=only)
    file = save_model(model, out_dir / f"{name}.safetensors", dtype=dtype, overwrite=True, only=only)
    return [folder, file]
