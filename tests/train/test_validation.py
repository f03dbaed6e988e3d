"""The loop's validation loss: computed every N steps by jobs that have one, written to metrics.jsonl, emitted."""

from __future__ import annotations

import json

import torch
from accelerate import Accelerator
from test_loop import LinearJob, config

from sdtune.core.events import EventBus, ValidationLoss
from sdtune.train.diffusion import fixed_validation_loss, validation_timesteps
from sdtune.train.loop import train
from sdtune.train.rundir import RunDir


class ValidatedJob(LinearJob):
    """LinearJob with a held-out set: the noiseless loss at two points."""

    def __init__(self, available: bool = True) -> None:
        super().__init__()
        self.available, self.validations = available, 0

    def validation_loss(self):
        if not self.available:
            return None
        self.validations += 1
        x = torch.tensor([0.5, -0.5])
        with torch.no_grad():
            return float(((self.w[0] * x + self.w[1] - (3 * x + 1)) ** 2).mean())


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_validation_loss_every_n_steps_in_metrics_and_events(tmp_path):
    job, bus, seen = ValidatedJob(), EventBus(), []
    bus.subscribe(seen.append)
    train(
        job,
        config(tmp_path, max_steps=12, validation_every_n_steps=4),
        RunDir(tmp_path / "t"),
        bus,
        Accelerator(cpu=True),
    )
    rows = _rows(tmp_path / "t" / "metrics.jsonl")
    with_val = [r["step"] for r in rows if "validation_loss" in r]
    assert with_val == [4, 8, 12] and job.validations == 3
    events = [e for e in seen if isinstance(e, ValidationLoss)]
    assert [e.step for e in events] == [4, 8, 12]
    assert [e.loss for e in events] == [r["validation_loss"] for r in rows if "validation_loss" in r]
    assert events[-1].loss < events[0].loss  # it learns


def test_jobs_without_validation_are_skipped(tmp_path):
    for job in (LinearJob(), ValidatedJob(available=False)):
        root = tmp_path / type(job).__name__
        train(
            job,
            config(tmp_path, max_steps=4, validation_every_n_steps=2),
            RunDir(root),
            EventBus(),
            Accelerator(cpu=True),
        )
        assert all("validation_loss" not in r for r in _rows(root / "metrics.jsonl"))


def test_fixed_validation_loss_uses_fixed_generators_and_spread_timesteps():
    assert validation_timesteps(1000, 4) == [125, 375, 625, 875]
    calls = []

    def batch_loss(indices, generators, timesteps):
        calls.append((indices, timesteps.tolist()))
        return torch.stack([torch.randn((), generator=g) for g in generators]).mean() + timesteps.float().mean()

    a = fixed_validation_loss(batch_loss, 3, seed=0, num_train_timesteps=1000, count=2, batch_size=4)
    b = fixed_validation_loss(batch_loss, 3, seed=0, num_train_timesteps=1000, count=2, batch_size=4)
    assert a == b  # fresh generators from the same seeds every call
    assert calls[0] == ([0, 0, 1, 1], [250, 750, 250, 750]) and calls[1] == ([2, 2], [250, 750])
    assert a != fixed_validation_loss(batch_loss, 3, seed=1, num_train_timesteps=1000, count=2, batch_size=4)
