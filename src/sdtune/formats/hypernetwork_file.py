"""AUTOMATIC1111 hypernetwork files (``models/hypernetworks/<name>.pt``): write and read them.

Layout (A1111 ``modules/hypernetworks/hypernetwork.py``, ``Hypernetwork.save``/``load``): one pickled dict

- ``<width: int>``: a tuple ``(state_dict_k, state_dict_v)`` per context width, keys ``linear.<i>.weight`` /
  ``linear.<i>.bias`` (``i`` = index in the module's ``nn.Sequential``; very old files say ``linear1.*`` /
  ``linear2.*``, read as ``linear.0.*`` / ``linear.1.*``);
- ``step`` (optimizer steps), ``name``, ``layer_structure`` (e.g. ``[1.0, 2.0, 1.0]``), ``activation_func``,
  ``is_layer_norm``, ``weight_initialization``, ``sd_checkpoint`` (10-hex short hash of the base model),
  ``sd_checkpoint_name``, ``activate_output``, ``use_dropout``, ``dropout_structure``, ``last_layer_dropout``
  (``dropout_structure[-2] != 0``), ``optional_info``.

Missing keys read as A1111 reads them: ``layer_structure`` [1, 2, 1], ``activation_func`` None (= linear),
``weight_initialization`` Normal, ``is_layer_norm`` False, ``activate_output`` **True**, ``use_dropout`` /
``last_layer_dropout`` False, and no ``dropout_structure`` = the legacy 0.3 rule. The file holds only tensors,
dicts, tuples, lists, strings, numbers, booleans and None, so it is read with ``torch.load(weights_only=True)``;
sdtune never reads it any other way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdtune.adapters.hypernetwork import (
    ACTIVATIONS,
    WEIGHT_INITS,
    Hypernetwork,
    HypernetworkSpec,
    legacy_dropout_structure,
)
from sdtune.core.atomic import atomic_path
from sdtune.core.dtypes import cast_floats, torch_dtype
from sdtune.core.errors import DataError
from sdtune.core.safe_load import load_torch_file

METADATA_KEYS = (
    "step",
    "name",
    "layer_structure",
    "activation_func",
    "is_layer_norm",
    "weight_initialization",
    "sd_checkpoint",
    "sd_checkpoint_name",
    "activate_output",
    "use_dropout",
    "dropout_structure",
    "last_layer_dropout",
    "optional_info",
)
_LEGACY_KEYS = {
    "linear1.weight": "linear.0.weight",
    "linear1.bias": "linear.0.bias",
    "linear2.weight": "linear.1.weight",
    "linear2.bias": "linear.1.bias",
}


@dataclass
class HypernetworkFile:
    """A hypernetwork with the training facts its file records."""

    hypernetwork: Hypernetwork
    name: str
    step: int = 0
    sd_checkpoint: str | None = None  # A1111: 10-hex short hash of the model it was trained on
    sd_checkpoint_name: str | None = None
    optional_info: str | None = None


def a1111_dict(hn: HypernetworkFile, dtype: str = "fp32") -> dict[Any, Any]:
    """The dict A1111's ``Hypernetwork.save`` writes, for ``hn``."""
    spec, cast = hn.hypernetwork.spec, torch_dtype(dtype)
    n = len(spec.layer_structure)
    dropout = list(spec.dropout_structure or (0.0,) * n)
    state: dict[Any, Any] = {
        width: tuple(cast_floats(sd, cast) for sd in pair) for width, pair in hn.hypernetwork.pair_states().items()
    }
    state |= {
        "step": int(hn.step),
        "name": hn.name,
        "layer_structure": [float(x) for x in spec.layer_structure],
        "activation_func": spec.activation,
        "is_layer_norm": bool(spec.layer_norm),
        "weight_initialization": spec.weight_init,
        "sd_checkpoint": hn.sd_checkpoint,
        "sd_checkpoint_name": hn.sd_checkpoint_name,
        "activate_output": bool(spec.activate_output),
        "use_dropout": any(p > 0 for p in dropout),
        "dropout_structure": [float(p) for p in dropout],
        "last_layer_dropout": dropout[-2] != 0 if n >= 2 else False,
        "optional_info": hn.optional_info,
    }
    return state


