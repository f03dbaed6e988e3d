"""Prior-prediction regularisation (``preservation:``, :mod:`sdtune.train.preservation`): the target of a
regularisation sample is the frozen base model's prediction, so a model that still equals the base adds exactly
nothing; once it has moved, the term is the run's loss against the base prediction, recomputed here independently;
training with it keeps the base prediction closer; the trigger-free samples replay their training samples' noise;
the frozen copy of a full-weight method stays the base; bad input fails before training in one line."""

from __future__ import annotations

import pytest
import torch
import yaml
from accelerate import Accelerator
from tests.methods.method_cases import case_config

from image_folders import write_image_folder
from sdtune.config import load_train_config
from sdtune.core.errors import ConfigError, DataError
from sdtune.core.events import EventBus, StepEnd
from sdtune.methods import setup_function as method_setup  # (pytest reserves the name setup_function)
from sdtune.methods.estimate import estimate
from sdtune.train.loop import sample_generator, train
from sdtune.train.preservation import adapters_off, remove_trigger
from sdtune.train.rundir import RunDir

REG = {"prompts": ["tag0, red, square", "a blue thing"], "num_images": 3}


def _config(tmp_path, base, folder, case, preservation, **train_fields):
    cfg = case_config(tmp_path, base, folder, case, **train_fields)
    raw = yaml.safe_load((tmp_path / f"{case}.yaml").read_text())
    raw["preservation"] = preservation
    (tmp_path / f"{case}.yaml").write_text(yaml.safe_dump(raw))
    return load_train_config(tmp_path / f"{case}.yaml") if cfg else None


def _job(cfg):
    return method_setup(cfg.method)(cfg, Accelerator(cpu=True))


def _gens(n, offset=0):
    return [sample_generator(7, offset + i) for i in range(n)]


@pytest.mark.parametrize(
    ("prompt", "trigger", "expected"),
    [
        ("a sks dog", "sks", "a dog"),
        ("sks, a dog, sks", "sks", "a dog"),
        ("a <x> <x>_1 <x>_2 cat", "<x>", "a cat"),  # a pivotal token written out in full
        ("asks sks", "sks", "asks"),  # only whole words
        ("a red star on black", "star", "a red on black"),
    ],
)
def test_remove_trigger(prompt, trigger, expected):
    assert remove_trigger(prompt, trigger) == expected


@pytest.mark.parametrize("case", ["lora", "loha", "lokr", "oft", "boft"])
def test_adapters_off_gives_the_base_prediction_and_restores_adapters_and_grads(
    tmp_path, tiny_checkpoint, image_folder, unet_output, case
):
    from sdtune.models.loading import load_model

    base = tiny_checkpoint("sd1")
    before = unet_output(load_model(base).unet)
    job = _job(case_config(tmp_path, base, image_folder, case))
    with torch.no_grad():
        for p in (p for g in job.trainable_parameters() for p in g["params"]):
            p.add_(0.05 * torch.randn_like(p))
    grads = [p.requires_grad for p in job.model.unet.parameters()]
    adapted = unet_output(job.model.unet)
    assert (adapted - before).abs().max() > 1e-3
    with adapters_off([job.model.unet]):
        torch.testing.assert_close(unet_output(job.model.unet), before, atol=1e-5, rtol=0)
    torch.testing.assert_close(unet_output(job.model.unet), adapted, atol=0, rtol=0)
    assert [p.requires_grad for p in job.model.unet.parameters()] == grads


