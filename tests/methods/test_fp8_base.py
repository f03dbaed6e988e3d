"""``fp8_base: true``: the frozen UNet's linear layers hold float8 weights (torchao's weight-only float8) under the
LoRA family's adapters, which still train in fp32 and export as usual; the estimate counts the smaller UNet."""

from __future__ import annotations

import pytest
import torch
from tests.methods.method_cases import case_config

from sdtune.core.errors import ConfigError
from sdtune.core.events import EventBus
from sdtune.methods import setup_function as method_setup  # (pytest reserves the name setup_function)
from sdtune.methods.estimate import estimate
from sdtune.train.loop import train
from sdtune.train.precision import fp8_frozen_linears, is_fp8
from sdtune.train.rundir import RunDir


def _fp8_config(tmp_path, base, folder, case="lora", **extra):
    cfg = case_config(tmp_path, base, folder, case, mixed_precision="bf16")
    return cfg.model_copy(update={"fp8_base": True} | extra)


def _bytes(module: torch.nn.Module) -> int:
    """What the module's parameters hold, counting a float8 tensor's data and scales."""
    total = 0
    for p in module.parameters():
        if is_fp8(p):
            total += p.qdata.nbytes + p.scale.nbytes
        else:
            total += p.nbytes
    return total


@pytest.mark.parametrize("case", ["lora", "loha", "lokr"])
def test_fp8_base_holds_float8_linears_trains_fp32_adapters_and_exports(
    tmp_path, tiny_checkpoint, image_folder, bf16_accelerator, case
):
    cfg = _fp8_config(tmp_path, tiny_checkpoint("sd1"), image_folder, case)
    job = method_setup(cfg.method)(cfg, bf16_accelerator)
    unet = job.model.unet
    trainable = [p for g in job.trainable_parameters() for p in g["params"]]
    ids = {id(p) for p in trainable}
    linears = [
        m for m in unet.modules() if isinstance(m, torch.nn.Linear) and not any(id(p) in ids for p in m.parameters())
    ]
    assert linears and all(is_fp8(m.weight) for m in linears), "every frozen UNet linear weight is float8"
    assert not any(is_fp8(p) for p in trainable) and all(p.dtype == torch.float32 for p in trainable)
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and not m.weight.requires_grad]
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs), "frozen convolutions stay bf16"
    before = [p.detach().clone() for p in trainable]

    outputs = train(job, cfg, RunDir(f"{cfg.output_dir}/{cfg.name}"), EventBus(), bf16_accelerator)

    losses = [r["loss"] for r in RunDir(f"{cfg.output_dir}/{cfg.name}").metrics() if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, trainable, strict=True)), "nothing trained"
    assert outputs and all(path.exists() for path in outputs)


def _predict(unet) -> torch.Tensor:
    """The UNet's prediction on fixed inputs under bf16 autocast (as a training step computes)."""
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, 16, 16, generator=g)
    context = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return unet(sample, torch.tensor([100, 700]), context).sample.float()


def test_fp8_unet_predicts_close_to_bf16_and_the_estimate_counts_its_bytes(
    tmp_path, tiny_checkpoint, image_folder, tiny_model
):
    model = tiny_model("sd1")
    unet = type(model.unet).from_config(model.unet.config)
    unet.load_state_dict(model.unet.state_dict())
    unet.to(torch.bfloat16).requires_grad_(False)
    reference = _predict(unet)
    bf16_bytes = _bytes(unet)
    assert fp8_frozen_linears(unet) > 0
    quantised = _predict(unet)
    # e4m3 keeps 3 mantissa bits: per weight about 6 % error, averaging out over a layer's sums
    error = (quantised - reference).norm() / reference.norm()
    assert 0 < error < 0.08, float(error)

    cfg = _fp8_config(tmp_path, tiny_checkpoint("sd1"), image_folder)
    plain = cfg.model_copy(update={"fp8_base": False})
    with_fp8, without = estimate(cfg, "cpu", "bf16"), estimate(plain, "cpu", "bf16")
    assert without.frozen_bytes["unet"] == bf16_bytes
    assert with_fp8.frozen_bytes["unet"] == _bytes(unet) < bf16_bytes


def test_fp8_base_refuses_dora_full_precision_and_other_methods(
    tmp_path, tiny_checkpoint, image_folder, accelerator_in
):
    base = tiny_checkpoint("sd1")
    cfg = case_config(tmp_path, base, image_folder, "lora", mixed_precision="bf16").model_dump()
    for adapter in ("dora", "oft", "boft"):
        with pytest.raises(ConfigError, match=f"fp8_base: {adapter} computes from the exact base weight"):
            _validated(tmp_path, cfg | {"fp8_base": True, "adapter": adapter, "rank": 8})
    with pytest.raises(ConfigError, match=r"fp8_base: .*set train.mixed_precision: bf16"):
        _validated(tmp_path, cfg | {"fp8_base": True, "train": cfg["train"] | {"mixed_precision": "no"}})
    ti = case_config(tmp_path, base, image_folder, "textual_inversion").model_dump()
    with pytest.raises(ConfigError, match="fp8_base"):  # only concept models have the field
        _validated(tmp_path, ti | {"fp8_base": True})
    # `auto` that resolves to full precision (this CPU, a tiny UNet) is refused when the run starts, in one line
    auto = _fp8_config(tmp_path, base, image_folder).model_copy()
    auto.train.mixed_precision = "auto"
    with pytest.raises(ConfigError, match="resolved to 'no'"):
        method_setup("lora")(auto, accelerator_in("no"))


def _validated(tmp_path, raw: dict):
    import yaml

    from sdtune.config import load_train_config

    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return load_train_config(path)
