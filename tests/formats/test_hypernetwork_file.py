"""A1111 hypernetwork .pt files: the exact layout A1111 writes and reads, weights-only loading, one-line errors."""

from __future__ import annotations

import pickle

import pytest
import torch

from sdtune.adapters.hypernetwork import ACTIVATIONS, Hypernetwork, HypernetworkSpec, install
from sdtune.core.errors import DataError
from sdtune.formats.hypernetwork_file import HypernetworkFile, load_hypernetwork, save_hypernetwork
from sdtune.models.tiny import build_tiny

# What A1111's Hypernetwork.save writes besides the per-width module pairs (modules/hypernetworks/hypernetwork.py).
A1111_METADATA = {
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
}


def _hypernetwork(sizes=(16,), seed=0, **spec) -> Hypernetwork:
    hn = Hypernetwork(sizes, HypernetworkSpec(**spec))
    hn.reset_parameters(torch.Generator().manual_seed(seed))
    return hn.eval()


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 16, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([100, 700]), context).sample


def test_file_has_a1111_keys_and_plain_types_for_weights_only(tmp_path):
    hn = _hypernetwork((16, 8))
    path = save_hypernetwork(HypernetworkFile(hn, "style", 12, "0123456789", "tiny"), tmp_path / "style.pt")
    data = torch.load(path, map_location="cpu", weights_only=True)  # refuses anything but plain containers/tensors
    assert {k for k in data if isinstance(k, int)} == {8, 16}
    assert set(data) - {8, 16} == A1111_METADATA
    for width in (8, 16):
        pair = data[width]
        assert isinstance(pair, tuple) and len(pair) == 2
        for state in pair:
            # "1, 2, 1" with the linear activation: Linear at Sequential index 0 and 1
            assert sorted(state) == ["linear.0.bias", "linear.0.weight", "linear.1.bias", "linear.1.weight"]
            assert state["linear.0.weight"].shape == (2 * width, width)
            assert state["linear.1.weight"].shape == (width, 2 * width)
            assert state["linear.0.weight"].dtype == torch.float32
    assert data["layer_structure"] == [1.0, 2.0, 1.0]
    assert (data["step"], data["name"], data["sd_checkpoint"], data["sd_checkpoint_name"]) == (
        12,
        "style",
        "0123456789",
        "tiny",
    )
    assert data["activation_func"] == "linear" and data["weight_initialization"] == "Normal"
    assert data["is_layer_norm"] is False and data["activate_output"] is False
    assert data["use_dropout"] is False and data["last_layer_dropout"] is False
    assert data["dropout_structure"] == [0.0, 0.0, 0.0] and data["optional_info"] is None
    # A1111's Normal init: N(0, 0.01) weights, zero biases (the last layer too: nothing is zero-initialised)
    assert torch.all(data[16][0]["linear.1.bias"] == 0) and data[16][0]["linear.1.weight"].abs().max() > 0
    assert 0.005 < float(data[16][0]["linear.0.weight"].std()) < 0.015


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize(
    "spec",
    [
        {},
        {
            "activation": "relu",
            "layer_norm": True,
            "layer_structure": (1, 2, 2, 1),
            "dropout_structure": (0, 0.1, 0.2, 0),
        },
        {"activation": "swish", "activate_output": True, "weight_init": "KaimingNormal"},
        {"activation": "prelu", "weight_init": "XavierUniform", "layer_structure": (1, 1.5, 1)},
    ],
    ids=["default", "relu-ln-dropout", "swish-out", "prelu-1.5"],
)
def test_written_file_loads_back_to_the_same_unet_outputs(tmp_path, family, spec):
    unet = build_tiny(family).unet.eval()
    base = _unet_out(unet)
    hn = _hypernetwork((16, 8), seed=3, **spec)
    hooks = install(unet, hn)
    ours = _unet_out(unet)
    hooks.remove()
    torch.testing.assert_close(_unet_out(unet), base, rtol=0, atol=0)  # remove() restores the plain UNet
    assert (ours - base).abs().max() > 1e-6

    path = save_hypernetwork(HypernetworkFile(hn, "x"), tmp_path / "x.pt")
    loaded = load_hypernetwork(path)
    assert loaded.hypernetwork.spec.layer_structure == tuple(float(x) for x in hn.spec.layer_structure)
    assert loaded.hypernetwork.spec.activation == hn.spec.activation
    fresh = build_tiny(family).unet.eval()
    install(fresh, loaded.hypernetwork)
    torch.testing.assert_close(_unet_out(fresh), ours, rtol=0, atol=0)


