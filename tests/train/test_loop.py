"""The training loop on a small fake job: accumulation, resume, NaN guard, schedules, run-folder contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from sdtune.config import TextualInversionConfig
from sdtune.core.errors import TrainingError
from sdtune.core.events import CheckpointSaved, EventBus, RunFailed, RunFinished, StepEnd
from sdtune.train.loop import ExampleStream, train
from sdtune.train.rundir import RunDir


class LinearJob:
    """Regress y = 3x + 1 with noisy samples: every piece of randomness comes from the per-sample generators."""

    initial_step = 0

    def __init__(self, n: int = 10, poison_at: int | None = None) -> None:
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.xs = torch.linspace(-1, 1, n)
        self.poison_at, self.calls, self.steps = poison_at, 0, 0

    def trainable_parameters(self):
        return [{"params": [self.w], "lr": 0.1}]

    def num_examples(self):
        return len(self.xs)

    def loss(self, indices, generators):
        self.calls += 1
        noise = torch.stack([torch.randn((), generator=g) for g in generators]) * 0.1
        x = self.xs[indices]
        err = (self.w[0] * x + self.w[1] - (3 * x + 1 + noise)) ** 2
        if self.poison_at is not None and self.steps + 1 == self.poison_at:
            err = err * float("nan")
        return err.mean()

    def after_step(self, step):
        self.steps = step  # completed steps

    def state_dict(self):
        return {"w": self.w.detach().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.steps = 0

    def export(self, out_dir: Path, step: int):
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "w.json"
        path.write_text(json.dumps(self.w.tolist()))
        return [path]

    def preview(self, out_dir: Path, step: int):
        return [], None


def config(tmp_path, **train):
    return TextualInversionConfig.model_validate(
        {
            "method": "textual_inversion",
            "name": "t",
            "output_dir": str(tmp_path),
            "token": "<x>",
            "data": {"path": ".", "batch_size": train.pop("batch_size", 2)},
            "optimizer": {"lr": train.pop("lr", 0.1)},
            "save": {"every_n_steps": train.pop("save_every", 0), "keep_last": 10},
            "preview": {"before_training": False},
            "train": {"max_steps": 12, **train},
        }
    )


def test_example_stream_covers_each_epoch_once():
    stream = ExampleStream(n=7, repeats=2, seed=3)
    first = [stream.index(k) for k in range(14)]
    assert sorted(first) == sorted(list(range(7)) * 2)
    assert [stream.index(k) for k in range(14, 28)] != first  # a new order each epoch


@pytest.mark.parametrize(("batch", "repeats"), [(2, 1), (3, 2), (4, 1)])
def test_bucketed_stream_takes_every_batch_from_one_group_and_covers_each_epoch(batch, repeats):
    groups = [0, 0, 0, 1, 1, 2, 0, 1, 2, 2, 2]  # 4, 3 and 4 examples of three sizes
    stream = ExampleStream(n=len(groups), repeats=repeats, seed=5, groups=groups, batch=batch)
    length, shuffled = stream.epoch_length, False
    assert length % batch == 0
    for epoch in range(3):
        order = [stream.index(epoch * length + k) for k in range(length)]
        chunks = [order[i : i + batch] for i in range(0, length, batch)]
        assert all(len({groups[i] for i in chunk}) == 1 for chunk in chunks)
        counts = np.bincount(order, minlength=len(groups))
        assert counts.min() >= repeats  # every example at least `repeats` times...
        assert counts.sum() - len(groups) * repeats < batch * 3  # ...plus at most one partial batch's fill per group
        chunk_groups = [groups[c[0]] for c in chunks]
        shuffled = shuffled or chunk_groups != sorted(chunk_groups)
    assert shuffled  # the batches of different sizes are interleaved, not one size after another
    again = ExampleStream(n=len(groups), repeats=repeats, seed=5, groups=groups, batch=batch)
    assert [again.index(k) for k in range(2 * length)] == [stream.index(k) for k in range(2 * length)]


def test_loss_falls_and_run_folder_contract(tmp_path):
    job, cfg, bus, seen = LinearJob(), config(tmp_path, max_steps=60), EventBus(), []
    bus.subscribe(seen.append)
    outputs = train(job, cfg, RunDir(tmp_path / "t"), bus, Accelerator(cpu=True))
    rows = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert rows[-1]["loss"] < rows[0]["loss"] / 10
    assert torch.allclose(job.w.detach(), torch.tensor([3.0, 1.0]), atol=0.3)
    assert outputs == [tmp_path / "t" / "output" / "w.json"]
    assert (tmp_path / "t" / "loss.png").is_file()
    assert (tmp_path / "t" / "checkpoints" / "step-60" / "export" / "w.json").is_file()
    assert sum(isinstance(e, StepEnd) for e in seen) == 60 and isinstance(seen[-1], RunFinished)


def test_accumulation_equals_bigger_batch(tmp_path):
    a, b = LinearJob(), LinearJob()
    train(a, config(tmp_path / "a", batch_size=4), RunDir(tmp_path / "a" / "t"), EventBus(), Accelerator(cpu=True))
    train(
        b,
        config(tmp_path / "b", batch_size=2, grad_accum=2),
        RunDir(tmp_path / "b" / "t"),
        EventBus(),
        Accelerator(cpu=True),
    )
    torch.testing.assert_close(a.w.detach(), b.w.detach(), rtol=1e-5, atol=1e-6)


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    whole = LinearJob()
    train(
        whole,
        config(tmp_path / "whole", save_every=4),
        RunDir(tmp_path / "whole" / "t"),
        EventBus(),
        Accelerator(cpu=True),
    )
    run = RunDir(tmp_path / "part" / "t")
    first = LinearJob()
    train(first, config(tmp_path / "part", max_steps=8, save_every=4), run, EventBus(), Accelerator(cpu=True))
    second = LinearJob()  # a fresh process: weights come from the checkpoint
    train(second, config(tmp_path / "part", save_every=4), run, EventBus(), Accelerator(cpu=True))
    torch.testing.assert_close(second.w.detach(), whole.w.detach(), rtol=0, atol=0)
    assert [json.loads(x)["step"] for x in (run.root / "metrics.jsonl").read_text().splitlines()] == list(range(1, 13))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    run, bus, seen = RunDir(tmp_path / "t"), EventBus(), []
    bus.subscribe(seen.append)
    job = LinearJob(poison_at=7)
    with pytest.raises(TrainingError, match=r"step 7: loss is nan; stopped without updating") as exc:
        train(job, config(tmp_path, save_every=2), run, bus, Accelerator(cpu=True))
    assert "\n" not in str(exc.value) and "step-6" in str(exc.value)
    assert [c.step for c in run.list_checkpoints()] == [2, 4, 6]
    assert torch.isfinite(job.w).all()  # the poisoned step never updated the weights
    assert isinstance(seen[-1], RunFailed) and seen[-1].last_checkpoint.endswith("step-6")
    assert not (run.output / "w.json").exists()  # nothing exported from a failed run
    assert not any(isinstance(e, CheckpointSaved) and e.step > 6 for e in seen)


def test_a1111_schedule_string_ends_training_early(tmp_path):
    cfg = config(tmp_path, lr="0.1:3, 0.05:5", max_steps=12)
    job, seen, bus = LinearJob(), [], EventBus()
    bus.subscribe(seen.append)
    train(job, cfg, RunDir(tmp_path / "t"), bus, Accelerator(cpu=True))
    steps = [e for e in seen if isinstance(e, StepEnd)]
    assert [e.lr for e in steps] == [0.1, 0.1, 0.1, 0.05, 0.05]
    assert seen[-1].reason == "learning-rate schedule ended" and seen[-1].step == 5


def test_max_steps_counts_total_steps_across_resumes(tmp_path):
    run = RunDir(tmp_path / "t")
    train(LinearJob(), config(tmp_path, max_steps=5), run, EventBus(), Accelerator(cpu=True))
    with pytest.raises(TrainingError, match="already at step 5"):
        train(LinearJob(), config(tmp_path, max_steps=5), run, EventBus(), Accelerator(cpu=True))


def test_fused_backward_steps_each_weight_in_the_backward_pass_like_the_plain_optimizer(tmp_path):
    """Per-parameter AdamW stepped by hooks gives the plain AdamW's weights, holds no gradient after the backward
    pass, and resumes exactly."""
    plain, fused = LinearJob(), LinearJob()
    train(plain, config(tmp_path / "a", save_every=4), RunDir(tmp_path / "a" / "t"), EventBus(), Accelerator(cpu=True))
    cfg = config(tmp_path / "b", save_every=4, fused_backward=True)
    train(fused, cfg, RunDir(tmp_path / "b" / "t"), EventBus(), Accelerator(cpu=True))
    torch.testing.assert_close(fused.w.detach(), plain.w.detach(), rtol=1e-6, atol=1e-7)
    assert fused.w.grad is None  # freed by the hook right after its step
    rows = [json.loads(x) for x in (tmp_path / "b" / "t" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in rows)
    run = RunDir(tmp_path / "c" / "t")
    train(
        LinearJob(),
        config(tmp_path / "c", max_steps=8, save_every=4, fused_backward=True),
        run,
        EventBus(),
        Accelerator(cpu=True),
    )
    resumed = LinearJob()
    train(resumed, config(tmp_path / "c", save_every=4, fused_backward=True), run, EventBus(), Accelerator(cpu=True))
    torch.testing.assert_close(resumed.w.detach(), fused.w.detach(), rtol=0, atol=0)


def test_fused_backward_never_steps_on_a_nan_loss(tmp_path):
    run, job = RunDir(tmp_path / "t"), LinearJob(poison_at=7)
    with pytest.raises(TrainingError, match=r"step 7: loss is nan; stopped without updating"):
        train(job, config(tmp_path, save_every=2, fused_backward=True), run, EventBus(), Accelerator(cpu=True))
    assert torch.isfinite(job.w).all()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"grad_accum": 2}, "grad_accum must be 1"),
        ({"clip_grad": "norm"}, "use clip_grad: value or none"),
        ({"mixed_precision": "fp16"}, "use mixed_precision: bf16"),
    ],
)
def test_fused_backward_refuses_what_it_cannot_do(tmp_path, extra, message):
    from sdtune.core.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match=message):
        config(tmp_path, fused_backward=True, **extra)
