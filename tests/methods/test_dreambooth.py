"""DreamBooth and LoRA-DreamBooth on tiny SD1 models: class images made once and deterministically, the paired
loss, whole-model exports that diffusers loads with the trained weights, and one-line errors for bad input."""

from __future__ import annotations

import random

import pytest
import torch
import yaml
from accelerate import Accelerator
from pydantic import ValidationError
from safetensors import safe_open

from sdtune.config import DreamBoothConfig, LoraConfig, load_train_config
from sdtune.core.errors import ConfigError, DataError
from sdtune.core.events import EventBus
from sdtune.methods import dreambooth, lora
from sdtune.methods import setup_function as method_setup  # (pytest reserves the name setup_function)
from sdtune.models.loading import load_model
from sdtune.train.loop import sample_generator, train
from sdtune.train.prior import paired_weights
from sdtune.train.rundir import RunDir


def db_config(tmp_path, model, folder, **extra) -> DreamBoothConfig:
    base = {
        "method": "dreambooth",
        "name": "subject",
        "output_dir": str(tmp_path / "runs"),
        "instance_token": "sks",
        "instance_prompt": "a sks square",
        "class_prompt": "a square",
        "num_class_images": 3,
        "model": {"base": str(model)},
        "data": {"path": str(folder), "batch_size": 2},
        "optimizer": {"lr": 1e-3},
        "train": {"max_steps": 2},
        "preview": {"steps": 2, "before_training": False},
    }
    return DreamBoothConfig.model_validate(base | extra)


def lora_db_config(tmp_path, model, folder, **extra) -> LoraConfig:
    base = {
        "method": "lora",
        "name": "concept",
        "output_dir": str(tmp_path / "runs"),
        "rank": 4,
        "model": {"base": str(model)},
        "data": {"path": str(folder), "batch_size": 2},
        "optimizer": {"lr": 1e-2},
        "train": {"max_steps": 2},
        "preview": {"steps": 2, "before_training": False},
        "dreambooth": {"class_prompt": "a square", "num_class_images": 2},
    }
    return LoraConfig.model_validate(base | extra)


def run_job(cfg):
    job = method_setup(cfg.method)(cfg, Accelerator(cpu=True))
    outputs = train(job, cfg, RunDir(f"{cfg.output_dir}/{cfg.name}"), EventBus(), Accelerator(cpu=True))
    return job, outputs


def _dtypes(path) -> set[str]:
    with safe_open(str(path), "pt") as fh:
        return {fh.get_slice(k).get_dtype() for k in fh.keys()}


@pytest.mark.parametrize(
    ("family", "dtype", "train_text_encoder"), [("sd1", "fp32", True), ("sd1", "fp16", False), ("sdxl", "fp32", True)]
)
def test_exported_checkpoint_loads_in_diffusers_with_the_trained_weights(
    tmp_path, tiny_checkpoint, image_folder, diffusers_pipelines, unet_output, family, dtype, train_text_encoder
):
    path = tiny_checkpoint(family)
    cfg = db_config(tmp_path, path, image_folder, train_text_encoder=train_text_encoder, save={"dtype": dtype})
    job, outputs = run_job(cfg)
    folder, file = outputs
    assert (folder.name, file.name) == ("subject", "subject.safetensors")
    assert _dtypes(file) == {"F16" if dtype == "fp16" else "F32"}  # save.dtype
    assert _dtypes(folder / "unet" / "diffusion_pytorch_model.safetensors") == _dtypes(file)

    tolerance = {"atol": 1e-2, "rtol": 1e-2} if dtype == "fp16" else {"atol": 1e-6, "rtol": 1e-5}
    trained = unet_output(job.model.unet)
    for pipe in diffusers_pipelines(folder, file, job.model):
        torch.testing.assert_close(unet_output(pipe.unet), trained, **tolerance)
        ids = job.model.tokenizers[0]("a sks square", return_tensors="pt", padding="max_length").input_ids
        with torch.no_grad():
            ours = job.model.text_encoders[0](ids).last_hidden_state
            theirs = pipe.text_encoder.float()(ids).last_hidden_state
        torch.testing.assert_close(theirs, ours, **tolerance)
    base = load_model(path)
    assert (trained - unet_output(base.unet)).abs().max() > 1e-3  # the UNet trained
    with torch.no_grad():
        moved = (job.model.text_encoders[0](ids).last_hidden_state - base.text_encoders[0](ids).last_hidden_state).abs()
    assert (moved.max() > 1e-4) == train_text_encoder  # the text encoder trains only on request
    assert all(torch.equal(a, b) for a, b in zip(job.model.vae.parameters(), base.vae.parameters(), strict=True))


