"""Concept models on tiny SD1/SDXL models: each adapter kind trains, writes a file, and independent loaders agree."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from pydantic import ValidationError

from sdtune.config import LoraConfig
from sdtune.core.errors import ConfigError, DataError
from sdtune.core.events import EventBus
from sdtune.formats.lora_files import detect_lora_layout
from sdtune.inference.generate import make_pipeline
from sdtune.methods.lora import setup
from sdtune.models.loading import load_model
from sdtune.models.text_encoding import encode_prompts
from sdtune.train.loop import train
from sdtune.train.rundir import RunDir


def lora_config(tmp_path, model, folder, **extra):
    base = {
        "method": "lora",
        "name": "concept",
        "output_dir": str(tmp_path / "runs"),
        "rank": 4,
        "alpha": 8,
        "model": {"base": str(model)},
        "data": {"path": str(folder), "batch_size": 2},
        "optimizer": {"lr": 1e-2},
        "train": {"max_steps": 4},
        "preview": {"steps": 2, "before_training": False},
    }
    base.update(extra)
    return LoraConfig.model_validate(base)


def run_job(cfg):
    job = setup(cfg, Accelerator(cpu=True))
    outputs = train(job, cfg, RunDir(f"{cfg.output_dir}/{cfg.name}"), EventBus(), Accelerator(cpu=True))
    return job, outputs


def _unet_out(model, cond):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        return model.unet(latents, torch.tensor([500]), cond.context, **cond.unet_kwargs(16, 16)).sample


ORTHOGONAL = {"block_size": 4, "rank": 8, "alpha": None}  # oft/boft: no rank (8 is the default, left as it is)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("adapter", ["lora", "dora", "locon", "loha", "lokr", "oft", "boft"])
def test_every_adapter_kind_trains_only_adapters_and_writes_its_layout(
    tmp_path, tiny_checkpoint, image_folder, family, adapter
):
    path = tiny_checkpoint(family)
    extra = {
        "adapter": adapter,
        "targets": "all" if adapter in ("locon", "boft") else "attention_ff",
        "train_text_encoder": adapter in ("lora", "loha", "oft"),
        "save": {"dtype": "fp16" if adapter in ("lora", "lokr", "boft") else "fp32"},
    } | (ORTHOGONAL if adapter in ("oft", "boft") else {})
    job, outputs = run_job(lora_config(tmp_path, path, image_folder, **extra))
    base = load_model(path)
    for name, module in job.components.items():
        original = base.modules()[name].state_dict()
        for key, value in module.state_dict().items():
            if key.replace(".base_layer", "") in original and "lora_" not in key and "oft_" not in key:
                assert torch.equal(value, original[key.replace(".base_layer", "")]), key  # base weights frozen
    assert [p.suffix for p in outputs] == [".safetensors"]
    from safetensors import safe_open

    with safe_open(str(outputs[0]), "pt") as fh:
        layout = detect_lora_layout(fh.keys())
        meta = fh.metadata()
        dtypes = {fh.get_tensor(k).dtype for k in fh.keys() if not k.endswith(".alpha")}
    assert dtypes == {torch.float16 if extra["save"]["dtype"] == "fp16" else torch.float32}  # save.dtype
    assert layout == ("kohya" if adapter in ("lora", "locon") else "lycoris")
    assert meta["ss_network_dim"] == "4" and meta["ss_steps"] == "4" and meta["sshs_model_hash"]


@pytest.mark.parametrize(
    ("family", "file_format", "adapter"),
    [("sd1", "kohya", "lora"), ("sdxl", "kohya", "lora"), ("sd1", "peft", "lora"), ("sdxl", "peft", "lora"),
     ("sd1", "peft", "dora")],  # DoRA per input column: the PEFT file is its exact dense LoRA
)  # fmt: skip
def test_diffusers_load_lora_weights_reproduces_the_trained_model(
    tmp_path, tiny_checkpoint, image_folder, family, file_format, adapter
):

    path = tiny_checkpoint(family)
    cfg = lora_config(tmp_path, path, image_folder, train_text_encoder=True, file_format=file_format, adapter=adapter)
    job, outputs = run_job(cfg)
    for module in job.components.values():
        module.eval()
    prompt = ["tag1, red, square"]
    with torch.no_grad():
        ours = encode_prompts(job.model, prompt)
    trained = _unet_out(job.model, ours)

    fresh = load_model(path)
    pipe = make_pipeline(fresh)  # diffusers' own SD / SDXL pipeline over the fresh base modules
    untouched = _unet_out(fresh, encode_prompts(fresh, prompt))
    pipe.load_lora_weights(str(outputs[0].parent), weight_name=outputs[0].name)
    with torch.no_grad():
        theirs = encode_prompts(fresh, prompt)
    torch.testing.assert_close(theirs.context, ours.context, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_unet_out(fresh, theirs), trained, atol=1e-5, rtol=1e-4)
    assert (trained - untouched).abs().max() > 1e-4  # the adapters changed the model


@pytest.mark.parametrize(
    ("family", "adapter", "extra"),
    [("sd1", "oft", {"constraint": 1e-3, "train_text_encoder": True}), ("sd1", "boft", {"rescaled": True}),
     ("sdxl", "boft", {"butterfly_factors": 2, "constraint": 1e-2})],
)  # fmt: skip
def test_oft_and_boft_train_and_the_exported_file_is_the_trained_model(
    tmp_path, tiny_checkpoint, image_folder, family, adapter, extra
):
    """A few steps move the model (finite losses), the rotations stay orthogonal, and the file read back by sdtune's
    own reader (from_kohya into fresh layers) gives the trained model's output: constraint and rescale included."""
    from sdtune.adapters.oft import OrthogonalLayer, rotations
    from sdtune.tools.lora_tools import apply_lora

    path = tiny_checkpoint(family)
    cfg = lora_config(tmp_path, path, image_folder, adapter=adapter, targets="all", save={"dtype": "fp32"},
                      **ORTHOGONAL, **extra)  # fmt: skip
    job, outputs = run_job(cfg)
    losses = [row["loss"] for row in RunDir(tmp_path / "runs" / "concept").metrics() if "loss" in row]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    layers = [m for c in job.components.values() for m in c.modules() if isinstance(m, OrthogonalLayer)]
    assert layers and all(m.oft_blocks["default"].dim() == (3 if adapter == "oft" else 4) for m in layers)
    for layer in layers[:5]:
        r = rotations(layer.oft_blocks["default"].detach(), layer.oft_limit["default"])
        eye = torch.eye(r.shape[-1]).expand_as(r)
        torch.testing.assert_close(r @ r.transpose(-1, -2), eye, atol=1e-5, rtol=0)  # orthogonal blocks
    for module in job.components.values():
        module.eval()
    prompt = ["tag1, red, square"]
    with torch.no_grad():
        cond = encode_prompts(job.model, prompt)
        trained = _unet_out(job.model, cond)
    fresh = load_model(path)
    untouched = _unet_out(fresh, encode_prompts(fresh, prompt))
    apply_lora(fresh, outputs[0])
    with torch.no_grad():
        theirs = encode_prompts(fresh, prompt)
    torch.testing.assert_close(theirs.context, cond.context, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_unet_out(fresh, theirs), trained, atol=1e-5, rtol=1e-4)
    assert (trained - untouched).abs().max() > 1e-4  # the adapters changed the model


