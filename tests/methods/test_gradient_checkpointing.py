"""``train.gradient_checkpointing`` in every method that backpropagates through a network (not only the full-weight
ones): the networks recompute their activations in the backward pass, and the trained weights are the same."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from tests.methods.method_cases import case_config

from sdtune.core.events import EventBus
from sdtune.methods import setup_function as method_setup  # (pytest reserves the name setup_function)
from sdtune.train.loop import train
from sdtune.train.rundir import RunDir

CHECKPOINTING_CASES = ["lora", "lora_text_encoder", "pivotal", "textual_inversion", "hypernetwork"]
THROUGH_TEXT = {"lora_text_encoder", "pivotal", "textual_inversion"}


def _config(tmp_path, base, folder, case: str, name: str, checkpointing: bool):
    return case_config(tmp_path, base, folder, case, name=name, gradient_checkpointing=checkpointing)


def _run_counting(cfg):
    """Train ``cfg``; count forward calls of the UNet's last resnet and of the first text-encoder layer's norm."""
    job = method_setup(cfg.method)(cfg, Accelerator(cpu=True))
    calls = {"unet": 0, "text": 0}
    resnet = job.model.unet.up_blocks[-1].resnets[-1]  # after the adapters: its backward runs
    encoder_layer = next(m for m in job.model.text_encoders[0].modules() if type(m).__name__ == "CLIPEncoderLayer")
    layer = encoder_layer.layer_norm1  # transformers recomputes the layer's forward, not its __call__ (hooks)
    # pre-hooks: a recomputation stops early once it has what the backward needs, so it may never reach the end
    resnet.register_forward_pre_hook(lambda *a: calls.__setitem__("unet", calls["unet"] + 1))
    layer.register_forward_pre_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1))
    start = _trained(job)
    train(job, cfg, RunDir(f"{cfg.output_dir}/{cfg.name}"), EventBus(), Accelerator(cpu=True))
    return job, calls, start


def _trained(job) -> dict[str, torch.Tensor]:
    return {k: v for k, v in job.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("case", CHECKPOINTING_CASES)
def test_checkpointing_recomputes_activations_and_trains_the_same_weights(
    tmp_path, tiny_checkpoint, image_folder, case
):
    base = tiny_checkpoint("sd1")
    plain, plain_calls, start = _run_counting(_config(tmp_path, base, image_folder, case, "plain", False))
    ckpt, ckpt_calls, _ = _run_counting(_config(tmp_path, base, image_folder, case, "ckpt", True))

    assert ckpt.model.unet.is_gradient_checkpointing and not plain.model.unet.is_gradient_checkpointing
    # the backward pass runs the UNet's blocks a second time (recomputation), once per training forward
    assert ckpt_calls["unet"] > plain_calls["unet"], (ckpt_calls, plain_calls)
    if case in THROUGH_TEXT:  # and the text encoder's layers, where the loss reaches through it
        assert ckpt_calls["text"] > plain_calls["text"], (ckpt_calls, plain_calls)
    a, b = _trained(plain), _trained(ckpt)
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    assert any(not torch.equal(start[k], a[k]) for k in a), "the steps must change the weights, or equality is empty"
