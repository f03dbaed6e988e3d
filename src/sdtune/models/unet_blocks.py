"""The UNet blocks that kohya's block-wise LoRA options count (``down_lr_weight``, ``mid_lr_weight``,
``up_lr_weight``, ``block_dims``, ``block_alphas``; kohya-ss/sd-scripts ``networks/lora.py`` ``get_block_index``,
``get_block_lr_weight``, ``get_block_dims_and_alphas``).

A block is a sub-block of the original (LDM / SGM) UNet layout: ``input_blocks.N`` (IN00 = ``conv_in``, then the
resnet + attention pairs and the downsamplers), the middle block, and ``output_blocks.N`` (deepest first). With
``n`` input blocks (= output blocks; ``len(down blocks) x (layers_per_block + 1)``: 12 on SD 1.x/2.x, 9 on SDXL,
6 on the built-in model), the per-block lists are, in kohya's order:

- SD 1.x / 2.x: ``[IN00 .. IN(n-1), MID, OUT00 .. OUT(n-1)]``, 2n + 1 entries (25); the middle block is one block;
- SDXL: ``[BASE, IN00 .. IN(n-1), MID0, MID1, MID2, OUT00 .. OUT(n-1), OUT]``, 2n + 5 entries (23): the middle
  block counts as its three sub-blocks, BASE holds the time and size embeddings, OUT the output layers.

The learning-rate weights give ``n`` values for down, 1 (SD 1.x/2.x) or 3 (SDXL) for mid and ``n`` for up; SDXL's
BASE and OUT keep weight 1. Modules outside every block (SD 1.x/2.x's embeddings and output layers, only reachable
with explicit ``target_modules``) keep the plain rank and rate.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sdtune.models.family import ModelFamily
from sdtune.models.ldm_keys import unet_rules

_ORIGINAL = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.")


@dataclass(frozen=True)
class UNetBlocks:
    """The block layout of one UNet (see the module docstring)."""

    sdxl: bool
    num_in: int  # input blocks = output blocks
    config: Mapping[str, Any]

    @classmethod
    def of(cls, family: ModelFamily, unet_config: Mapping[str, Any]) -> UNetBlocks:
        down, layers = list(unet_config["down_block_types"]), unet_config["layers_per_block"]
        per_block = [int(layers)] * len(down) if isinstance(layers, int) else [int(v) for v in layers]
        return cls(family.arch == "sdxl", sum(per_block) + len(down), dict(unet_config))

    @property
    def num_mid(self) -> int:
        return 3 if self.sdxl else 1

    @property
    def size(self) -> int:
        """Entries of ``block_dims`` / ``block_alphas``."""
        return 2 * self.num_in + self.num_mid + (2 if self.sdxl else 0)

    def names(self) -> list[str]:
        """The blocks in list order: ``IN00``, ..., ``MID``, ``OUT00``, ... (SDXL: ``BASE`` first, ``OUT`` last)."""
        ins = [f"IN{i:02d}" for i in range(self.num_in)]
        outs = [f"OUT{i:02d}" for i in range(self.num_in)]
        mids = [f"MID{i}" for i in range(self.num_mid)] if self.sdxl else ["MID"]
        return (["BASE"] if self.sdxl else []) + ins + mids + outs + (["OUT"] if self.sdxl else [])

    def describe(self) -> str:
        """The blocks in short: ``IN00-IN11, MID, OUT00-OUT11`` (SDXL: ``BASE, IN00-IN08, MID0-MID2, ...``)."""
        last = self.num_in - 1
        middle = [f"IN00-IN{last:02d}", "MID0-MID2" if self.sdxl else "MID", f"OUT00-OUT{last:02d}"]
        return ", ".join((["BASE"] if self.sdxl else []) + middle + (["OUT"] if self.sdxl else []))

    def index(self, module_path: str) -> int | None:
        """The list position of the block holding UNet module ``module_path`` (a diffusers path such as
        ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``); ``None`` outside every block."""
        try:
            (rule,) = unet_rules([module_path + ".weight"], self.config, prefix="")
        except KeyError:
            return None
        original, first = rule.original, 1 if self.sdxl else 0
        match = _ORIGINAL.match(original)
        if match is None:  # time_embed, label_emb, out: SDXL's BASE and OUT, no block on SD 1.x/2.x
            if not self.sdxl:
                return None
            return 0 if original.startswith(("time_embed.", "label_emb.")) else self.size - 1
        kind, number = match.group(1), int(match.group(2))
        if kind == "input_blocks":
            return first + number
        if kind == "middle_block":
            return first + self.num_in + (number if self.sdxl else 0)
        return first + self.num_in + self.num_mid + number

    def lr_weights(
        self, down: Sequence[float] | None, mid: Sequence[float] | None, up: Sequence[float] | None
    ) -> list[float]:
        """One learning-rate multiplier per block, in list order (1 where a list is not given; SDXL's BASE, OUT: 1)."""
        ones_in, ones_mid = [1.0] * self.num_in, [1.0] * self.num_mid
        middle = list(down or ones_in) + list(mid or ones_mid) + list(up or ones_in)
        return [1.0, *middle, 1.0] if self.sdxl else middle