def test_class_images_are_generated_once_per_missing_image_with_fixed_seeds(
    tmp_path, tiny_checkpoint, image_folder, monkeypatch
):
    rendered: list[int] = []
    real = dreambooth.generate

    def counting(model, prompts, seeds, settings):
        rendered.extend(seeds)
        return real(model, prompts, seeds, settings)

    monkeypatch.setattr(dreambooth, "generate", counting)
    path = tiny_checkpoint("sd1")
    cfg = db_config(tmp_path, path, image_folder)
    accelerator = Accelerator(cpu=True)
    job = dreambooth.setup(cfg, accelerator)
    folder = tmp_path / "runs" / "subject" / "class_images"  # the default class_data_dir
    names = [f"class-{i:05d}" for i in range(3)]
    assert job.prior.generated == 3 and rendered == [0, 1, 2]  # image i with seed i
    assert sorted(p.name for p in folder.iterdir()) == sorted([n + ".png" for n in names] + [n + ".txt" for n in names])
    assert (folder / "class-00000.txt").read_text() == "a square\n"
    first = {n: (folder / f"{n}.png").read_bytes() for n in names}
    assert len(set(first.values())) == 3  # different seeds, different images
    assert len(job.prior.images) == 3 and set(job.prior.images.captions) == {"a square"}

    again = dreambooth.setup(cfg, accelerator)  # a second run reuses them: nothing rendered
    assert again.prior.generated == 0 and rendered == [0, 1, 2]
    assert {n: (folder / f"{n}.png").read_bytes() for n in names} == first

    (folder / "class-00001.png").unlink()  # one lost, one more wanted, and one image of the user's own
    (image_folder / "0.png").rename(folder / "mine.png")
    more = dreambooth.setup(cfg.model_copy(update={"num_class_images": 5}), accelerator)
    assert more.prior.generated == 2 and rendered[3:] == [1, 3]  # only the missing ones, at free indices
    assert (folder / "class-00001.png").read_bytes() == first["class-00001"]  # deterministic: the same image

    with pytest.raises(DataError, match=r"class_data_dir: .* holds class images of 'a square' \(e\.g\. class-00000"):
        dreambooth.setup(cfg.model_copy(update={"class_prompt": "a circle"}), accelerator)  # made for another prompt

    elsewhere = tmp_path / "class-elsewhere"
    other = dreambooth.setup(cfg.model_copy(update={"class_data_dir": str(elsewhere)}), accelerator)
    assert other.prior.generated == 3
    assert {n: (elsewhere / f"{n}.png").read_bytes() for n in names} == first


@pytest.mark.parametrize("method", ["dreambooth", "lora"])
def test_prior_loss_is_instance_loss_plus_weighted_class_loss(tmp_path, tiny_checkpoint, image_folder, method):
    """prior_loss_weight 0 gives exactly the loss without prior preservation, and the loss is linear in the weight:
    loss(w) = instance loss + w x class loss. The same shared code serves DreamBooth and LoRA-DreamBooth."""
    path = tiny_checkpoint("sd1")
    if method == "dreambooth":
        with_prior = db_config(tmp_path, path, image_folder, prior_loss_weight=0.0)
        without = db_config(tmp_path, path, image_folder, prior_preservation=False)
    else:
        block = {"class_prompt": "a square", "prior_loss_weight": 0.0, "num_class_images": 2}
        with_prior = lora_db_config(tmp_path, path, image_folder, dreambooth=block)
        without = lora_db_config(tmp_path, path, image_folder, dreambooth=None)
    accelerator = Accelerator(cpu=True)
    job, plain = method_setup(method)(with_prior, accelerator), method_setup(method)(without, accelerator)
    assert plain.prior is None

    def loss(j) -> torch.Tensor:
        with torch.no_grad():
            return j.loss([2, 0], [sample_generator(7, k) for k in (4, 5)])

    at_zero = loss(job)
    torch.testing.assert_close(at_zero, loss(plain), rtol=1e-5, atol=1e-7)
    job.prior.weight = 1.0
    at_one = loss(job)
    job.prior.weight = 3.0
    at_three = loss(job)
    assert at_one - at_zero > 1e-6  # the class half counts
    torch.testing.assert_close(at_three - at_zero, 3 * (at_one - at_zero), rtol=1e-4, atol=1e-7)


def test_paired_weights_give_diffusers_loss():
    """mean(w * l) over [instance, class] == mean(instance) + weight * mean(class) (train_dreambooth.py)."""
    losses = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0])
    weights = paired_weights(3, 2, 0.5)
    assert float((weights * losses).mean()) == pytest.approx(2.0 + 0.5 * 15.0)


