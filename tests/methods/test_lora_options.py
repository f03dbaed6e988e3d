"""Issue 18's options in real LoRA runs on tiny models: block-wise rates and ranks (kohya's), the optimizers from
pytorch-optimizer (schedule-free: exact resume, averaged exports) and the noise options with zero terminal SNR."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune.adapters.lora import adapter_state
from sdtune.config import LoraConfig
from sdtune.core.errors import ConfigError
from sdtune.core.events import EventBus, StepEnd
from sdtune.formats.lora_keys import adaptable_module_names, kohya_name_table
from sdtune.formats.lora_metadata import KOHYA_PARAM_NAMES, split_param
from sdtune.inference.generate import make_pipeline
from sdtune.inference.samplers import make_sampler
from sdtune.methods.lora import setup
from sdtune.models.loading import load_model
from sdtune.models.text_encoding import encode_prompts
from sdtune.models.unet_blocks import UNetBlocks
from sdtune.tools.lora_check import check_file
from sdtune.train.loop import train
from sdtune.train.rundir import RunDir


def _config(tmp_path, checkpoint, folder, **extra) -> LoraConfig:
    base = {
        "method": "lora",
        "name": "opts",
        "output_dir": str(tmp_path / "runs"),
        "rank": 4,
        "model": {"base": str(checkpoint)},
        "data": {"path": str(folder), "batch_size": 2},
        "optimizer": {"lr": 1e-2},
        "train": {"max_steps": 2},
        "preview": {"enabled": False},
    }
    return LoraConfig.model_validate(base | extra)


def _run(cfg, bus=None):
    job = setup(cfg, Accelerator(cpu=True))
    outputs = train(job, cfg, RunDir(f"{cfg.output_dir}/{cfg.name}"), bus or EventBus(), Accelerator(cpu=True))
    return job, outputs


def _file_modules(path, model) -> dict[str, dict[str, torch.Tensor]]:
    """The UNet modules of a kohya file by diffusers path: {path: {param: tensor}}."""
    names = {c: adaptable_module_names(m) for c, m in model.modules().items() if c != "vae"}
    table = kohya_name_table(model.family, names, model.unet.config)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        name, param = split_param(key, KOHYA_PARAM_NAMES)
        component, module_path = table[name]
        if component == "unet":
            out.setdefault(module_path, {})[param] = tensor
    return out


def test_block_wise_rates_put_each_block_in_its_group_and_leave_zero_blocks_out(
    tmp_path, tiny_checkpoint, image_folder
):
    # the tiny SD 1 UNet has 4 input blocks: IN00 conv_in, IN01 down 0, IN02 its downsampler, IN03 down 1
    cfg = _config(tmp_path, tiny_checkpoint("sd1"), image_folder, targets="all", unet_lr=1e-3,
                  down_lr_weight=[1, 0, 0.5, 2], mid_lr_weight=[3], up_lr_weight="linear")  # fmt: skip
    job = setup(cfg, Accelerator(cpu=True))
    blocks = UNetBlocks.of(job.model.family, job.model.unet.config)
    # kohya's lists: down (IN00-IN03), mid, up (OUT00-OUT03; linear = i / 3)
    want = [1, 0, 0.5, 2] + [3] + [0, 1 / 3, 2 / 3, 1]
    owner = {}
    for path, layer in job.model.unet.named_modules():
        for p in layer.parameters(recurse=False):
            if p.requires_grad:
                owner[id(p)] = path.split(".lora_")[0].split(".hada_")[0]
    groups = job.trainable_parameters()
    adapted = {owner[id(p)] for g in groups for p in g["params"]}
    for group in groups:
        indices = {blocks.index(owner[id(p)]) for p in group["params"]}
        assert len(indices) == 1  # one block per group
        (index,) = indices
        assert group["lr"] == pytest.approx(1e-3 * want[index]) and want[index] > 0
    assert {blocks.index(p) for p in adapted} == {i for i, w in enumerate(want) if w > 0 and i != 0}  # IN00: no target
    assert not any(p.startswith(("down_blocks.0.resnets", "down_blocks.0.attentions", "up_blocks.0.resnets.0"))
                   for p in adapted)  # fmt: skip
    assert sum(len(g["params"]) for g in groups) == len(job.params["unet"])
    # a list of the wrong length for this UNet: one line before training, naming the field and the count
    for field, value, message in [
        ("down_lr_weight", [1.0] * 12, "down_lr_weight: this UNet has 4 input blocks (IN00-IN03, MID, OUT00-OUT03); "
                                       "give 4 values (got 12)"),
        ("block_dims", [4] * 25, "block_dims: this sd1 UNet has 9 blocks (IN00-IN03, MID, OUT00-OUT03); give 9 ranks "
                                 "(got 25)"),
        ("mid_lr_weight", [1.0, 1.0, 1.0], "mid_lr_weight: this UNet's middle block counts as 1 (got 3 values)"),
    ]:  # fmt: skip
        bad = _config(tmp_path, tiny_checkpoint("sd1"), image_folder, **{field: value})
        with pytest.raises(ConfigError) as exc:
            setup(bad, Accelerator(cpu=True))
        assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_block_ranks_and_alphas_are_in_the_file_that_every_tool_loads(tmp_path, tiny_checkpoint, image_folder, family):
    path = tiny_checkpoint(family)
    model = load_model(path)
    blocks = UNetBlocks.of(model.family, model.unet.config)
    dims = [4] * blocks.size
    alphas = [2.0] * blocks.size
    adapted = sorted({blocks.index(p) for p in adaptable_module_names(model.unet)
                      if p.endswith(("to_q", "to_k", "to_v", "to_out.0"))} - {None})  # fmt: skip
    dims[adapted[0]], alphas[adapted[0]] = 2, 1.0
    dims[adapted[1]], alphas[adapted[1]] = 1, 3.0
    dims[adapted[-1]] = 0  # no adapters in this block
    extra = {"block_dims": dims, "block_alphas": alphas, "targets": "attention", "train_text_encoder": True}
    job, outputs = _run(_config(tmp_path, path, image_folder, **extra))
    assert job.export_warnings == []  # every target tool maps every key (compatibility check on export)
    result = check_file(outputs[0], model=job.model)
    assert all(result["targets"][t].ok for t in ("a1111", "comfyui", "invoke", "diffusers"))
    modules = _file_modules(outputs[0], job.model)
    trained = {k.removesuffix(".weight"): v for k, v in adapter_state(job.model.unet).items()}
    seen = set()
    for module_path, params in modules.items():
        index = blocks.index(module_path)
        rank = params["lora_down.weight"].shape[0]
        assert rank == dims[index], module_path
        # the file's scale alpha / rank x up @ down is the block's: block_alpha / rank x B @ A of the trained adapter
        ours = float(params["alpha"]) / rank * params["lora_up.weight"] @ params["lora_down.weight"]
        want = alphas[index] / rank * trained[f"{module_path}.lora_B"] @ trained[f"{module_path}.lora_A"]
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-7)
        seen.add(index)
    assert seen == set(adapted[:-1])  # the rank-0 block is left out, every other adapted block is there
    assert len({float(p["alpha"]) for p in modules.values()}) == 1  # one alpha: diffusers' converter reads it right
    with safe_open(str(outputs[0]), "pt") as fh:
        args = json.loads(fh.metadata()["ss_network_args"])
    assert args["block_dims"] == ",".join(map(str, dims))

    # the PEFT file of the same run in diffusers' load_lora_weights reproduces the trained UNet
    cfg = _config(tmp_path, path, image_folder, name="peft", file_format="peft", **extra)
    job, outputs = _run(cfg)
    for module in job.components.values():
        module.eval()
    prompt = ["tag1, red, square"]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)

    def unet_out(m):
        with torch.no_grad():
            cond = encode_prompts(m, prompt)
            return m.unet(latents, torch.tensor([500]), cond.context, **cond.unet_kwargs(16, 16)).sample

    trained = unet_out(job.model)
    fresh = load_model(path)
    untouched = unet_out(fresh)
    make_pipeline(fresh).load_lora_weights(str(outputs[0].parent), weight_name=outputs[0].name)
    torch.testing.assert_close(unet_out(fresh), trained, atol=1e-5, rtol=1e-4)
    assert (trained - untouched).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["lion", "came", "schedulefree_adamw"])
def test_each_pytorch_optimizer_trains_a_short_lora_run(tmp_path, tiny_checkpoint, image_folder, name):
    pytest.importorskip("pytorch_optimizer")
    losses = []
    bus = EventBus()
    bus.subscribe(lambda e: losses.append(e.loss) if isinstance(e, StepEnd) else None)
    lr = 3e-3 if name == "lion" else 1e-2
    cfg = _config(tmp_path, tiny_checkpoint("sd1"), image_folder, optimizer={"name": name, "lr": lr})
    job, outputs = _run(cfg, bus)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    ups = {k: v for k, v in load_file(outputs[0]).items() if k.endswith("lora_up.weight")}
    assert ups and all(v.abs().max() > 0 for v in ups.values())  # lora_up starts at 0: every adapter moved


def test_schedule_free_lora_exports_the_average_and_resumes_exactly(tmp_path, tiny_checkpoint, image_folder):
    pytest.importorskip("pytorch_optimizer")
    path = tiny_checkpoint("sd1")
    extra = {"optimizer": {"name": "schedulefree_adamw", "lr": 2e-2}, "train": {"max_steps": 4}, "file_format": "peft"}
    job, outputs = _run(_config(tmp_path, path, image_folder, name="whole", **extra))
    checkpoint = tmp_path / "runs" / "whole" / "checkpoints" / "step-4"
    trained = load_file(checkpoint / "trainable.safetensors")
    exported = load_file(outputs[0])
    in_checkpoint = load_file(checkpoint / "export" / outputs[0].name)
    assert exported.keys() == in_checkpoint.keys()
    assert all(torch.equal(exported[k], in_checkpoint[k]) for k in exported)
    # the trained adapter (y) is not what users get (x); the parameters are y again after the export
    b_key = next(k for k in trained if k.startswith("unet.") and "lora_B" in k)
    file_key = "unet." + b_key[len("unet.") :]
    assert file_key in exported and (exported[file_key] - trained[b_key]).abs().max() > 1e-5

    cfg = _config(tmp_path, path, image_folder, name="stopped", **extra)
    run = RunDir(tmp_path / "runs" / "stopped")
    bus = EventBus()
    bus.subscribe(lambda e: run.request_stop() if isinstance(e, StepEnd) and e.step == 2 else None)
    train(setup(cfg, Accelerator(cpu=True)), cfg, run, bus, Accelerator(cpu=True))
    assert [c.step for c in run.list_checkpoints()] == [2]
    _run(cfg)
    resumed = load_file(run.checkpoints / "step-4" / "trainable.safetensors")
    assert trained.keys() == resumed.keys()
    assert all(torch.equal(trained[k], resumed[k]) for k in trained)  # bit-exact
    again = load_file(run.output / "stopped.safetensors")
    assert all(torch.equal(exported[k], again[k]) for k in exported)


def test_noise_options_in_a_v_prediction_lora_run_with_zero_terminal_snr(tmp_path, tiny_checkpoint, image_folder):
    train_options = {
        "max_steps": 2,
        "zero_terminal_snr": True,
        "multires_noise_iterations": 6,
        "multires_noise_discount": 0.4,
        "input_perturbation": 0.1,
        "debiased_estimation": True,
        "min_snr_gamma": 5.0,
        "timestep_range": [500, 1000],
        "timestep_shift": 2.0,
    }
    cfg = _config(tmp_path, tiny_checkpoint("sd1"), image_folder, model={"base": str(tiny_checkpoint("sd1")),
                  "prediction_type": "v_prediction"}, train=train_options)  # fmt: skip
    losses = []
    bus = EventBus()
    bus.subscribe(lambda e: losses.append(e.loss) if isinstance(e, StepEnd) else None)
    job, outputs = _run(cfg, bus)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert float(job.scheduler.alphas_cumprod[-1]) == 0.0  # the training schedule is rescaled
    sampler = make_sampler("ddim", job.model.scheduler_config, "v_prediction")  # what previews sample with
    assert sampler.config.rescale_betas_zero_snr and sampler.config.timestep_spacing == "trailing"
    sampler.set_timesteps(4)
    assert int(sampler.timesteps[0]) == 999  # trailing: sampling starts at the pure-noise step
    with safe_open(str(outputs[0]), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_zero_terminal_snr"] == "True" and meta["ss_debiased_estimation"] == "True"
    assert (meta["ss_multires_noise_iterations"], meta["ss_multires_noise_discount"]) == ("6", "0.4")
    assert (meta["ss_ip_noise_gamma"], meta["ss_min_snr_gamma"]) == ("0.1", "5.0")
    assert meta["modelspec.prediction_type"] == "v"


def test_block_options_are_refused_for_oft_and_boft(tmp_path):
    import yaml

    from sdtune.config import load_train_config

    for adapter in ("oft", "boft"):
        for field, value in (("down_lr_weight", "sine"), ("block_dims", [4] * 25)):
            raw = {"method": "lora", "name": "x", "data": {"path": str(tmp_path)}, "adapter": adapter, field: value}
            path = tmp_path / "c.yaml"
            path.write_text(yaml.safe_dump(raw), encoding="utf-8")
            with pytest.raises(ConfigError, match=f"{field}: block options are for the rank-based kinds"):
                load_train_config(path)
