"""OFT and BOFT: orthogonal rotations of a layer's output channels, in LyCORIS' parameterisation.

OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning") keeps the base weight and
rotates it: ``W' = R W``. BOFT (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly
Factorization") builds ``R`` from a few sparse butterfly factors. The files A1111, ComfyUI and LyCORIS read fix how:

- **OFT** (LyCORIS ``lycoris/modules/diag_oft.py``): ``oft_blocks`` ``[n, b, b]``, ``Q = B - B^T`` per block,
  ``R = (I + Q)(I - Q)^-1`` (the exact Cayley transform), and row block ``k`` of ``W`` (rows ``k b .. k b + b - 1``)
  becomes ``R_k^T W_k`` (einsum ``k n m, k n ... -> k m ...``; kohya ``networks/oft.py`` applies ``y @ R`` to the
  output, the same). A1111 ``extensions-builtin/Lora/network_oft.py`` and ComfyUI ``comfy/weight_adapter/oft.py``
  apply exactly this.
- **BOFT** (LyCORIS ``lycoris/modules/boft.py``, ComfyUI ``comfy/weight_adapter/boft.py``): ``oft_blocks``
  ``[m, n, b, b]``, one Cayley rotation per block and stage; stage ``i`` reorders the rows ``(c, g, j)`` (``g`` in
  {0, 1}, ``j < 2^i b / 2``) as ``(c, j, g)``, multiplies each run of ``b`` rows by ``R_i`` (not transposed:
  einsum ``b i j, b j ... -> b i ...``) and puts the rows back.
- **COFT** (both): with a constraint ``c``, ``Q`` is scaled down to Frobenius norm ``c * out`` when above it
  (``q * c out / (||q|| + 1e-8)``; the file's ``alpha`` is ``c``).
- **rescale** (both, ``rescaled=True``): a learned scale per output row ``[out, 1(, 1, 1)]`` after the rotation.

peft 0.21's ``OFTConfig`` / ``BOFTConfig`` rotate the layer's *input* instead (``x R``, i.e. ``W R^T``; a
convolution's whole ``in x k x k`` patch), use a truncated Cayley-Neumann series by default, store OFT's blocks
as upper-triangle vectors and BOFT with a ``boft_s`` scale and a ``1/2`` in ``Q``; COFT is a projection. A rotation
of the input columns is not a rotation of the output rows, so no file the UIs read can hold what peft trains.
sdtune therefore trains the layers below: peft tuner layers (``BaseTunerLayer``) registered on a ``LoraConfig`` as
custom modules, as :mod:`sdtune.adapters.dora` does, so peft's state dict / merge vocabulary works unchanged.
``r`` (and ``rank_pattern``) of that config is the block size. They are added by :func:`inject_orthogonal`, not
``inject_adapter_in_model``: peft's LoRA tuner would add a LoRA adapter to a layer that already is a LoRA layer (a
file applied before) instead of wrapping it.

On a plain Linear / Conv2d the layers run the rotated weight ``R W`` (built each step, ``O(out * in * b)``: less
than rotating every token's output); on a layer another adapter already wraps they rotate that layer's output
instead (its bias taken out first: OFT rotates ``W`` only), which is the same map.

A strength ``w`` other than 1 is applied as each tool does, and they differ (:data:`STRENGTH_RULES`):
``"a1111"`` is ``W + w (W' - W)`` (A1111 ``network.py`` ``finalize_updown`` times the multiplier; what sdtune's
strength means for every other kind); ``"comfyui"`` is ComfyUI's: OFT ``W + w * w (R^T - I) W`` with ``rescale``
ignored (``oft.py`` ``calculate_weight`` scales ``R - I`` by the strength and then the difference again, and never
reads ``rescale``), BOFT each stage ``w R_i + (1 - w) I``, then ``rescale``, then ``W + w (. - W)``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge, check_target_module_exists
from peft.utils.other import get_pattern_key
from torch import nn

Kind = Literal["oft", "boft"]
StrengthRule = Literal["a1111", "comfyui"]
STRENGTH_RULES: tuple[str, ...] = ("a1111", "comfyui")
EPS = 1e-8  # LyCORIS', A1111's and ComfyUI's guard in the COFT norm


# --- the math ------------------------------------------------------------------------------------------------


def skew(blocks: torch.Tensor) -> torch.Tensor:
    """``Q = B - B^T`` over the last two axes: the skew-symmetric generator of each block's rotation."""
    return blocks - blocks.transpose(-1, -2)