def test_frozen_text_encoder_with_fixed_captions_encodes_each_caption_once(tmp_path, tiny_checkpoint, image_folder):
    job, _ = run_job(lora_config(tmp_path, tiny_checkpoint("sd1"), image_folder))
    assert job.text_cache is not None and job.text_cache.encoded == 4  # 4 distinct captions, 4 steps x 2 samples


def test_rank_larger_than_a_layer(tmp_path, tiny_checkpoint, image_folder):
    with pytest.raises(ConfigError, match=r"rank: unet: rank 64 exceeds the width 8 of layer '.*'; use a rank <= 8"):
        setup(lora_config(tmp_path, tiny_checkpoint("sd1"), image_folder, rank=64), Accelerator(cpu=True))


def test_target_that_matches_nothing_names_the_nearest_layers(tmp_path, tiny_checkpoint, image_folder):
    cfg = lora_config(tmp_path, tiny_checkpoint("sd1"), image_folder, target_modules=["to_qq"])
    with pytest.raises(
        ConfigError,
        match=r"target_modules: 'to_qq' matches no Linear or Conv2d layer; nearest "
        r"module names: to_q",
    ):
        setup(cfg, Accelerator(cpu=True))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"rank": 0}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1}, "alpha"),
        ({"adapter": "locon", "targets": "attention"}, "set targets: all"),
        ({"adapter": "loha", "file_format": "peft"}, "diffusers cannot load loha"),
        ({"adapter": "oft", "file_format": "peft", **ORTHOGONAL}, "diffusers cannot load oft"),
        ({"adapter": "oft"}, r"rank: adapter: oft has no rank or alpha .*; remove rank: 4, alpha: 8.0"),
        ({"adapter": "boft", "block_size": 4, "alpha": None, "rank": 8, "conv_rank": 2}, "conv_rank: adapter: boft"),
        ({"block_size": 4}, "block_size: applies to adapter: oft or boft only"),
        ({"rescaled": True}, "rescaled: applies to adapter: oft or boft only"),
        ({"adapter": "oft", "butterfly_factors": 2, **ORTHOGONAL}, "butterfly_factors: applies to adapter: boft"),
        ({"adapter": "oft", "block_size": 1, "rank": 8, "alpha": None}, "block_size"),
        ({"adapter": "oft", "constraint": 0, **ORTHOGONAL}, "constraint"),
    ],
)
def test_bad_adapter_settings_are_config_errors(tmp_path, extra, message):
    with pytest.raises(ValidationError, match=message):
        lora_config(tmp_path, "m.safetensors", "d", **extra)


