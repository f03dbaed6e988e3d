"""AUTOMATIC1111 hypernetworks: small residual MLPs that rewrite the attention context before the k/v projections.

Following A1111 ``modules/hypernetworks/hypernetwork.py`` (``HypernetworkModule``, ``apply_single_hypernetwork``):

- a hypernetwork holds, per context width ``d`` it is made for (768 = SD1 text context, 1024 = SD2; A1111's
  "Modules" may add 320/640/1280, the self-attention widths), a pair of modules ``(k, v)``;
- every attention layer whose k/v input has width ``d`` computes ``to_k(k(context))`` and ``to_v(v(context))``
  (q untouched); the input is the text context in cross-attention and the hidden states in self-attention;
- each module is ``x + mlp(x) * multiplier``; while training the multiplier is 1 (A1111 ignores it then);
- ``mlp`` = for each step of ``layer_structure`` (e.g. ``1, 2, 1``): ``Linear(d*ls[i] -> d*ls[i+1])``, the
  activation (not after the last Linear unless ``activate_output``), an optional ``LayerNorm``, and
  ``Dropout(dropout_structure[i+1])`` when that is > 0. The ``nn.Sequential`` indices of these layers are the
  state-dict keys files carry (``linear.0.weight``, ``linear.2.weight`` with an activation in between);
- initialisation: ``Normal`` = weights N(0, 0.01), biases 0 (LayerNorms always so, weight included: A1111's
  rule); ``Xavier*``/``Kaiming*`` with zero biases (Kaiming uses leaky_relu gain for ``leakyrelu``, else relu).
  Nothing is zero-initialised, so a new hypernetwork is close to, not exactly, the identity.
- A1111's ``swish`` is ``nn.Hardswish`` (not SiLU); ``silu`` is SiLU.

The modules attach through forward pre-hooks on each attention layer's ``to_k``/``to_v``: they work with every
attention processor (SDPA, xformers, plain) and leave the UNet's weights and state-dict keys alone. Install after
peft adapters (LoRA) so the hook sits on the adapter wrapper and both the base and the LoRA path see the new
context. Several installed hypernetworks chain in install order, as in A1111.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn import init

# A1111's activation_dict: its own names, then torch.nn's activation classes by lower-cased name. Only those that
# build without arguments and act elementwise are offered (A1111 lists all and fails on the rest at creation).
ACTIVATIONS: dict[str, type[nn.Module] | None] = {
    "linear": None,
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "swish": nn.Hardswish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "celu": nn.CELU,
    "gelu": nn.GELU,
    "hardsigmoid": nn.Hardsigmoid,
    "hardswish": nn.Hardswish,
    "hardtanh": nn.Hardtanh,
    "logsigmoid": nn.LogSigmoid,
    "mish": nn.Mish,
    "prelu": nn.PReLU,
    "relu6": nn.ReLU6,
    "rrelu": nn.RReLU,
    "selu": nn.SELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "softsign": nn.Softsign,
    "tanhshrink": nn.Tanhshrink,
}
WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
LEGACY_DROPOUT = 0.3  # A1111's fixed rate before per-layer dropout structures existed


def legacy_dropout_structure(
    layer_structure: Sequence[float], use_dropout: bool, last_layer_dropout: bool
) -> tuple[float, ...]:
    """A1111's ``parse_dropout_structure``: the per-layer dropout of files written before ``dropout_structure``.

    0.3 after every hidden layer, the last hidden one only with ``last_layer_dropout``; never after the input or
    the output.
    """
    n = len(layer_structure)
    if not use_dropout:
        return (0.0,) * n
    hidden = [LEGACY_DROPOUT] * (n - 3) + [LEGACY_DROPOUT if last_layer_dropout else 0.0]
    return (0.0, *hidden, 0.0)


@dataclass(frozen=True)
class HypernetworkSpec:
    """The structure of a hypernetwork (what A1111 stores next to the weights)."""

    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    activation: str = "linear"
    layer_norm: bool = False
    dropout_structure: tuple[float, ...] | None = None  # None: no dropout
    activate_output: bool = False
    weight_init: str = "Normal"

    def __post_init__(self) -> None:
        ls = self.layer_structure
        if len(ls) < 2 or ls[0] != 1 or ls[-1] != 1 or any(not v > 0 for v in ls):
            raise ValueError(f"layer_structure must start and end with 1 and be > 0 (got {list(ls)}); e.g. 1, 2, 1")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if self.weight_init not in WEIGHT_INITS:
            raise ValueError(f"unknown weight initialization {self.weight_init!r}; choose one of {WEIGHT_INITS}")
        ds = self.dropout_structure
        if ds is not None and (len(ds) < len(ls) or any(not 0 <= p < 1 for p in ds)):
            raise ValueError(
                f"dropout_structure needs {len(ls)} probabilities in [0, 1) (got {list(ds)}); e.g. {[0.0] * len(ls)}"
            )

    def dropout_after(self, i: int) -> float:
        """Dropout probability after Linear ``i`` (A1111 reads ``dropout_structure[i + 1]``)."""
        return self.dropout_structure[i + 1] if self.dropout_structure else 0.0


class HypernetworkModule(nn.Module):
    """One residual MLP: ``x + linear(x) * multiplier`` (multiplier 1 while training, as in A1111)."""

    def __init__(self, dim: int, spec: HypernetworkSpec) -> None:
        super().__init__()
        self.dim, self.multiplier = dim, 1.0
        ls, layers = spec.layer_structure, []
        for i in range(len(ls) - 1):
            layers.append(nn.Linear(int(dim * ls[i]), int(dim * ls[i + 1])))
            last = i == len(ls) - 2
            activation = ACTIVATIONS[spec.activation]
            if activation is not None and (spec.activate_output or not last):
                layers.append(activation())
            if spec.layer_norm:
                layers.append(nn.LayerNorm(int(dim * ls[i + 1])))
            if spec.dropout_after(i) > 0:
                layers.append(nn.Dropout(p=spec.dropout_after(i)))
        self.linear = nn.Sequential(*layers)

    def reset_parameters(self, weight_init: str, activation: str, generator: torch.Generator | None = None) -> None:
        """A1111's initialisation (see the module docstring)."""
        gain = "leaky_relu" if activation == "leakyrelu" else "relu"
        with torch.no_grad():
            for layer in self.linear:
                if not isinstance(layer, (nn.Linear, nn.LayerNorm)):
                    continue
                if weight_init == "Normal" or isinstance(layer, nn.LayerNorm):
                    init.normal_(layer.weight, 0.0, 0.01, generator=generator)
                elif weight_init == "XavierUniform":
                    init.xavier_uniform_(layer.weight, generator=generator)
                elif weight_init == "XavierNormal":
                    init.xavier_normal_(layer.weight, generator=generator)
                elif weight_init == "KaimingUniform":
                    init.kaiming_uniform_(layer.weight, nonlinearity=gain, generator=generator)
                else:
                    init.kaiming_normal_(layer.weight, nonlinearity=gain, generator=generator)
                layer.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x) * (1.0 if self.training else self.multiplier)