def save_hypernetwork(hn: HypernetworkFile, path: str | Path, dtype: str = "fp32") -> Path:
    """Write ``hn`` as an A1111 ``.pt`` (atomically); returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(a1111_dict(hn, dtype), tmp)
    return path


def load_hypernetwork(path: str | Path) -> HypernetworkFile:
    """Read an A1111 hypernetwork ``.pt`` (weights-only unpickling); one-line :class:`DataError` on any problem.

    The modules come back in float32, in eval mode, with multiplier 1.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such hypernetwork file")
    data = load_torch_file(path, DataError, "hypernetwork")
    return hypernetwork_from_dict(data, path)


def hypernetwork_from_dict(data: Any, where: str | Path) -> HypernetworkFile:
    """Validate an A1111 hypernetwork dict and build the modules from it."""
    if not isinstance(data, dict):
        raise DataError(f"{where}: not an A1111 hypernetwork (a {type(data).__name__}, expected a dict)")
    widths = sorted(k for k in data if isinstance(k, int) and not isinstance(k, bool))
    if not widths:
        hint = "; it looks like a textual-inversion embedding" if "string_to_param" in data else ""
        raise DataError(f"{where}: not an A1111 hypernetwork (no integer context-width keys such as 768){hint}")
    spec = _spec(data, where)
    states = {w: _pair(data[w], w, where) for w in widths}
    hypernetwork = Hypernetwork(widths, spec)
    for width in widths:
        for which, state in enumerate(states[width]):
            _check_state(hypernetwork.module(width, which), state, f"{where}: [{width}][{which}]")
    hypernetwork.load_pair_states(states)
    name = data.get("name")
    return HypernetworkFile(
        hypernetwork.eval().requires_grad_(False),
        name=str(name) if name else Path(str(where)).stem,
        step=int(data.get("step") or 0),
        sd_checkpoint=data.get("sd_checkpoint"),
        sd_checkpoint_name=data.get("sd_checkpoint_name"),
        optional_info=data.get("optional_info"),
    )


def _spec(data: dict, where: str | Path) -> HypernetworkSpec:
    layers = data.get("layer_structure") or [1, 2, 1]
    if not isinstance(layers, (list, tuple)) or not all(isinstance(x, (int, float)) for x in layers):
        raise DataError(f"{where}: layer_structure must be a list of numbers (got {layers!r}); re-export the file")
    activation = data.get("activation_func") or "linear"
    if activation not in ACTIVATIONS:
        raise DataError(
            f"{where}: activation_func {activation!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
        )
    dropout = data.get("dropout_structure")
    if dropout is None:
        dropout = legacy_dropout_structure(
            layers, bool(data.get("use_dropout", False)), bool(data.get("last_layer_dropout", False))
        )
    if not isinstance(dropout, (list, tuple)) or not all(isinstance(x, (int, float)) for x in dropout):
        raise DataError(f"{where}: dropout_structure must be a list of numbers (got {dropout!r}); re-export the file")
    weight_init = data.get("weight_initialization")
    try:
        return HypernetworkSpec(
            layer_structure=tuple(float(x) for x in layers),
            activation=activation,
            layer_norm=bool(data.get("is_layer_norm", False)),
            dropout_structure=tuple(float(x) for x in dropout) if any(dropout) else None,
            activate_output=bool(data.get("activate_output", True)),  # A1111's default for files without the key
            weight_init=weight_init if weight_init in WEIGHT_INITS else "Normal",  # only matters for new weights
        )
    except ValueError as exc:
        raise DataError(f"{where}: {exc}") from None


def _pair(value: Any, width: int, where: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(sd, dict) for sd in value):
        raise DataError(f"{where}: [{width}] must hold two state dicts (k, v) (got {type(value).__name__})")
    pair = []
    for sd in value:
        state = {_LEGACY_KEYS.get(k, k): v for k, v in sd.items()}
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise DataError(f"{where}: [{width}] {bad[0]} is not a tensor; re-export the file")
        pair.append({k: v.float() for k, v in state.items()})
    return pair[0], pair[1]


def _check_state(module, state: dict[str, torch.Tensor], where: str) -> None:
    """Keys and shapes must be what the file's own layer_structure/activation/layer-norm settings build."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise DataError(
            f"{where}: {what} (expected keys {sorted(expected)}); its weights do not match its layer_structure, "
            "activation_func and is_layer_norm settings"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise DataError(f"{where}: {key} has shape {list(state[key].shape)}, expected {list(shape)}")