def test_reads_an_old_a1111_file_as_a1111_does(tmp_path):
    """A hand-built file as early A1111 wrote it: linear1/linear2 keys, no activation/dropout/activate_output keys."""
    w1, b1, w2, b2 = torch.randn(32, 16), torch.randn(32), torch.randn(16, 32), torch.randn(16)
    old = {"linear1.weight": w1, "linear1.bias": b1, "linear2.weight": w2, "linear2.bias": b2}
    torch.save({16: [old, {k: -v for k, v in old.items()}], "step": 7, "name": "old"}, tmp_path / "old.pt")
    loaded = load_hypernetwork(tmp_path / "old.pt")
    assert (loaded.name, loaded.step, loaded.sd_checkpoint) == ("old", 7, None)
    x = torch.randn(3, 16)
    k_module, v_module = loaded.hypernetwork.module(16, 0), loaded.hypernetwork.module(16, 1)
    torch.testing.assert_close(k_module(x), x + (x @ w1.T + b1) @ w2.T + b2)  # residual MLP, no activation
    torch.testing.assert_close(v_module(x), x + (x @ -w1.T - b1) @ -w2.T - b2)
    k_module.multiplier = 0.25
    torch.testing.assert_close(k_module(x), x + ((x @ w1.T + b1) @ w2.T + b2) * 0.25)
    k_module.train()  # A1111 ignores the multiplier while training
    torch.testing.assert_close(k_module(x), x + (x @ w1.T + b1) @ w2.T + b2)


def test_missing_activate_output_means_true_as_in_a1111(tmp_path):
    """A1111 reads files without ``activate_output`` with the activation after the last layer too."""
    w1, w2 = torch.randn(32, 16), torch.randn(16, 32)
    state = {"linear.0.weight": w1, "linear.0.bias": torch.zeros(32), "linear.2.weight": w2}
    state["linear.2.bias"] = torch.zeros(16)
    torch.save({16: (state, state), "activation_func": "relu"}, tmp_path / "relu.pt")
    module = load_hypernetwork(tmp_path / "relu.pt").hypernetwork.module(16, 0)
    x = torch.randn(3, 16)
    torch.testing.assert_close(module(x), x + torch.relu(torch.relu(x @ w1.T) @ w2.T))


def test_fp16_export_is_read_back_in_float32(tmp_path):
    hn = _hypernetwork()
    path = save_hypernetwork(HypernetworkFile(hn, "h"), tmp_path / "h.pt", dtype="fp16")
    assert torch.load(path, weights_only=True)[16][1]["linear.0.weight"].dtype == torch.float16
    loaded = load_hypernetwork(path).hypernetwork
    assert loaded.module(16, 1).linear[0].weight.dtype == torch.float32
    torch.testing.assert_close(loaded.module(16, 1).linear[0].weight, hn.module(16, 1).linear[0].weight.half().float())


def test_every_activation_builds(tmp_path):
    for name in ACTIVATIONS:
        hn = _hypernetwork(activation=name)
        loaded = load_hypernetwork(save_hypernetwork(HypernetworkFile(hn, name), tmp_path / f"{name}.pt"))
        x = torch.randn(2, 16)
        torch.testing.assert_close(loaded.hypernetwork.module(16, 0)(x), hn.module(16, 0)(x))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([1, 2, 3], "not an A1111 hypernetwork (a list, expected a dict)"),
        ({"step": 3}, "no integer context-width keys"),
        ({"string_to_param": {"*": torch.zeros(1, 16)}}, "looks like a textual-inversion embedding"),
        ({16: (torch.zeros(3),)}, "[16] must hold two state dicts (k, v)"),
        ({16: ({"linear.0.weight": torch.zeros(32, 16)}, {})}, "missing linear.0.bias"),
        ({16: ({"linear.0.weight": 1.0}, {})}, "linear.0.weight is not a tensor"),
        ({16: ({}, {}), "layer_structure": [2, 1]}, "layer_structure must start and end with 1"),
        ({16: ({}, {}), "activation_func": "softmax2d"}, "activation_func 'softmax2d' is not supported"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(DataError) as exc:
        load_hypernetwork(path)
    assert message in str(exc.value) and str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_shape_mismatch_and_code_and_missing_file(tmp_path):
    hn = _hypernetwork()
    state = hn.pair_states()[16][0]
    state["linear.1.weight"] = torch.zeros(16, 48)
    torch.save({16: (state, state)}, tmp_path / "shape.pt")
    with pytest.raises(DataError, match=r"linear\.1\.weight has shape \[16, 48\], expected \[16, 32\]"):
        load_hypernetwork(tmp_path / "shape.pt")
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({16: _Evil()}, protocol=2))
    with pytest.raises(DataError, match="refused to load"):
        load_hypernetwork(tmp_path / "evil.pt")
    with pytest.raises(DataError, match="no such hypernetwork file"):
        load_hypernetwork(tmp_path / "nope.pt")
