"""Sampler names users know (A1111's) mapped to diffusers schedulers built from the model's own config."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

# sdtune name -> (diffusers class, extra config, the name A1111 writes in infotext)
SAMPLERS: dict[str, tuple[type, dict[str, Any], str]] = {
    "ddim": (DDIMScheduler, {}, "DDIM"),
    "euler": (EulerDiscreteScheduler, {}, "Euler"),
    "euler_a": (EulerAncestralDiscreteScheduler, {}, "Euler a"),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}, "DPM++ 2M"),
}


def make_sampler(name: str, scheduler_config: dict[str, Any], prediction_type: str):
    """A diffusers scheduler for ``name`` with the model's betas and prediction type."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; choose one of {', '.join(SAMPLERS)}")
    cls, extra, _ = SAMPLERS[name]
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    return cls.from_config(config | extra | {"prediction_type": prediction_type})


def infotext_name(name: str) -> str:
    return SAMPLERS[name][2]
