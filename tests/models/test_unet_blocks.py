"""The UNet blocks of block-wise LoRA options are kohya's: every adaptable module of the real SD 1.x and SDXL UNets
(built on the meta device from the shipped configs) gets the block index kohya's ``get_block_index`` gives its
kohya module name."""

from __future__ import annotations

import re

import pytest

from sdtune.formats.lora_keys import kohya_module_name, unet_module_names_for
from sdtune.models.family import ModelFamily
from sdtune.models.shipped import shipped_configs
from sdtune.models.tiny import tiny_configs
from sdtune.models.unet_blocks import UNetBlocks

RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def kohya_block_index(lora_name: str, is_sdxl: bool) -> int:
    """kohya-ss/sd-scripts ``networks/lora.py`` ``get_block_index``, restated (NUM_OF_BLOCKS = 12)."""
    if not is_sdxl:
        m = RE_UPDOWN.search(lora_name)
        if m:
            g = m.groups()
            i, j = int(g[1]), int(g[3])
            idx = 3 * i + 2 if g[2] in ("upsamplers", "downsamplers") else 3 * i + j
            return 1 + idx if g[0] == "down" else 12 + 1 + idx
        return 12 if "mid_block_" in lora_name else -1
    name = lora_name[len("lora_unet_") :]
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    if name.startswith("input_blocks_"):
        return 1 + int(name.split("_")[2])
    if name.startswith("middle_block_"):
        return 10 + int(name.split("_")[2])
    if name.startswith("output_blocks_"):
        return 13 + int(name.split("_")[2])
    return 22 if name.startswith("out_") else -1


@pytest.mark.parametrize(("arch", "size", "names"), [("sd1", 25, 25), ("sd2", 25, 25), ("sdxl", 23, 23)])
def test_every_module_of_the_real_unet_is_in_kohyas_block(arch, size, names):
    family = ModelFamily(arch)
    config = shipped_configs(family)["unet"]
    blocks = UNetBlocks.of(family, config)
    assert blocks.size == size and len(blocks.names()) == names
    assert (blocks.num_in, blocks.num_mid) == ((9, 3) if arch == "sdxl" else (12, 1))
    seen = set()
    for path in unet_module_names_for(config):
        ours = blocks.index(path)
        theirs = kohya_block_index(kohya_module_name("unet", path, family, config), arch == "sdxl")
        if theirs == -1:  # SD 1.x/2.x modules kohya finds no block for (its LoRA never adapts them): conv_in is
            theirs = 0 if path == "conv_in" else None  # input_blocks.0 (IN00, the slot kohya's lists keep for it)
        assert ours == theirs, path
        seen.add(ours)
    # every block that holds a Linear/Conv is reached; SD's conv_in is IN00, its embeddings and conv_out no block
    assert seen - {None} == set(range(size)), sorted(set(range(size)) - seen)
    assert (None in seen) == (arch != "sdxl")
    lr = blocks.lr_weights([0.5] * blocks.num_in, None, [2.0] * blocks.num_in)
    assert len(lr) == size and lr.count(0.5) == lr.count(2.0) == blocks.num_in


def test_the_small_models_count_their_own_blocks():
    sd1 = UNetBlocks.of(ModelFamily("sd1"), tiny_configs("sd1")["unet"])  # 2 down blocks, 1 layer each
    assert (sd1.num_in, sd1.size, sd1.describe()) == (4, 9, "IN00-IN03, MID, OUT00-OUT03")
    assert sd1.index("down_blocks.1.resnets.0.conv1") == 3 and sd1.index("up_blocks.1.attentions.1.proj_in") == 8
    xl = UNetBlocks.of(ModelFamily("sdxl"), tiny_configs("sdxl")["unet"])  # 2 down blocks, 2 layers each
    assert (xl.num_in, xl.size) == (6, 17) and xl.describe() == "BASE, IN00-IN05, MID0-MID2, OUT00-OUT05, OUT"
    assert xl.index("mid_block.attentions.0.proj_in") == 1 + 6 + 1
