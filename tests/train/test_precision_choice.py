"""Which precision a run computes in (``train.mixed_precision``), and fp16's dynamic loss scaling in the loop."""

from __future__ import annotations

import json

import pytest
import torch
from tests.train.test_loop import LinearJob, config

from sdtune.core.errors import ConfigError
from sdtune.core.events import EventBus
from sdtune.train import precision
from sdtune.train.loop import train
from sdtune.train.precision import CPU_BF16_MIN_UNET, resolve_precision, unet_parameters
from sdtune.train.rundir import RunDir


@pytest.mark.parametrize("bf16_units", [True, False])
def test_fp16_on_a_cpu_is_refused_in_one_line_naming_what_works(monkeypatch, bf16_units):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: bf16_units)
    with pytest.raises(ConfigError, match="train.mixed_precision: fp16 needs a CUDA GPU") as exc:
        resolve_precision("fp16", "cpu")
    assert ("use bf16" if bf16_units else "use no") in str(exc.value) and "\n" not in str(exc.value)


def test_bf16_on_a_gpu_without_bf16_names_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    with pytest.raises(ConfigError, match="Tesla T4 has no bf16 arithmetic; use fp16"):
        resolve_precision("bf16", "cuda")
    assert resolve_precision("auto", "cuda") == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda") == "bf16" and resolve_precision("fp16", "cuda") == "fp16"


def test_auto_on_a_cpu_picks_bf16_only_with_bf16_units_and_a_real_size_unet(monkeypatch):
    small = unet_parameters("builtin")
    assert 0 < small < CPU_BF16_MIN_UNET
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", "cpu", base="builtin") == "no"  # narrow: casts cost more than bf16 saves
    monkeypatch.setattr(precision, "unet_parameters", lambda base: 860_000_000)
    assert resolve_precision("auto", "cpu", base="any") == "bf16"
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", "cpu", base="any") == "no"
    assert resolve_precision("no", "cpu") == "no" and resolve_precision("bf16", "cpu") == "bf16"


class OverflowJob(LinearJob):
    """At step ``overflow_at`` the gradient is finite in fp32 but overflows once fp16's loss scale multiplies it."""

    def __init__(self, overflow_at: int) -> None:
        super().__init__()
        self.overflow_at, self.history = overflow_at, {}

    def loss(self, indices, generators):
        loss = super().loss(indices, generators)
        if self.steps + 1 == self.overflow_at:
            loss = loss + (self.w * 1e34).sum()  # d/dw = 1e34; x 65536 > fp32 max
        return loss

    def after_step(self, step):
        super().after_step(step)
        self.history[step] = self.w.detach().clone()


def _rows(run):
    return [json.loads(line) for line in (run.root / "metrics.jsonl").read_text().splitlines()]


def test_fp16_overflow_skips_the_step_halves_the_scale_and_goes_on(tmp_path, accelerator_in):
    job, run = OverflowJob(overflow_at=5), RunDir(tmp_path / "t")
    train(job, config(tmp_path), run, EventBus(), accelerator_in("fp16"))
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, 13))  # not the NaN stop
    torch.testing.assert_close(job.history[5], job.history[4], rtol=0, atol=0)  # the overflowing update was skipped
    assert not torch.equal(job.history[6], job.history[5])  # and training went on
    assert rows[3]["loss_scale"] == 65536.0 and rows[4]["loss_scale"] == 32768.0
    assert rows[3]["skipped_steps"] == 0 and rows[-1]["skipped_steps"] == 1
    log = run.events_path.read_text()
    assert "step 5: fp16 gradients overflowed at loss scale 65536; update skipped, scale now 32768" in log


def test_fp16_scaling_without_overflow_gives_the_full_precision_updates(tmp_path, accelerator_in):
    """The scale is a power of two, so scaling and unscaling are exact: the same weights as an unscaled run."""
    scaled, plain = OverflowJob(overflow_at=0), LinearJob()
    a, b = RunDir(tmp_path / "a" / "t"), RunDir(tmp_path / "b" / "t")
    train(scaled, config(tmp_path / "a", clip_grad="norm"), a, EventBus(), accelerator_in("fp16"))
    train(plain, config(tmp_path / "b", clip_grad="norm"), b, EventBus(), accelerator_in("no"))
    torch.testing.assert_close(scaled.w.detach(), plain.w.detach(), rtol=0, atol=0)
    assert _rows(a)[-1]["loss_scale"] == 65536.0 and "loss_scale" not in _rows(b)[-1]


def test_fp16_resume_restores_the_loss_scale_exactly(tmp_path, accelerator_in):
    def fp16():
        return accelerator_in("fp16")

    whole = OverflowJob(overflow_at=2)
    train(whole, config(tmp_path / "whole", save_every=4), RunDir(tmp_path / "whole" / "t"), EventBus(), fp16())
    run = RunDir(tmp_path / "part" / "t")
    train(OverflowJob(overflow_at=2), config(tmp_path / "part", max_steps=8, save_every=4), run, EventBus(), fp16())
    state = json.loads((run.checkpoints / "step-8" / "state.json").read_text())
    assert state["loss_scaler"]["scaler"]["scale"] == 32768.0 and state["loss_scaler"]["skipped"] == 1
    second = OverflowJob(overflow_at=0)  # a fresh process resumes past the overflow
    train(second, config(tmp_path / "part", save_every=4), run, EventBus(), fp16())
    torch.testing.assert_close(second.w.detach(), whole.w.detach(), rtol=0, atol=0)
    assert _rows(run)[-1]["loss_scale"] == 32768.0 and _rows(run)[-1]["skipped_steps"] == 1


def test_full_precision_rows_carry_no_loss_scale(tmp_path, accelerator_in):
    run = RunDir(tmp_path / "t")
    train(LinearJob(), config(tmp_path, max_steps=3), run, EventBus(), accelerator_in("no"))
    assert all("loss_scale" not in r for r in _rows(run))
    assert "loss_scaler" not in json.loads((run.checkpoints / "step-3" / "state.json").read_text())
