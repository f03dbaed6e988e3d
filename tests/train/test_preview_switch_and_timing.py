"""Previews: `preview.enabled: false` means none at all, `auto` settings follow the device, and preview time is
measured apart from training time."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from sdtune.config import TextualInversionConfig
from sdtune.config.blocks import PreviewConfig
from sdtune.core.events import EventBus, RunFinished, SampleSaved
from sdtune.data import Templates
from sdtune.inference.previews import class_image_settings, preview_count, preview_prompts, preview_steps
from sdtune.train.loop import train
from sdtune.train.rundir import RunDir

PREVIEW_SECONDS = 0.4
TEMPLATES = Templates(("a photo of [name], [filewords]",), "test")


class SlowPreviewJob:
    """A one-parameter regression whose previews take PREVIEW_SECONDS each and write one file."""

    initial_step = 0

    def __init__(self) -> None:
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.preview_calls: list[int] = []

    def trainable_parameters(self):
        return [{"params": [self.w], "lr": 0.1}]

    def num_examples(self):
        return 4

    def loss(self, indices, generators):
        return ((self.w - 1.0) ** 2).sum()

    def after_step(self, step):
        pass

    def state_dict(self):
        return {"w": self.w.detach().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.w.copy_(state["w"])

    def export(self, out_dir: Path, step: int):
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "w.txt"
        path.write_text(str(float(self.w.detach())))
        return [path]

    def preview(self, out_dir: Path, step: int):
        self.preview_calls.append(step)
        time.sleep(PREVIEW_SECONDS)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "0.png"
        path.write_bytes(b"png")
        return [path], None


def config(tmp_path: Path, preview: dict) -> TextualInversionConfig:
    return TextualInversionConfig.model_validate(
        {
            "method": "textual_inversion",
            "name": "t",
            "output_dir": str(tmp_path),
            "token": "<x>",
            "data": {"path": ".", "batch_size": 1},
            "preview": preview,
            "train": {"max_steps": 6},
        }
    )


def run(tmp_path: Path, preview: dict) -> tuple[SlowPreviewJob, list, float]:
    job, bus, seen = SlowPreviewJob(), EventBus(), []
    bus.subscribe(seen.append)
    tic = time.perf_counter()
    train(job, config(tmp_path, preview), RunDir(tmp_path / "t"), bus, Accelerator(cpu=True))
    return job, seen, time.perf_counter() - tic


def test_previews_off_means_none_before_during_or_after(tmp_path):
    job, seen, _ = run(tmp_path, {"enabled": False, "every_n_steps": 2, "before_training": True})
    assert job.preview_calls == []
    assert not any(isinstance(e, SampleSaved) for e in seen)
    assert not (tmp_path / "t" / "samples").exists() or not any((tmp_path / "t" / "samples").iterdir())
    finished = [e for e in seen if isinstance(e, RunFinished)]
    assert finished[0].preview_seconds == 0.0
    assert (tmp_path / "t" / "output" / "w.txt").is_file()  # training and export still happen


def test_previews_on_render_before_every_n_and_after(tmp_path):
    job, seen, _ = run(tmp_path, {"every_n_steps": 2, "before_training": True})
    assert job.preview_calls == [0, 2, 4, 6]
    assert sorted(p.name for p in (tmp_path / "t" / "samples").iterdir()) == ["step-0", "step-2", "step-4", "step-6"]


def test_training_time_excludes_preview_time(tmp_path):
    job, seen, wall = run(tmp_path, {"every_n_steps": 2, "before_training": True})
    (finished,) = [e for e in seen if isinstance(e, RunFinished)]
    rendered = len(job.preview_calls) * PREVIEW_SECONDS
    assert finished.preview_seconds >= rendered
    assert finished.preview_seconds < rendered + 0.5
    assert finished.train_seconds is not None and finished.train_seconds >= 0
    assert finished.train_seconds + finished.preview_seconds <= wall
    assert finished.train_seconds < wall - rendered  # the sleeps are not counted as training
    log = (tmp_path / "t" / "events.log").read_text()
    (line,) = re.findall(r"time: training ([\d.]+) s, previews ([\d.]+) s", log)
    assert float(line[0]) == pytest.approx(finished.train_seconds, abs=0.06)
    assert float(line[1]) == pytest.approx(finished.preview_seconds, abs=0.06)
    assert len(re.findall(r"previews of step \d+: 1 images in [\d.]+ s", log)) == 4


@pytest.mark.parametrize(("gpu", "steps", "count"), [(True, 20, 4), (False, 8, 2)])
def test_auto_preview_settings_follow_the_device(gpu, steps, count):
    auto = PreviewConfig()
    assert (auto.steps, auto.num_prompts) == ("auto", "auto")
    assert preview_steps(auto, gpu=gpu) == steps
    assert preview_count(auto, gpu=gpu) == count
    fixed = PreviewConfig(steps=13, num_prompts=3)
    assert (preview_steps(fixed, gpu=gpu), preview_count(fixed, gpu=gpu)) == (13, 3)


def test_auto_prompt_count_limits_the_training_captions_only():
    captions = [f"caption {i}" for i in range(10)]
    expected = preview_count(PreviewConfig())  # this machine's auto value
    assert len(preview_prompts(PreviewConfig(), TEMPLATES, captions, "w")) == expected
    assert len(preview_prompts(PreviewConfig(num_prompts=5), TEMPLATES, captions, "w")) == 5
    chosen = PreviewConfig(prompts=[f"p{i} [name]" for i in range(6)])
    assert preview_prompts(chosen, TEMPLATES, captions, "w") == [f"p{i} w" for i in range(6)]


def test_class_images_keep_full_steps_on_every_device():
    assert class_image_settings(PreviewConfig(), 64).steps == 20  # training data: not scaled down on a CPU
    assert class_image_settings(PreviewConfig(steps=5, cfg_scale=3.0), 64).steps == 5
    assert class_image_settings(PreviewConfig(steps=5, cfg_scale=3.0), 64).cfg_scale == 3.0
