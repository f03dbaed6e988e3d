"""Adapter file sizes per kind and rank: the built-in model (files written), real SD 1.5 and SDXL (counted).

    python benchmarks/lora_sizes.py [--ranks 4 8 16 32] [--dtype fp16]

UNet adapters only (the default `train_text_encoder: false`), kohya/LyCORIS layout. Presets as `sdtune train`
uses them: `attention_ff` for lora/dora/loha/lokr, `all` (convolutions too) for locon. For the built-in model
the file is really written with sdtune's exporter; for real-size SD 1.5 / SDXL the UNet is built on the meta
device and the exported tensors' bytes are counted (the safetensors header adds a few kB on top).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from sdtune.adapters.lora import inject, peft_config
from sdtune.core.dtypes import cast_floats, torch_dtype
from sdtune.formats.lora_files import to_kohya
from sdtune.models.components import build_modules
from sdtune.models.family import ModelFamily
from sdtune.models.loading import load_model
from sdtune.models.shipped import shipped_configs
from sdtune.models.targets import UNET_TARGETS

KINDS = ("lora", "dora", "locon", "loha", "lokr")


def _adapted_unet(family: str, kind: str, rank: int):
    if family == "builtin":
        model = load_model("builtin")
        unet, fam = model.unet, model.family
    else:
        fam = ModelFamily.parse(family)
        unet = build_modules(shipped_configs(fam), empty=True)["unet"]
    unet.requires_grad_(False)
    targets = UNET_TARGETS["all" if kind == "locon" else "attention_ff"]
    config = peft_config(kind, rank, float(rank), targets)
    inject(unet, config)
    return unet, fam, config


def size_bytes(family: str, kind: str, rank: int, dtype: str, tmp: Path) -> int:
    unet, fam, config = _adapted_unet(family, kind, rank)
    state = get_peft_model_state_dict(unet)
    tensors = cast_floats(to_kohya({"unet": state}, {"unet": config}, fam, unet.config), torch_dtype(dtype))
    if family != "builtin":
        return sum(t.numel() * t.element_size() for t in tensors.values())
    path = tmp / f"{kind}-{rank}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path.stat().st_size


def _human(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--families", nargs="+", default=["builtin", "sd1", "sdxl"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            print(f"\n{family} ({args.dtype}, UNet adapters)")
            print("| kind | " + " | ".join(f"rank {r}" for r in args.ranks) + " |")
            print("|---|" + "---|" * len(args.ranks))
            for kind in KINDS:
                row = [_human(size_bytes(family, kind, r, args.dtype, Path(tmp))) for r in args.ranks]
                print(f"| {kind} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