@pytest.mark.parametrize(
    ("extra", "message"),
    [  # tiny SD1 widths: 8, 16, 32, 64, 128 (BOFT's rule on real widths: tests/adapters/test_oft.py)
        ({"adapter": "oft", "block_size": 3},
         r"block_size: unet: layer '.*': block_size 3 does not divide its width 8; block sizes that do: 2, 4, 8"),
        ({"adapter": "boft", "block_size": 4, "butterfly_factors": 4},
         r"block_size: unet: layer '.*': no even block size <= 4 splits its width 8 into a multiple of 8 blocks"),
    ],
)  # fmt: skip
def test_block_sizes_that_fit_no_layer_name_the_layer_and_the_sizes_that_do(
    tmp_path, tiny_checkpoint, image_folder, extra, message
):
    cfg = lora_config(tmp_path, tiny_checkpoint("sd1"), image_folder, **{**ORTHOGONAL, **extra})
    with pytest.raises(ConfigError, match=message):
        setup(cfg, Accelerator(cpu=True))


def test_pivotal_tuning_trains_token_then_freezes_it_and_exports_both(tmp_path, tiny_checkpoint, image_folder):
    for i in range(4):
        (image_folder / f"{i}.txt").write_text(f"a <pivot> thing, tag{i}")
    cfg = lora_config(
        tmp_path,
        tiny_checkpoint("sd1"),
        image_folder,
        token="<pivot>",
        num_vectors=2,
        init_text="red",
        token_lr=5e-2,
        token_train_fraction=0.5,
        train={"max_steps": 6},
        save={"every_n_steps": 1, "keep_last": 10},
    )
    job, outputs = run_job(cfg)
    assert sorted(p.name for p in outputs) == ["concept.safetensors", "pivot.pt", "pivot.safetensors"]
    run = RunDir(tmp_path / "runs" / "concept")
    from safetensors.torch import load_file

    tokens = [load_file(run.checkpoints / f"step-{s}" / "trainable.safetensors")["token.0"] for s in range(1, 7)]
    assert not torch.equal(tokens[0], tokens[2])  # trained during the first half (steps 1-3)
    assert torch.equal(tokens[2], tokens[5])  # frozen from step 3 on
    from sdtune.formats.embeddings import load_embedding

    torch.testing.assert_close(load_embedding(outputs[1]).vectors["text_encoder"], tokens[5])


