"""Once latents and prompt encodings are cached, the VAE and the frozen text encoders are parked
(:mod:`sdtune.train.offload`): which modules each method parks, that the text cache holds every prompt before the
first step, and that training steps never call a parked module (on a CPU nothing moves, but a parked module called
outside ``in_use`` raises, so the path that would break on a GPU fails here)."""

from __future__ import annotations

import random

import pytest
import torch
from accelerate import Accelerator
from tests.methods.method_cases import case_config

from sdtune.core.errors import TrainingError
from sdtune.core.events import EventBus
from sdtune.methods import setup_function as method_setup  # (pytest reserves the name setup_function)
from sdtune.train.loop import train
from sdtune.train.offload import Parking, park_frozen, parkable
from sdtune.train.rundir import RunDir


def _job(cfg):
    return method_setup(cfg.method)(cfg, Accelerator(cpu=True))


def test_a_parked_module_called_outside_in_use_raises_and_inside_runs():
    module = torch.nn.Linear(3, 2)
    parking = Parking({"vae": module}, torch.device("cpu"))
    assert not parking.moves  # a CPU run: nothing to move, only the guard
    with pytest.raises(TrainingError, match="parked vae"):
        module(torch.ones(1, 3))
    with parking.in_use(), parking.in_use():  # nested: still in use after the inner block
        module(torch.ones(1, 3))
        pass
    with pytest.raises(TrainingError):
        module(torch.ones(1, 3))
    parking.release()
    module(torch.ones(1, 3))  # released: an ordinary module again


# (case, data fields) -> what is parked
PARKED = [
    ("lora", {}, {"text_encoder", "vae"}),
    ("lora", {"shuffle_tags": True}, {"vae"}),  # prompts vary per use: the text encoder runs every step
    ("lora", {"cache_latents": False}, {"text_encoder"}),  # images encoded by the VAE every step
    ("lora_text_encoder", {}, {"vae"}),  # a trained text encoder is never parked
    ("pivotal", {}, {"vae"}),
    ("textual_inversion", {}, {"vae"}),
    ("hypernetwork", {}, {"text_encoder", "vae"}),
    ("dreambooth", {}, {"text_encoder", "vae"}),
    ("finetune", {}, {"vae"}),  # the case trains the text encoder
]


@pytest.mark.parametrize(
    ("case", "data", "parked"), PARKED, ids=[f"{c}-{'-'.join(d) or 'plain'}" for c, d, _ in PARKED]
)
def test_what_each_method_parks(tmp_path, tiny_checkpoint, image_folder, case, data, parked):
    cfg = case_config(tmp_path, tiny_checkpoint("sd1"), image_folder, case)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update=data)})
    assert set(parkable(_job(cfg))) == parked


@pytest.mark.parametrize("case", ["lora", "hypernetwork", "dreambooth"])
def test_every_prompt_is_cached_before_the_first_step_and_steps_never_call_parked_modules(
    tmp_path, tiny_checkpoint, image_folder, case
):
    cfg = case_config(
        tmp_path,
        tiny_checkpoint("sd1"),
        image_folder,
        case,
        max_steps=4,
        validation_every_n_steps=2,
        preview={"steps": 2, "every_n_steps": 2, "before_training": True},
    )
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"validation_split": 0.5})})
    job = _job(cfg)
    assert {"text_encoder", "vae"} <= set(parkable(job))
    calls = {"text_encoder": 0, "vae": 0}
    job.model.text_encoders[0].register_forward_pre_hook(
        lambda *a: calls.__setitem__("text_encoder", 1 + calls["text_encoder"])
    )
    job.model.vae.decoder.register_forward_pre_hook(lambda *a: calls.__setitem__("vae", 1 + calls["vae"]))
    parking = park_frozen(job, torch.device("cpu"))
    filled = job.text_cache.encoded
    prompts = {job.prompt(i, random.Random(0), job.data.captions) for i in range(len(job.data))}
    assert filled >= len(prompts) and prompts <= set(job.text_cache.store)
    parking.release()

    # the real loop parks them itself: previews (before, at steps 2 and 4) and validation run, and no training
    # step calls a parked module (the guard would raise); the cache encodes nothing after the fill
    run = RunDir(f"{cfg.output_dir}/{cfg.name}")
    text_calls_before = calls["text_encoder"]
    train(job, cfg, run, EventBus(), Accelerator(cpu=True))
    assert job.text_cache.encoded == filled
    assert calls["vae"] >= 3  # previews decoded: before training, step 2, the end
    assert calls["text_encoder"] > text_calls_before  # previews encoded their prompts inside in_use
    assert (run.samples / "step-2").is_dir()
    # and the modules are ordinary again after the run
    job.model.vae.decoder(torch.zeros(1, job.model.vae.config.latent_channels, 4, 4))