def constrained(q: torch.Tensor, limit: float) -> torch.Tensor:
    """COFT (LyCORIS ``get_r``): ``q`` scaled to Frobenius norm ``limit`` (all blocks together) when above it."""
    if limit <= 0:
        return q
    norm = torch.linalg.vector_norm(q) + EPS
    return torch.where(norm > limit, q * (limit / norm), q)


def cayley(q: torch.Tensor) -> torch.Tensor:
    """``R = (I + Q)(I - Q)^-1`` per block (computed as ``(I - Q)^-1 (I + Q)``: the factors commute)."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return torch.linalg.solve(eye - q, eye + q)


def rotations(blocks: torch.Tensor, limit: float = 0.0) -> torch.Tensor:
    """Each block's rotation from ``oft_blocks`` (OFT ``[n, b, b]`` or BOFT ``[m, n, b, b]``), in float32 or wider."""
    q = skew(blocks.to(torch.promote_types(blocks.dtype, torch.float32)))
    return cayley(constrained(q, limit))


@functools.lru_cache(maxsize=256)
def butterfly_order(width: int, block: int, stage: int, device: torch.device | None = None) -> torch.Tensor:
    """The channel order in which BOFT stage ``stage``'s blocks of ``block`` channels are contiguous: channels
    ``(c, g, j)`` (``g`` in {0, 1}, ``j < 2^stage * block / 2``) taken as ``(c, j, g)``. Cached: every step asks."""
    half = 2**stage * block // 2
    return torch.arange(width, device=device).reshape(-1, 2, half).transpose(1, 2).reshape(-1)


@functools.lru_cache(maxsize=256)
def _inverse_order(width: int, block: int, stage: int, device: torch.device | None = None) -> torch.Tensor:
    return torch.argsort(butterfly_order(width, block, stage, device))