def test_pivotal_token_must_reach_the_prompts(tmp_path, tiny_checkpoint, image_folder):
    cfg = lora_config(tmp_path, tiny_checkpoint("sd1"), image_folder, token="<pivot>")
    with pytest.raises(DataError, match="token: <pivot> is in no template line and not in every caption"):
        setup(cfg, Accelerator(cpu=True))


# DoRA: its magnitudes averaged and resumed too; OFT / BOFT: their blocks (and BOFT's rescale), read back by sdtune
@pytest.mark.parametrize("adapter", ["lora", "dora", "oft", "boft"])
def test_adapter_ema_is_checkpointed_resumed_exactly_and_exported(tmp_path, tiny_checkpoint, image_folder, adapter):
    from safetensors.torch import load_file

    from sdtune.core.events import StepEnd
    from sdtune.tools.lora_tools import apply_lora

    path = tiny_checkpoint("sd1")
    extra = {"ema": True, "ema_decay": 0.9, "file_format": "peft", "train": {"max_steps": 4}, "optimizer": {"lr": 5e-2}}
    extra["adapter"] = adapter
    orthogonal = adapter in ("oft", "boft")
    if orthogonal:  # diffusers loads neither: the kohya/LyCORIS file, read back by sdtune's own reader
        extra |= ORTHOGONAL | {"file_format": "kohya", "save": {"dtype": "fp32"}, "rescaled": adapter == "boft"}
    job, outputs = run_job(lora_config(tmp_path, path, image_folder, name="whole", **extra))
    whole = load_file(tmp_path / "runs" / "whole" / "checkpoints" / "step-4" / "trainable.safetensors")
    ema_keys = [k for k in whole if k.startswith("ema.unet.")]
    assert ema_keys and int(whole["ema.step"][0]) == 4
    assert all(("ema." + k) in whole for k in whole if k.startswith("unet."))  # every adapter weight is averaged
    assert any((whole[k] - whole[k[4:]]).abs().max() > 1e-5 for k in ema_keys)  # the average is not the raw weights

    # what users get is the average: diffusers' loader on the exported file reproduces the model under the EMA
    for module in job.components.values():
        module.eval()
    cond = encode_prompts(job.model, ["tag1, red, square"])
    with job.averaged():
        averaged = _unet_out(job.model, cond)
    raw = _unet_out(job.model, cond)
    fresh = load_model(path)
    if orthogonal:
        apply_lora(fresh, outputs[0])
    else:
        make_pipeline(fresh).load_lora_weights(str(outputs[0].parent), weight_name=outputs[0].name)
    torch.testing.assert_close(_unet_out(fresh, cond), averaged, atol=1e-5, rtol=1e-4)
    assert (averaged - raw).abs().max() > 1e-4

    # stopped after step 2 and resumed: bit-exact, the average (and its step count) included
    cfg = lora_config(tmp_path, path, image_folder, name="stopped", **extra)
    run = RunDir(tmp_path / "runs" / "stopped")
    bus = EventBus()
    bus.subscribe(lambda e: run.request_stop() if isinstance(e, StepEnd) and e.step == 2 else None)
    job = setup(cfg, Accelerator(cpu=True))
    train(job, cfg, run, bus, Accelerator(cpu=True))
    assert [c.step for c in run.list_checkpoints()] == [2]
    run_job(cfg)
    resumed = load_file(run.checkpoints / "step-4" / "trainable.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