@pytest.mark.parametrize("case", ["lora", "lora_text_encoder", "finetune", "dreambooth"])
def test_the_term_is_zero_on_the_base_and_the_loss_against_the_base_prediction_once_moved(
    tmp_path, tiny_checkpoint, image_folder, case
):
    base = tiny_checkpoint("sd1")
    reg = dict(REG, images=str(tmp_path / "reg"), weight=2.0, ratio=1.5)
    cfg = _config(tmp_path, base, image_folder, case, reg)
    job = _job(cfg)
    assert job.preservation.rendered == 3 and sorted(p.name for p in (tmp_path / "reg").glob("*.png")) == [
        "reg-00000.png", "reg-00001.png", "reg-00002.png",
    ]  # fmt: skip
    without = _job(case_config(tmp_path, base, image_folder, case, name="without"))

    def losses(j):
        with torch.no_grad():
            return float(j.loss([0, 1], _gens(2)))

    # adapters start at B = 0 and a frozen copy equals the live weights: the model is the base, the term is 0
    assert losses(job) == pytest.approx(losses(without), abs=1e-7)

    trained = [p for g in job.trainable_parameters() for p in g["params"]]
    with torch.no_grad():
        for p in trained:
            p.add_(0.02 * torch.randn_like(p))
    extra = losses(job) - losses(_moved_like(without, job))
    assert extra > 1e-6  # the moved model no longer predicts what the base does

    # the same term recomputed outside the job: the base prediction by hand, the loss by the public recipe loss
    from sdtune.train.preservation import derived_generator
    from sdtune.train.recipe import recipe_loss

    gens = _gens(2)
    for g in gens:  # what the job draws before the loss (sample_rng, flips) from each training generator
        from sdtune.train.loop import sample_rng

        sample_rng(g)
    count = 3  # ceil(1.5 x 2)
    reg_gens = [derived_generator(gens[k % 2], k // 2) for k in range(count)]
    rows = [int(torch.randint(len(job.preservation.images), (1,), generator=g)) for g in reg_gens]
    latents = job.preservation.images.latents(rows, reg_gens)
    prompts = [job.preservation.images.captions[r] for r in rows]
    from sdtune.models.text_encoding import encode_prompts

    base_unet = job.preservation.base.unet
    with torch.no_grad():
        cond = encode_prompts(job.model, prompts)
        base_cond = job.preservation.base.encode(prompts)

        def base_target(noisy, t):
            if base_unet is job.model.unet:
                with adapters_off(list(job.components.values())):
                    return base_unet(noisy, t, base_cond.context).sample
            return base_unet(noisy, t, base_cond.context).sample

        by_hand = 2.0 * float(recipe_loss(job, latents, cond, reg_gens, target_fn=base_target))
    assert extra == pytest.approx(by_hand, rel=1e-3)  # one pass vs two: float rounding of the difference


def _moved_like(plain, job):
    """``plain`` (the same run without preservation) with ``job``'s trained weights."""
    ours = [p for g in job.trainable_parameters() for p in g["params"]]
    theirs = [p for g in plain.trainable_parameters() for p in g["params"]]
    with torch.no_grad():
        for a, b in zip(theirs, ours, strict=True):
            a.copy_(b)
    return plain


def test_training_with_it_keeps_the_base_prediction_closer(tmp_path, tiny_checkpoint, image_folder, unet_output):
    base = tiny_checkpoint("sd1")
    reg = dict(REG, images=str(tmp_path / "reg"), weight=4.0)
    drifts = {}
    for name, preservation in (("kept", reg), ("free", None)):
        cfg = case_config(tmp_path, base, image_folder, "lora", name=name, max_steps=12)
        raw = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
        raw["optimizer"] = {"lr": 3e-2}
        if preservation:
            raw["preservation"] = preservation
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        cfg = load_train_config(tmp_path / f"{name}.yaml")
        job = _job(cfg)
        train(job, cfg, RunDir(tmp_path / "runs" / name), EventBus(), Accelerator(cpu=True))
        with adapters_off([job.model.unet]):
            base_out = unet_output(job.model.unet)
        drifts[name] = float((unet_output(job.model.unet) - base_out).pow(2).mean())
    assert drifts["kept"] < 0.6 * drifts["free"], drifts


def test_trigger_free_samples_replay_their_training_samples_noise(tmp_path, tiny_checkpoint):
    folder = tmp_path / "images"
    write_image_folder(folder)
    for i in range(4):
        (folder / f"{i}.txt").write_text(f"a zzq thing {i}" if i < 3 else "no trigger here")
    base = tiny_checkpoint("sd1")
    cfg = _config(tmp_path, base, folder, "lora", {"trigger": "zzq", "trigger_weight": 3.0})
    job = _job(cfg)
    assert job.preservation.images is None
    with torch.no_grad():
        for p in job.params["unet"]:
            p.add_(0.05 * torch.randn_like(p))
    seen = []
    original = job.preservation.base.target

    def spy(cond):
        predict = original(cond)

        def wrapped(noisy, t):
            seen.append((noisy.clone(), t.clone()))
            return predict(noisy, t)

        return wrapped

    job.preservation.base.target = spy
    from sdtune.train import diffusion

    recorded = []
    real = diffusion.denoising_loss

    def record(model, scheduler, latents, cond, generators, **kw):
        g = [torch.Generator().set_state(x.get_state()) for x in generators]
        recorded.append((latents.clone(), [int(torch.randint(1000, (1,), generator=x)) for x in g], kw))
        return real(model, scheduler, latents, cond, generators, **kw)

    import sdtune.train.recipe as recipe

    recipe.denoising_loss, saved = record, recipe.denoising_loss
    try:
        with torch.no_grad():
            job.loss([0, 3], _gens(2))
    finally:
        recipe.denoising_loss = saved
    ((latents, draws, kw),) = recorded  # one pass: the 2 training samples, then the trigger-free twin of the first
    assert latents.shape[0] == 3 and kw["target_rows"].tolist() == [2]  # "no trigger here" gets no twin
    assert len(seen) == 1 and seen[0][0].shape[0] == 1  # the base model predicts the twin only
    torch.testing.assert_close(latents[2], latents[0], atol=0, rtol=0)
    assert draws[2] == draws[0]  # the same generator state: the same noise and timestep
    # mean over 3 of w_i l_i = mean(training losses) + trigger_weight (3) x the twin's loss
    assert kw["weights"].tolist() == [1.5, 1.5, 9.0]


def test_the_frozen_copy_stays_the_base_while_the_model_trains(tmp_path, tiny_checkpoint, image_folder):
    cfg = _config(tmp_path, tiny_checkpoint("sd1"), image_folder, "finetune", dict(REG), max_steps=2)
    job = _job(cfg)
    copy = job.preservation.base.unet
    assert copy is not job.model.unet and not any(p.requires_grad for p in copy.parameters())
    start = {k: v.clone() for k, v in copy.state_dict().items()}
    live = {k: v.clone() for k, v in job.model.unet.state_dict().items()}
    train(job, cfg, RunDir(tmp_path / "runs" / "finetune"), EventBus(), Accelerator(cpu=True))
    assert all(torch.equal(v, copy.state_dict()[k]) for k, v in start.items())
    assert all(torch.equal(v, live[k]) for k, v in start.items())  # the copy was the base
    assert any(not torch.equal(v, job.model.unet.state_dict()[k]) for k, v in live.items())  # the model trained


def test_rendered_images_are_reused_by_the_next_run(tmp_path, tiny_checkpoint, image_folder):
    base = tiny_checkpoint("sd1")
    reg = dict(REG, images=str(tmp_path / "reg"))
    assert _job(_config(tmp_path, base, image_folder, "lora", reg)).preservation.rendered == 3
    again = _job(_config(tmp_path, base, image_folder, "lora", reg))
    assert again.preservation.rendered == 0 and len(again.preservation.images) == 3
    assert sorted(again.preservation.images.captions) == sorted(
        ["tag0, red, square", "a blue thing", "tag0, red, square"]
    )


def test_estimate_counts_the_frozen_copy_of_a_full_weight_method(tmp_path, tiny_checkpoint, image_folder):
    base = tiny_checkpoint("sd1")
    plain = estimate(case_config(tmp_path, base, image_folder, "finetune", name="p"), device="cpu", precision="bf16")
    kept = estimate(_config(tmp_path, base, image_folder, "finetune", dict(REG)), device="cpu", precision="bf16")
    unet_params = sum(p.numel() for p in method_setup("finetune")(
        case_config(tmp_path, base, image_folder, "finetune", name="q"), Accelerator(cpu=True)
    ).model.unet.parameters())  # fmt: skip
    te = kept.frozen_bytes["base copy"] - 2 * unet_params  # the case trains the text encoder too
    assert kept.frozen_bytes["base copy"] >= 2 * unet_params and te > 0
    assert "base copy" not in plain.frozen_bytes
    # batch 2 + 2 regularisation samples: forward and both backward passes over twice the samples, plus the
    # base model's forward pass over the 2 extra ones (3 passes per sample without checkpointing)
    assert kept.flops_per_step == pytest.approx(plain.flops_per_step * (3 * 2 + 1) / 3)
    assert kept.activation_bytes == pytest.approx(2 * plain.activation_bytes, rel=1e-6)
    lora = estimate(_config(tmp_path, base, image_folder, "lora", dict(REG)), device="cpu", precision="bf16")
    assert "base copy" not in lora.frozen_bytes  # adapters switched off: no copy


@pytest.mark.parametrize(
    ("preservation", "error", "match"),
    [
        ({}, ConfigError, "preservation: give images"),
        ({"prompts": ["x"], "weight": -1}, ConfigError, "preservation.weight"),
        ({"trigger": "nowhere"}, DataError, "preservation.trigger: 'nowhere' occurs in none of the 4 training"),
        ({"images": "MISSING"}, DataError, "preservation.images: .* is not a folder"),
        ({"images": "EMPTY"}, DataError, "preservation.images: .*no images found"),
    ],
)
def test_bad_input_is_one_line_before_training(tmp_path, tiny_checkpoint, image_folder, preservation, error, match):
    (tmp_path / "empty").mkdir()
    if preservation.get("images") == "EMPTY":
        preservation = {"images": str(tmp_path / "empty")}
    elif preservation.get("images") == "MISSING":
        preservation = {"images": str(tmp_path / "missing")}
    with pytest.raises(error, match=match) as info:
        _job(_config(tmp_path, tiny_checkpoint("sd1"), image_folder, "lora", preservation))
    assert "\n" not in str(info.value)


def test_images_rendered_from_other_prompts_are_refused(tmp_path, tiny_checkpoint, image_folder):
    base = tiny_checkpoint("sd1")
    reg = dict(REG, images=str(tmp_path / "reg"))
    _job(_config(tmp_path, base, image_folder, "lora", reg))
    with pytest.raises(DataError, match="not among preservation.prompts"):
        _job(_config(tmp_path, base, image_folder, "lora", dict(reg, prompts=["something else"])))


def test_regularisation_prompts_are_cached_before_step_one_and_nothing_parked_is_called(
    tmp_path, tiny_checkpoint, image_folder
):
    from sdtune.train.offload import park_frozen, parkable

    folder = tmp_path / "images"
    write_image_folder(folder)
    for i in range(4):
        (folder / f"{i}.txt").write_text(f"a zzq thing {i}")
    reg = dict(REG, images=str(tmp_path / "reg"), trigger="zzq")
    cfg = _config(tmp_path, tiny_checkpoint("sd1"), folder, "lora", reg, max_steps=3)
    job = _job(cfg)
    assert {"text_encoder", "vae"} <= set(parkable(job))
    parking = park_frozen(job, torch.device("cpu"))
    filled = job.text_cache.encoded
    assert {"tag0, red, square", "a blue thing", "a thing 0", "a thing 3"} <= set(job.text_cache.store)
    parking.release()
    train(job, cfg, RunDir(tmp_path / "runs" / "lora"), EventBus(), Accelerator(cpu=True))  # the guard would raise
    assert job.text_cache.encoded == filled  # every regularisation and trigger-free prompt came from the cache


def test_a_stopped_and_resumed_run_equals_the_uninterrupted_one(tmp_path, tiny_checkpoint):
    from safetensors.torch import load_file

    folder = tmp_path / "images"
    write_image_folder(folder)
    for i in range(4):
        (folder / f"{i}.txt").write_text(f"a zzq thing {i}")
    base = tiny_checkpoint("sd1")
    reg = dict(REG, images=str(tmp_path / "reg"), trigger="zzq", ratio=0.5)

    def run(name, stop_at=None):
        cfg = case_config(tmp_path, base, folder, "lora", name=name, max_steps=4)
        raw = yaml.safe_load((tmp_path / f"{name}.yaml").read_text()) | {"preservation": reg}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        cfg = load_train_config(tmp_path / f"{name}.yaml")
        rundir = RunDir(tmp_path / "runs" / name)
        bus = EventBus()
        if stop_at:
            bus.subscribe(lambda e: rundir.request_stop() if isinstance(e, StepEnd) and e.step == stop_at else None)
        train(_job(cfg), cfg, rundir, bus, Accelerator(cpu=True))
        return rundir

    run("whole")
    stopped = run("stopped", stop_at=2)
    assert [c.step for c in stopped.list_checkpoints()] == [2]
    run("stopped")  # resumes from step 2
    whole = load_file(tmp_path / "runs" / "whole" / "checkpoints" / "step-4" / "trainable.safetensors")
    resumed = load_file(stopped.checkpoints / "step-4" / "trainable.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(v, resumed[k]) for k, v in whole.items())  # bit-exact


def test_unconditional_trains_that_fraction_of_regularisation_samples_on_the_empty_prompt(
    tmp_path, tiny_checkpoint, image_folder
):
    reg = dict(REG, images=str(tmp_path / "reg"), ratio=8.0, unconditional=0.25)
    job = _job(_config(tmp_path, tiny_checkpoint("sd1"), image_folder, "lora", reg))
    assert "" in job.preservation.prompts([])  # cached before step 1 with the captions
    asked = []
    job.preservation.base.encode, encode = (
        (lambda prompts: asked.append(list(prompts)) or encode(prompts)),
        (job.preservation.base.encode),
    )
    with torch.no_grad():
        for start in range(0, 40, 2):
            job.loss([0, 1], _gens(2, start))
    prompts = [p for batch in asked for p in batch]
    assert len(prompts) == 20 * 16  # ceil(8 x 2) regularisation samples per batch
    share = prompts.count("") / len(prompts)
    assert 0.18 < share < 0.32, share
    assert set(prompts) - {""} <= set(job.preservation.images.captions)
