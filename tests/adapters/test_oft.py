"""sdtune's OFT / BOFT against LyCORIS' own code (the ``lycoris-lora`` package, an independent implementation of
the parameterisation the files carry): block layouts, the rotated weight, and the layers' two forward paths."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from sdtune.adapters.lora import add_adapter, set_merged
from sdtune.adapters.oft import (
    OrthogonalLayer,
    blocks_shape,
    boft_layout,
    check_blocks,
    inject_orthogonal,
    oft_block,
    orthogonal_config,
    rotations,
    transform_weight,
)

general = pytest.importorskip("lycoris.functional.general", reason="pip install lycoris-lora==4.1.3")

# real SD / SDXL output widths: UNet channels, GEGLU and FF widths, CLIP-L / OpenCLIP-H / bigG widths
WIDTHS = (320, 640, 1280, 2560, 5120, 10240, 768, 1024, 3072, 4096)


@pytest.mark.parametrize("block", [2, 4, 8, 10, 12, 16, 32])
def test_boft_layout_is_lycoris_power2factorization(block: int) -> None:
    """The largest even block <= block_size with a power-of-two block count, all log2(n) + 1 factors (LyCORIS
    ``butterfly_factor`` and ``ButterflyOFTModule``'s ``boft_m``), and an error exactly where LyCORIS has none."""
    for width in WIDTHS:
        size, count = general.power2factorization(width, block)
        if count == 0:
            with pytest.raises(ValueError, match=f"no even block size <= {block} splits its width {width}"):
                boft_layout(width, block)
            continue
        assert boft_layout(width, block) == (size, sum(int(i) for i in f"{count - 1:b}") + 1), width
        assert blocks_shape("boft", width, block) == (count.bit_length(), count, size, size)


@pytest.mark.parametrize("block", [2, 4, 5, 8, 16])
def test_oft_block_is_exact_and_agrees_with_lycoris_where_lycoris_keeps_it(block: int) -> None:
    """OFT's block size is the configured one (an error names the sizes that divide the width); LyCORIS'
    factorization keeps it whenever it divides the width and is at most sqrt(width)."""
    for width in (*WIDTHS, 8, 24):
        if width % block:
            with pytest.raises(ValueError, match=f"does not divide its width {width}; block sizes that do: 2"):
                oft_block(width, block)
            continue
        assert oft_block(width, block) == block
        if block * block <= width:
            assert general.factorization(width, block) == (block, width // block)


@pytest.mark.parametrize("kind", ["oft", "boft"])
@pytest.mark.parametrize("shape", [(32, 12), (16, 8, 3, 3)])
@pytest.mark.parametrize(("constraint", "rescaled"), [(0.0, False), (0.02, True)])
def test_rotated_weight_is_lycoris_diff_weight(kind: str, shape: tuple, constraint: float, rescaled: bool) -> None:
    """``transform_weight`` == W + LyCORIS ``functional.diag_oft.diff_weight`` / ``functional.boft.diff_weight``
    (its plain-torch path), COFT limit ``constraint * out`` and rescale included; and the rotations are orthogonal."""
    from lycoris.functional import boft, diag_oft

    torch.manual_seed(0)
    weight = torch.randn(*shape)
    blocks = torch.randn(blocks_shape(kind, shape[0], 4)) * 0.3
    rescale = 1 + 0.3 * torch.rand(shape[0], *[1] * (len(shape) - 1)) if rescaled else None
    limit = constraint * shape[0]
    ours = transform_weight(weight, blocks, rescale, limit)
    module = diag_oft if kind == "oft" else boft
    theirs = weight + module.diff_weight(weight, blocks, rescale, constraint=limit, backend="torch")
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours - weight).abs().max() > 0.1
    r = rotations(blocks, limit)
    torch.testing.assert_close(r @ r.transpose(-1, -2), torch.eye(4).expand_as(r), atol=1e-5, rtol=0)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Conv2d(16, 16, 3, padding=1))


def _run(model: nn.Module) -> torch.Tensor:
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = model[0](x)  # [2, 5, 16] -> an image of 16 channels
        return model[1](hidden.permute(0, 2, 1).reshape(2, 16, 5, 1))


