"""kohya's block-wise learning-rate weights for LoRA: lists of numbers or a named preset.

``down_lr_weight`` / ``up_lr_weight`` hold one multiplier of the UNet learning rate per input / output block, either
as numbers or as a preset over the blocks (kohya-ss/sd-scripts ``networks/lora.py`` ``get_block_lr_weight``), with
``N`` the number of blocks and ``i`` the block (0 = the shallowest input block, or the deepest output block):

- ``sine``:           sin(pi / 2 x i / (N - 1))        (0 at the first block, 1 at the last)
- ``cosine``:         sin(pi / 2 x (N - 1 - i) / (N - 1))  (the reverse: 1 at the first block, 0 at the last)
- ``linear``:         i / (N - 1)
- ``reverse_linear``: (N - 1 - i) / (N - 1)
- ``zeros``:          0

``+<number>`` adds a constant to every value: ``sine+0.5``. Pure Python (the config layer imports no torch); the
number of blocks comes from the model (:mod:`sdtune.models.unet_blocks`).
"""

from __future__ import annotations

import math
import re

PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")
_PRESET = re.compile(rf"^({'|'.join(PRESETS)})(?:\+([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?))?$")

BlockWeights = list[float] | str


def parse_block_weights(value: object) -> object:
    """A comma-separated string of numbers (as kohya's ``--network_args "down_lr_weight=1,1,0.5"``) as a list; a
    preset string stays a string (checked by :func:`check_block_weights`); anything else as it is."""
    if isinstance(value, str) and not _PRESET.match(value.strip()) and "," in value:
        try:
            return [float(part) for part in value.split(",") if part.strip()]
        except ValueError:
            return value
    return value.strip() if isinstance(value, str) else value


def check_block_weights(value: BlockWeights | None) -> BlockWeights | None:
    """Non-negative numbers, or a preset name with an optional ``+base``; raises ``ValueError`` with the fix."""
    if value is None:
        return None
    if isinstance(value, str):
        if not _PRESET.match(value):
            raise ValueError(
                f"a list of numbers or one of {', '.join(PRESETS)} (optionally +base, e.g. sine+0.5) "
                f"(got {value!r}); e.g. sine"
            )
        return value
    if not value:
        raise ValueError("an empty list; give one number per block, a preset such as sine, or leave it out")
    if any(not (w >= 0 and math.isfinite(w)) for w in value):
        raise ValueError(f"multipliers must be >= 0 (got {value}); 0 leaves a block untrained, 1 keeps the rate")
    return value


def expand_block_weights(value: BlockWeights, count: int) -> list[float]:
    """The ``count`` multipliers of ``value`` (a checked list of ``count`` numbers, or a preset)."""
    if not isinstance(value, str):
        return [float(w) for w in value]
    match = _PRESET.match(value)
    if match is None:
        raise ValueError(f"unknown block-weight preset {value!r}; use one of {', '.join(PRESETS)}")
    name, base = match.group(1), float(match.group(2) or 0.0)
    steps = max(count - 1, 1)
    ramp = [i / steps for i in range(count)]
    if name == "sine":
        values = [math.sin(math.pi / 2 * r) for r in ramp]
    elif name == "cosine":
        values = [math.sin(math.pi / 2 * r) for r in reversed(ramp)]
    elif name == "linear":
        values = ramp
    elif name == "reverse_linear":
        values = list(reversed(ramp))
    else:
        values = [0.0] * count
    return [v + base for v in values]