def test_lora_with_dreambooth_block_trains_and_exports(tmp_path, tiny_checkpoint, image_folder):
    from sdtune.formats.lora_files import detect_lora_layout

    job, outputs = run_job(lora_db_config(tmp_path, tiny_checkpoint("sd1"), image_folder))
    assert [p.name for p in outputs] == ["concept.safetensors"]
    with safe_open(str(outputs[0]), "pt") as fh:
        assert detect_lora_layout(fh.keys()) == "kohya" and fh.metadata()["ss_steps"] == "2"
        assert any(float(fh.get_tensor(k).abs().max()) > 0 for k in fh.keys() if "lora_up" in k)  # B moved off 0
    folder = tmp_path / "runs" / "concept" / "class_images"
    assert job.prior.generated == 2 and sorted(p.name for p in folder.glob("*.png")) == [
        "class-00000.png",
        "class-00001.png",
    ]
    assert isinstance(job, lora.LoraJob)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"class_prompt": "a sks square"}, r"class_prompt: contains the instance token 'sks' .*e\.g\. a square"),
        ({"class_prompt": None}, "class_prompt: prior_preservation needs the class of the subject"),
        ({"instance_prompt": "a square"}, "instance_prompt: must contain instance_token 'sks'"),
        ({"instance_token": "two words"}, "instance_token"),
        ({"data": {"path": "d", "template": "subject"}}, "data.template: DreamBooth trains every instance image"),
        ({"data": {"path": "d", "shuffle_tags": True}}, "data.shuffle_tags: applies to captions"),
        ({"optimizer": {"lr": "1e-4:10, 1e-5"}, "unet_lr": 1e-4}, "optimizer.lr: a rate:step schedule string"),
    ],
)
def test_bad_dreambooth_settings_are_config_errors(tmp_path, extra, message):
    with pytest.raises(ValidationError, match=message):
        db_config(tmp_path, "m.safetensors", "d", **extra)


def test_config_errors_are_one_line_naming_the_field(tmp_path):
    path = tmp_path / "db.yaml"
    raw = {"method": "dreambooth", "name": "x", "instance_token": "sks", "instance_prompt": "a sks dog"}
    path.write_text(yaml.safe_dump(raw | {"class_prompt": "a sks dog", "data": {"path": "d"}}))
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    assert str(err.value) == (
        f"{path}: class_prompt: contains the instance token 'sks' (got 'a sks dog'); describe the class "
        "without it, e.g. a dog"
    )
    lora_raw = {"method": "lora", "name": "x", "token": "<me>", "data": {"path": "d"}}
    path.write_text(yaml.safe_dump(lora_raw | {"dreambooth": {"class_prompt": "a <me> dog"}}))
    with pytest.raises(ConfigError, match=r"dreambooth\.class_prompt: contains the instance token '<me>'"):
        load_train_config(path)
    path.write_text(yaml.safe_dump(lora_raw | {"dreambooth": {"prior_loss_weight": 1.0}}))
    with pytest.raises(ConfigError, match=r"dreambooth\.class_prompt"):  # the block needs its class prompt
        load_train_config(path)


def test_instance_prompt_from_captions_needs_the_token_in_them(tmp_path, tiny_checkpoint, image_folder):
    path, accelerator = tiny_checkpoint("sd1"), Accelerator(cpu=True)
    cfg = db_config(tmp_path, path, image_folder, instance_prompt="[filewords]", prior_preservation=False)
    with pytest.raises(DataError, match=r"instance_prompt: the caption of .*0\.png \('tag0, red, square'\) does not "):
        dreambooth.setup(cfg, accelerator)
    job = dreambooth.setup(cfg.model_copy(update={"instance_prompt": "a sks thing, [filewords]"}), accelerator)
    assert job.prompt(1, random.Random(0)) == "a sks thing, tag1, red, square"


@pytest.mark.parametrize("variant", ["dreambooth", "dreambooth-without-prior", "lora-dreambooth"])
def test_fewer_instance_images_than_the_batch_is_an_error_before_any_class_image(
    tmp_path, tiny_checkpoint, image_folder, variant
):
    path = tiny_checkpoint("sd1")
    data = {"path": str(image_folder), "batch_size": 5}
    if variant == "lora-dreambooth":
        cfg = lora_db_config(tmp_path, path, image_folder, data=data)
    else:
        cfg = db_config(tmp_path, path, image_folder, data=data, prior_preservation=variant == "dreambooth")
    with pytest.raises(DataError, match=r"data\.batch_size: 5 is more than the 4 instance images in .*; set "):
        method_setup(cfg.method)(cfg, Accelerator(cpu=True))
    assert not list(tmp_path.rglob("class-*.png"))  # checked before the base model renders anything