def _oft_blocks_apply(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """OFT on channel-last ``x``: block ``k`` of channels becomes ``x_k @ R_k`` (= ``R_k^T W_k`` on weight rows)."""
    n, b, _ = r.shape
    return torch.einsum("...kn,knm->...km", x.unflatten(-1, (n, b)), r).flatten(-2)


def _butterfly_apply(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """BOFT on channel-last ``x``: per stage, reorder, ``R_i v`` on each block, order back."""
    _, n, b, _ = r.shape
    width = x.shape[-1]
    for stage, rs in enumerate(r):
        order = butterfly_order(width, b, stage, x.device)
        rotated = torch.einsum("...dj,dij->...di", x[..., order].unflatten(-1, (n, b)), rs).flatten(-2)
        x = rotated[..., _inverse_order(width, b, stage, x.device)]  # back to the channels' own order
    return x


def transform(
    x: torch.Tensor,
    blocks: torch.Tensor,
    rescale: torch.Tensor | None = None,
    limit: float = 0.0,
    strength: float = 1.0,
    rule: StrengthRule = "a1111",
) -> torch.Tensor:
    """OFT / BOFT (by ``blocks``' rank) applied to the channel-last ``x`` (a weight's rows moved last, or a layer's
    output without its bias) at ``strength`` by ``rule`` (see the module docstring), in float32 or wider."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, blocks.dtype), torch.float32)
    r = rotations(blocks.to(dtype), limit)
    v = x.to(dtype)
    scale = None if rescale is None else rescale.to(dtype).flatten()
    if blocks.dim() == 3:
        if rule == "comfyui":  # oft.py: (w R - w I) W, then weight += w * that; rescale is never read
            return (v + strength * strength * (_oft_blocks_apply(v, r) - v)).to(x.dtype)
        moved = _oft_blocks_apply(v, r)
    else:
        if rule == "comfyui" and strength != 1:  # boft.py: each stage w R_i + (1 - w) I
            eye = torch.eye(r.shape[-1], dtype=dtype, device=r.device)
            r = strength * r + (1 - strength) * eye
        moved = _butterfly_apply(v, r)
    if scale is not None:
        moved = moved * scale
    return (v + strength * (moved - v)).to(x.dtype)


def transform_weight(weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """:func:`transform` on a ``[out, ...]`` weight's rows: the weight the adapted layer runs with."""
    return transform(weight.movedim(0, -1), *args, **kwargs).movedim(-1, 0)


# --- block layouts -------------------------------------------------------------------------------------------


def oft_block(width: int, block_size: int) -> int:
    """OFT's block size on a layer of ``width`` output channels: ``block_size`` itself, which must divide it."""
    if width % block_size:
        fits = [d for d in range(2, min(width, 64) + 1) if width % d == 0]
        raise ValueError(
            f"block_size {block_size} does not divide its width {width}; block sizes that do: "
            f"{', '.join(map(str, fits)) or 'none'}"
        )
    return block_size


def boft_layout(width: int, block_size: int, factors: int | None = None) -> tuple[int, int]:
    """BOFT's ``(block size, butterfly factors)`` on ``width`` channels, LyCORIS' rule (``power2factorization``):
    the largest even size ``b <= block_size`` whose block count ``width / b`` is a power of two, with all
    ``log2(width / b) + 1`` factors; with ``factors`` given, ``width / b`` need only be a multiple of
    ``2^(factors - 1)`` (every stage's groups of ``2^i b`` channels must tile the width)."""

    def fits(b: int) -> bool:
        if b % 2 or width % b:
            return False
        n = width // b
        return n & (n - 1) == 0 if factors is None else n % 2 ** (factors - 1) == 0

    found = [b for b in range(2, min(block_size, width) + 1) if fits(b)]
    if not found:
        sizes = [b for b in range(2, width + 1) if fits(b)][:8]
        need = "a power-of-two number of" if factors is None else f"a multiple of {2 ** (factors - 1)}"
        raise ValueError(
            f"no even block size <= {block_size} splits its width {width} into {need} blocks; sizes that do: "
            f"{', '.join(map(str, sizes)) or 'none'}"
        )
    b = found[-1]
    return b, int(math.log2(width // b)) + 1 if factors is None else factors


def blocks_shape(kind: Kind, width: int, block_size: int, factors: int | None = None) -> tuple[int, ...]:
    """The ``oft_blocks`` shape of a layer with ``width`` output channels (ValueError when none fits)."""
    if kind == "oft":
        b = oft_block(width, block_size)
        return (width // b, b, b)
    b, m = boft_layout(width, block_size, factors)
    return (m, width // b, b, b)


def check_blocks(module: nn.Module, suffixes: list[str], kind: Kind, block_size: int, factors: int | None) -> None:
    """Every targeted Linear / Conv2d layer of ``module`` must take the block layout (else ValueError naming it)."""
    for name, layer in module.named_modules():
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        if not any(name == s or name.endswith("." + s) for s in suffixes):
            continue
        if getattr(layer, "groups", 1) != 1:
            raise ValueError(f"layer '{name}' is a grouped convolution, which OFT cannot rotate")
        width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        try:
            blocks_shape(kind, width, block_size, factors)
        except ValueError as exc:
            raise ValueError(f"layer '{name}': {exc}") from None


# --- the peft config and layers ------------------------------------------------------------------------------


@dataclass
class OrthogonalConfig(LoraConfig):
    """A ``LoraConfig`` whose Linear / Conv2d layers are sdtune's OFT / BOFT layers; ``r`` (``rank_pattern``) is the
    (largest, for BOFT) block size per module."""

    oft_kind: str = field(default="oft", metadata={"help": "oft (LyCORIS diag-oft) or boft"})
    oft_constraint: float = field(default=0.0, metadata={"help": "COFT: ||Q|| <= constraint * out; 0 = none"})
    oft_rescaled: bool = field(default=False, metadata={"help": "a learned scale per output channel"})
    oft_butterfly_factors: int | None = field(default=None, metadata={"help": "BOFT stages; None = all"})
    oft_module_dropout: float = field(default=0.0, metadata={"help": "skip the adapter with this probability"})


class OrthogonalLayer(nn.Module, BaseTunerLayer):
    """A peft tuner layer that rotates its base layer's output channels by OFT or BOFT (see the module docstring)."""

    adapter_layer_names = ("oft_blocks", "oft_rescale")
    other_param_names = ("oft_limit", "oft_dropout", "oft_strength")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: OrthogonalConfig, r: int, **kwargs: Any):
        super().__init__()
        self.base_layer = base_layer
        self.oft_blocks = nn.ParameterDict()
        self.oft_rescale = nn.ParameterDict()
        self.oft_limit: dict[str, float] = {}
        self.oft_dropout: dict[str, float] = {}
        self.oft_strength: dict[str, tuple[float, StrengthRule]] = {}
        self._merged_weights: dict[str, torch.Tensor] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, r)

    @property
    def out_width(self) -> int:
        base = self.get_base_layer()
        return base.out_features if isinstance(base, nn.Linear) else base.out_channels

    def update_layer(self, adapter_name: str, config: OrthogonalConfig, r: int) -> None:
        base = self.get_base_layer()
        if getattr(base, "groups", 1) != 1:
            raise ValueError("OFT on a grouped convolution is not supported")
        width = self.out_width
        shape = blocks_shape(config.oft_kind, width, r, config.oft_butterfly_factors)  # type: ignore[arg-type]
        self.oft_blocks[adapter_name] = nn.Parameter(torch.zeros(shape))  # R = I: the adapted model starts as the base
        if config.oft_rescaled:
            ones = torch.ones(width, *[1] * (base.weight.dim() - 1))
            self.oft_rescale[adapter_name] = nn.Parameter(ones)
        self.oft_limit[adapter_name] = config.oft_constraint * width
        self.oft_dropout[adapter_name] = config.oft_module_dropout
        self.oft_strength[adapter_name] = (1.0, "a1111")
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def set_strength(self, adapter_name: str, strength: float, rule: StrengthRule = "a1111") -> None:
        """Run ``adapter_name`` at ``strength`` the way ``rule``'s tool applies one (module docstring)."""
        if rule not in STRENGTH_RULES:
            raise ValueError(f"unknown strength rule '{rule}'; use one of {', '.join(STRENGTH_RULES)}")
        self.oft_strength[adapter_name] = (float(strength), rule)

    def _rotate(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        strength, rule = self.oft_strength[adapter]
        rescale = self.oft_rescale[adapter] if adapter in self.oft_rescale else None
        return transform(x, self.oft_blocks[adapter], rescale, self.oft_limit[adapter], strength, rule)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Bake each adapter's rotation into the base weight, in order (the original weight is kept for unmerge)."""
        base = self.get_base_layer()
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.oft_blocks:
                continue
            weight = base.weight.data
            merged = self._rotate(adapter, weight.movedim(0, -1)).movedim(-1, 0).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs in the merged weights: adapter {adapter} seems to be broken")
            self._merged_weights[adapter] = weight.clone()
            base.weight.data = merged.contiguous()
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self._merged_weights:
                base.weight.data = self._merged_weights.pop(adapter)

    def _channel_axis(self) -> int:
        return 1 if isinstance(self.get_base_layer(), nn.Conv2d) else -1

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [] if self.merged else [a for a in self.active_adapters if a in self.oft_blocks]
        if self.training:  # LyCORIS' module dropout: the whole adapter is left out for this step
            active = [a for a in active if not (self.oft_dropout[a] and torch.rand(()) < self.oft_dropout[a])]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if not isinstance(self.base_layer, BaseTunerLayer):  # a plain layer: run it with the rotated weight
            base = self.base_layer
            weight = base.weight
            for adapter in active:
                weight = self._rotate(adapter, weight.movedim(0, -1)).movedim(-1, 0)
            if isinstance(base, nn.Conv2d):
                return base._conv_forward(x, weight, base.bias)
            return nn.functional.linear(x, weight, base.bias)
        result = self.base_layer(x, *args, **kwargs)
        bias = self.get_base_layer().bias
        y = result.movedim(self._channel_axis(), -1)
        if bias is not None:  # OFT rotates W only: y = R^T (W x) + b
            y = y - bias
        for adapter in active:
            y = self._rotate(adapter, y)
        if bias is not None:
            y = y + bias
        return y.movedim(-1, self._channel_axis())

    def __repr__(self) -> str:
        return "oft." + super().__repr__()


class _Delegating:
    """The wrapped layer's shape attributes, read through the wrapper: another peft adapter put on top of this one
    (a second file on the same layer) builds itself from them (``lora.Conv2d`` reads ``base_layer.groups``)."""

    _delegated: tuple[str, ...] = ()

    def __getattr__(self, name: str) -> Any:
        if name in type(self)._delegated:
            return getattr(self.get_base_layer(), name)
        return super().__getattr__(name)  # type: ignore[misc]


class OrthogonalLinear(_Delegating, OrthogonalLayer):
    """OFT / BOFT on a Linear layer's output features."""

    _delegated = ("in_features", "out_features")


class OrthogonalConv2d(_Delegating, OrthogonalLayer):
    """OFT / BOFT on a Conv2d layer's output channels (whole filters rotated)."""

    _delegated = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                  "padding_mode")  # fmt: skip


ORTHOGONAL_LAYERS = (OrthogonalLinear, OrthogonalConv2d)


def orthogonal_config(
    kind: Kind,
    block_size: int,
    targets: list[str] | tuple[str, ...],
    constraint: float = 0.0,
    rescaled: bool = False,
    butterfly_factors: int | None = None,
    dropout: float = 0.0,
    block_pattern: dict[str, int] | None = None,
) -> OrthogonalConfig:
    """The peft config of an OFT / BOFT adapter on ``targets`` (``block_pattern``: per-module block sizes)."""
    if kind not in ("oft", "boft"):
        raise ValueError(f"unknown orthogonal adapter '{kind}'; use oft or boft")
    pattern = dict(block_pattern or {})
    config = OrthogonalConfig(
        r=block_size, lora_alpha=block_size, target_modules=list(targets), rank_pattern=pattern,
        alpha_pattern=pattern, oft_kind=kind, oft_constraint=float(constraint), oft_rescaled=rescaled,
        oft_butterfly_factors=butterfly_factors, oft_module_dropout=dropout,
    )  # fmt: skip
    config._register_custom_module({nn.Linear: OrthogonalLinear, nn.Conv2d: OrthogonalConv2d})
    return config


def inject_orthogonal(module: nn.Module, config: OrthogonalConfig, adapter_name: str = "default") -> None:
    """Wrap every layer of ``module`` that ``config`` targets (peft's own matching) in an OFT / BOFT layer, a layer
    another adapter already wraps included, and record ``config`` as ``module.peft_config[adapter_name]`` (what peft's
    state-dict functions read). As peft's inject does, only adapter weights stay trainable."""
    found = []
    for name, layer in module.named_modules():
        parts = name.split(".")
        if "base_layer" in parts or any(p.startswith(("lora_", "oft_", "hada_", "lokr_")) for p in parts):
            continue  # inside an adapter layer
        base = layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer
        if isinstance(base, (nn.Linear, nn.Conv2d)) and check_target_module_exists(config, name):
            found.append((name, layer, base))
    if not found:
        raise ValueError(f"target modules {sorted(config.target_modules)} match no Linear or Conv2d layer")
    for name, layer, base in found:
        block = config.rank_pattern.get(get_pattern_key(list(config.rank_pattern), name), config.r)
        cls = OrthogonalConv2d if isinstance(base, nn.Conv2d) else OrthogonalLinear
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, cls(layer, adapter_name, config, block))
    configs = getattr(module, "peft_config", None)
    if not isinstance(configs, dict):
        configs = {}
        module.peft_config = configs
    configs[adapter_name] = config
    adapters = {
        id(p)
        for layer in module.modules()
        if isinstance(layer, BaseTunerLayer)
        for attr in layer.adapter_layer_names
        if isinstance(getattr(layer, attr, None), (nn.ModuleDict, nn.ParameterDict))
        for p in getattr(layer, attr).parameters()
    }
    for p in module.parameters():
        if id(p) not in adapters:
            p.requires_grad_(False)


def is_orthogonal(config: object) -> bool:
    """Whether ``config`` builds sdtune's OFT / BOFT layers."""
    return isinstance(config, OrthogonalConfig)
