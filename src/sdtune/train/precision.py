"""Which compute precision a run uses, and the fp16 loss scaler.

``train.mixed_precision`` is ``auto``, ``no``, ``bf16`` or ``fp16``. :func:`resolve_precision` turns it into
accelerate's value for the device the run is on, or refuses in one line a choice the device cannot do:

- ``auto``: bf16 on a CUDA GPU that computes it (Ampere and later) and on a CPU with bf16 units (AVX512-BF16 or
  AMX, where a real-size LoRA step runs about 1.7x faster than in fp32) when the UNet is real-size (at least
  :data:`CPU_BF16_MIN_UNET` parameters: on narrow models such as the built-in one the casts cost more than bf16
  saves, measured 33 vs 38-44 images/s); else full precision;
- ``bf16`` on a GPU without bf16 (before Ampere): refused, naming fp16. On a CPU without bf16 units it works
  (emulated) but slowly, which is said once;
- ``fp16`` on a CPU: refused, naming bf16 or no (CPU autocast has no fp16 matrix products worth having, and
  accelerate would silently compute in fp32 while the frozen weights sit rounded to fp16).

fp16 has a narrow exponent: small gradients underflow to zero unless the loss is scaled up before the backward
pass. :class:`LossScaler` is ``torch.amp.GradScaler`` (dynamic: halve the scale on an overflow, grow it after
2000 clean steps) with what the loop needs around it: an overflowing step is skipped and counted, not treated as
the NaN stop, and the scale is part of the checkpoint so a resume continues exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from sdtune.core.errors import ConfigError

_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic units (x86 AVX512-BF16 / AMX; oneDNN's own check where present)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is not None:
        try:
            if not check():
                return False
        except RuntimeError:
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False
    return any(flag in flags for flag in _CPU_FLAGS)


CPU_BF16_MIN_UNET = 100_000_000  # UNet parameters from which `auto` picks bf16 on a CPU (SD 1.5: 860 M)


def unet_parameters(base: str | Path) -> int:
    """The UNet's parameter count of a model path, from its configs only (built on the meta device)."""
    from sdtune.models.components import build_modules
    from sdtune.models.loading import model_configs

    _, configs = model_configs(base)
    unet = build_modules({"unet": configs["unet"], "vae": configs["vae"]}, empty=True)["unet"]
    return sum(p.numel() for p in unet.parameters())


def resolve_precision(choice: str, device: str | None = None, base: str | Path | None = None) -> str:
    """accelerate's ``mixed_precision`` (``no`` / ``bf16`` / ``fp16``) for ``train.mixed_precision`` on
    ``device`` (``cuda`` or ``cpu``; default: CUDA when available) training ``base`` (read for its size when
    ``auto`` meets a CPU with bf16 units). A choice the device cannot do raises a :class:`ConfigError` naming the
    alternative."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    gpu_bf16 = gpu and torch.cuda.is_bf16_supported()
    if choice == "auto":
        if gpu:
            return "bf16" if gpu_bf16 else "no"
        wide = cpu_has_bf16() and (base is None or unet_parameters(base) >= CPU_BF16_MIN_UNET)
        return "bf16" if wide else "no"
    if choice == "fp16" and not gpu:
        alternative = "bf16 (this CPU computes it natively)" if cpu_has_bf16() else "no (full precision)"
        raise ConfigError(f"train.mixed_precision: fp16 needs a CUDA GPU and this run is on the CPU; use {alternative}")
    if choice == "bf16" and gpu and not gpu_bf16:
        name = torch.cuda.get_device_name()
        raise ConfigError(f"train.mixed_precision: {name} has no bf16 arithmetic; use fp16 (with loss scaling) or no")
    return choice


def precision_note(precision: str, device: str) -> str | None:
    """A line worth telling the user about the chosen precision, or None."""
    if precision == "bf16" and device == "cpu" and not cpu_has_bf16():
        return "bf16 on a CPU without bf16 units is emulated and slower than full precision (mixed_precision: no)"
    return None


class LossScaler:
    """Dynamic loss scaling for fp16 runs; inert (scale 1, never skips) in every other precision."""

    def __init__(self, enabled: bool, device: str) -> None:
        self.enabled = enabled
        self._scaler = torch.amp.GradScaler(device, enabled=enabled)
        self.skipped = 0  # optimizer steps skipped because fp16 gradients overflowed

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self._scaler.scale(loss) if self.enabled else loss

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scale (before clipping and the gradient norm)."""
        if self.enabled:
            self._scaler.unscale_(optimizer)

    def overflowed(self, grad_norm: float) -> bool:
        """True when this step's fp16 gradients overflowed: the step is to be skipped, not stopped on."""
        return self.enabled and not math.isfinite(grad_norm)

    def step(self, optimizer: torch.optim.Optimizer) -> float | None:
        """Step the optimizer unless the gradients overflowed, then adapt the scale. Returns the old scale when
        the step was skipped (so the caller can log it), else None."""
        if not self.enabled:
            optimizer.step()
            return None
        before = self._scaler.get_scale()
        self._scaler.step(optimizer)  # skips the update when unscale_ found inf/NaN
        self._scaler.update()
        if self._scaler.get_scale() < before:
            self.skipped += 1
            return before
        return None

    @property
    def current(self) -> float:
        return self._scaler.get_scale() if self.enabled else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self._scaler.state_dict(), "skipped": self.skipped} if self.enabled else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.enabled and state:
            self._scaler.load_state_dict(state["scaler"])
            self.skipped = int(state.get("skipped", 0))


def fp8_frozen_linears(module: torch.nn.Module) -> int:
    """Store the frozen ``torch.nn.Linear`` weights of ``module`` in float8 (e4m3, one fp32 scale per output row):
    torchao's weight-only float8, dequantized to the layer's compute dtype in each forward pass. Returns how many
    layers changed. Call it on a frozen model in bf16/fp16 *before* adapters are added (peft wraps torchao layers
    with its own LoRA layer). Convolutions stay as they are (torchao has no CPU/GPU float8 convolution without
    extra kernels): 31 % of SD 1.5's UNet weights (attention and feed-forward; its projections are 1x1
    convolutions) and 87 % of SDXL's shrink to one byte (counted on the shipped configs).

    Why torchao and not optimum-quanto: torchao is PyTorch's own quantization library, peft dispatches its tensor
    subclasses to a LoRA layer of its own (``TorchaoLoraLinear``), and it has no dependency of its own to pull in.
    """
    try:
        from torchao.quantization import Float8WeightOnlyConfig, quantize_
    except ImportError:
        raise ConfigError("fp8_base: needs the torchao package; pip install torchao (or set fp8_base: false)") from None
    frozen = [
        m
        for m in module.modules()
        if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad and m.weight.dtype != torch.float32
    ]
    if not frozen:
        return 0
    chosen = {id(m) for m in frozen}
    quantize_(module, Float8WeightOnlyConfig(), filter_fn=lambda m, fqn: id(m) in chosen)
    return len(frozen)


def is_fp8(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds float8 data (a torchao float8 tensor subclass, or a plain float8 tensor)."""
    inner = getattr(tensor, "qdata", tensor)
    return inner.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