def _randomise(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "oft_blocks" in name:
                p.normal_(0, 0.3)
            elif "oft_rescale" in name:
                p.mul_(1 + 0.5 * torch.rand_like(p))


@pytest.mark.parametrize("kind", ["oft", "boft"])
def test_both_forward_paths_equal_the_merged_weights_and_unmerge_restores_them(kind: str) -> None:
    """A plain layer runs its rotated weight, a wrapped one (a second adapter on top) rotates the inner output; both
    give the merged model's output, and unmerging gives back the base weights exactly."""
    base = _model()
    model = copy.deepcopy(base)
    config = orthogonal_config(kind, 4, ["0", "1"], constraint=0.05, rescaled=True)
    inject_orthogonal(model, config)
    inject_orthogonal(model, orthogonal_config(kind, 2, ["0", "1"]), "second")  # nested: the output path
    _randomise(model)
    assert isinstance(model[0], OrthogonalLayer) and isinstance(model[0].base_layer, OrthogonalLayer)
    assert [p.requires_grad for p in model.parameters()].count(True) == 6  # the adapters' blocks and rescales only
    unmerged = _run(model)
    assert (unmerged - _run(base)).abs().max() > 1e-2
    set_merged(model, True)
    torch.testing.assert_close(_run(model), unmerged, atol=1e-5, rtol=1e-5)
    set_merged(model, False)
    torch.testing.assert_close(_run(model), unmerged, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(model[i].get_base_layer().weight, base[i].weight) for i in (0, 1))


def test_state_dict_round_trips_through_peft_and_starts_at_the_base() -> None:
    base = _model()
    model = copy.deepcopy(base)
    add_adapter(model, orthogonal_config("boft", 4, ["0", "1"], rescaled=True))
    torch.testing.assert_close(_run(model), _run(base), atol=0, rtol=0)  # R = I, rescale 1: the base model
    _randomise(model)
    state = get_peft_model_state_dict(model)
    assert set(state) == {f"{i}.{p}" for i in (0, 1) for p in ("oft_blocks", "oft_rescale")}
    fresh = copy.deepcopy(base)
    add_adapter(fresh, orthogonal_config("boft", 4, ["0", "1"], rescaled=True), "x")
    assert not set_peft_model_state_dict(fresh, state, adapter_name="x").unexpected_keys
    torch.testing.assert_close(_run(fresh), _run(model), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_default_block_sizes_fit_every_layer_of_the_real_models(family: str) -> None:
    """At real SD 1.5 / SDXL widths (built on the meta device) the defaults take every targeted layer, and BOFT's rule
    needs them: a BOFT block size of 8 fits no 320-wide UNet layer (320 = 5 x 64) and says which sizes do."""
    from sdtune.config.methods import DEFAULT_BLOCK_SIZE
    from sdtune.models.components import build_modules
    from sdtune.models.family import ModelFamily
    from sdtune.models.shipped import shipped_configs
    from sdtune.models.targets import TEXT_ENCODER_TARGETS, UNET_TARGETS

    configs = shipped_configs(ModelFamily.parse(family))
    modules = build_modules({k: v for k, v in configs.items() if k != "scheduler"}, empty=True)
    for component, module in modules.items():
        if component == "vae":
            continue
        targets = list((UNET_TARGETS if component == "unet" else TEXT_ENCODER_TARGETS)["all"])
        for kind, block in DEFAULT_BLOCK_SIZE.items():
            check_blocks(module, targets, kind, block, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"its width 320 into a power-of-two number of blocks; sizes that do: 10, 20"):
        check_blocks(modules["unet"], list(UNET_TARGETS["all"]), "boft", 8, None)


@pytest.mark.parametrize("kind", ["oft", "boft"])
def test_a_model_with_orthogonal_layers_moves_and_casts_like_any_module(kind: str) -> None:
    """``.to()`` / ``.double()`` walk every child through ``nn.Module._apply``: an adapter layer must not shadow it
    (a method of that name once made every cast of an OFT model fail)."""
    model = _model()
    inject_orthogonal(model, orthogonal_config(kind, 4, ["0", "1"], constraint=0.05))
    _randomise(model)
    out = _run(model)
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    model.float()
    torch.testing.assert_close(_run(model), out, atol=1e-6, rtol=1e-6)