class Hypernetwork(nn.Module):
    """Module pairs ``(k, v)`` per context width; state-dict keys ``pairs.<width>.<0|1>.linear.<i>.*``."""

    def __init__(self, sizes: Iterable[int], spec: HypernetworkSpec) -> None:
        super().__init__()
        self.spec = spec
        widths = sorted({int(s) for s in sizes})
        if not widths:
            raise ValueError("a hypernetwork needs at least one context width")
        self.pairs = nn.ModuleDict(
            {str(d): nn.ModuleList([HypernetworkModule(d, spec), HypernetworkModule(d, spec)]) for d in widths}
        )

    @property
    def sizes(self) -> list[int]:
        return [int(d) for d in self.pairs]

    def module(self, width: int, which: int) -> HypernetworkModule | None:
        """The k (``which`` 0) or v (1) module for context ``width``; None when the network has no such width."""
        pair = self.pairs[str(width)] if str(width) in self.pairs else None
        return pair[which] if pair is not None else None

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for pair in self.pairs.values():
            for module in pair:
                module.reset_parameters(self.spec.weight_init, self.spec.activation, generator)

    @property
    def multiplier(self) -> float:
        return next(iter(self.pairs.values()))[0].multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        """Strength at inference (A1111's ``set_multiplier``); 0 = the base model."""
        for pair in self.pairs.values():
            for module in pair:
                module.multiplier = float(value)

    def pair_states(self) -> dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """``{width: (k state dict, v state dict)}`` with A1111's keys (``linear.<i>.weight``), detached on CPU."""
        return {
            int(d): tuple({k: t.detach().cpu().clone() for k, t in m.state_dict().items()} for m in pair)
            for d, pair in self.pairs.items()
        }

    def load_pair_states(self, states: dict[int, Sequence[dict[str, torch.Tensor]]]) -> None:
        """Load :meth:`pair_states`-shaped weights (strict: every width and key must match)."""
        if sorted(states) != self.sizes:
            raise ValueError(f"widths {sorted(states)} do not match the hypernetwork's {self.sizes}")
        for d, pair in self.pairs.items():
            for module, state in zip(pair, states[int(d)], strict=True):
                module.load_state_dict(state)


