"""The precision names configs and commands use (``fp16``, ``bf16``, ``fp32``) and their torch dtypes."""

from __future__ import annotations

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a precision name; a one-line error lists the choices."""
    if name not in TORCH_DTYPES:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def cast_floats(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors cast to ``dtype``; integer tensors unchanged."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