def projection_width(projection: nn.Module) -> int | None:
    """Input width of a k/v projection (a Linear, or a peft wrapper that exposes ``in_features``)."""
    width = getattr(projection, "in_features", None)
    return int(width) if width is not None else None


def context_widths(unet: nn.Module) -> list[int]:
    """Every k/v input width among the UNet's attention layers (cross- and self-attention)."""
    from diffusers.models.attention_processor import Attention

    widths = {projection_width(m.to_k) for m in unet.modules() if isinstance(m, Attention)}
    return sorted(w for w in widths if w is not None)


def _rewrite_context(module: HypernetworkModule, _projection: nn.Module, args: tuple) -> tuple:
    x, *rest = args
    dtype = module.linear[0].weight.dtype
    return (module(x.to(dtype)).to(x.dtype), *rest)


@dataclass
class InstalledHypernetwork:
    """Hooks of one installed hypernetwork; :meth:`remove` restores the plain UNet."""

    hypernetwork: Hypernetwork
    handles: list
    layers: list[str]  # "<attention layer>.to_k" / ".to_v" that were hooked

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def install(unet: nn.Module, hypernetwork: Hypernetwork) -> InstalledHypernetwork:
    """Apply ``hypernetwork`` to every attention layer of ``unet`` whose k/v input width it has a pair for.

    Raises ``ValueError`` when it fits no layer (e.g. an SD1 hypernetwork on SD2) or the projections are fused.
    """
    from diffusers.models.attention_processor import Attention

    handles, layers = [], []
    for name, attn in unet.named_modules():
        if not isinstance(attn, Attention):
            continue
        if getattr(attn, "fused_projections", False):
            raise ValueError(f"{name}: k/v projections are fused; call unet.unfuse_qkv_projections() first")
        for which, proj_name in enumerate(("to_k", "to_v")):
            projection = getattr(attn, proj_name)
            module = hypernetwork.module(projection_width(projection), which)
            if module is not None:
                handles.append(projection.register_forward_pre_hook(partial(_rewrite_context, module)))
                layers.append(f"{name}.{proj_name}")
    if not handles:
        raise ValueError(
            f"no attention layer takes a context of width {', '.join(map(str, hypernetwork.sizes))} "
            f"(this model's widths: {', '.join(map(str, context_widths(unet)))})"
        )
    return InstalledHypernetwork(hypernetwork, handles, layers)
