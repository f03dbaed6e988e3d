"""Console progress: full lines where the console is not a terminal, speeds with significant digits."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from sdtune.core.events import CheckpointSaved, RunFailed, RunFinished, RunStarted, SampleSaved, StepEnd
from sdtune.train.listeners import ConsoleProgress, format_duration, format_speed, progress_line, significant

LINE = re.compile(
    r"^step (?P<step>\d+)/(?P<total>\d+) loss (?P<loss>\d+\.\d{4}) \(avg (?P<avg>\d+\.\d{4})\) "
    r"lr (?P<lr>\d\.\d\de[-+]\d\d) (?P<speed>[\d.]+ (?:it/s|s/step)) (?P<img>[\d.]+ (?:img/s|s/img)) "
    r"epoch (?P<epoch>\d+) ETA (?P<eta>(?:\d+h\d\dm|\d+m\d\ds|\d+s|-))$"
)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (2.347, "2.35"),
        (23.47, "23.5"),
        (234.7, "235"),
        (2347.0, "2350"),
        (0.02346, "0.0235"),
        (9.996, "10.0"),
        (0.1, "0.100"),
        (1.0, "1.00"),
    ],
)
def test_significant_keeps_three_digits(value, text):
    assert significant(value) == text


@pytest.mark.parametrize(
    ("per_second", "unit", "per", "text"),
    [
        (2.347, "it", "step", "2.35 it/s"),
        (1.0, "it", "step", "1.00 it/s"),
        (0.0806, "it", "step", "12.4 s/step"),
        (0.02, "img", "img", "50.0 s/img"),  # the "0.0 img/s" at real size on a CPU
        (0.2, "img", "img", "5.00 s/img"),
        (153.2, "img", "img", "153 img/s"),
        (0.0, "it", "step", "- it/s"),
    ],
)
def test_format_speed(per_second, unit, per, text):
    assert format_speed(per_second, unit, per) == text


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (41.4, "41s"), (161, "2m41s"), (3725, "1h02m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_progress_line_matches_the_documented_example():
    event = StepEnd(step=120, max_steps=500, epoch=3, loss=0.1234, lr=1e-4, images_per_second=9.4)
    line = progress_line(event, 0.13, 2.35)
    assert line == "step 120/500 loss 0.1234 (avg 0.1300) lr 1.00e-04 2.35 it/s 9.40 img/s epoch 3 ETA 2m42s"
    assert LINE.match(line)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_not_a_terminal_prints_complete_lines_first_every_interval_and_last():
    out, clock = io.StringIO(), Clock()
    console = Console(file=out, width=40)  # narrow: a bar would be cut; lines must not be
    assert not console.is_terminal
    progress = ConsoleProgress(console, interval=10.0, clock=clock)
    progress(RunStarted("runs/[name]", "textual_inversion", 0, 100))
    for step in range(1, 101):
        clock.now = step * 0.5  # 2 it/s
        progress(StepEnd(step, 100, 1 + step // 50, 1.0 / step, 1e-3, 8.0))
        if step == 40:
            progress(CheckpointSaved(step, "runs/[name]/checkpoints/step-40"))
            progress(SampleSaved(step, (), "runs/[name]/samples/step-40/grid.png"))
    progress(RunFinished(100, (), train_seconds=50.0, preview_seconds=0.0))
    lines = out.getvalue().splitlines()
    parsed = [m.groupdict() for m in map(LINE.match, lines) if m]
    steps = [int(p["step"]) for p in parsed]
    assert steps[0] == 1 and steps[-1] == 100
    assert steps == [1, 21, 41, 61, 81, 100]  # the first step, then every 10 s at 2 it/s, and the last step
    assert all(p["total"] == "100" for p in parsed)
    assert parsed[-1]["speed"] == "2.00 it/s" and parsed[-1]["img"] == "8.00 img/s"
    assert parsed[-1]["eta"] == "0s" and parsed[1]["eta"] == "40s"  # step 21: 79 steps left at 2 it/s
    assert "step 40: checkpoint runs/[name]/checkpoints/step-40" in lines  # user paths printed literally
    assert "step 40: previews runs/[name]/samples/step-40/grid.png" in lines
    assert lines[0] == "training textual_inversion from step 0 to 100"
    assert lines[-1] == "time: training 50s"
    assert not any("…" in line or "\x1b" in line for line in lines)


def test_a_run_that_ends_early_prints_its_last_step():
    out, clock = io.StringIO(), Clock()
    progress = ConsoleProgress(Console(file=out), interval=10.0, clock=clock)
    progress(RunStarted("r", "lora", 0, 100))
    for step in range(1, 8):
        clock.now = step * 0.1
        progress(StepEnd(step, 100, 1, 0.5, 1e-4, 0.05))
    progress(RunFailed(7, "stopped: loss is nan at [step 7]"))
    lines = out.getvalue().splitlines()
    assert [LINE.match(line)["step"] for line in lines if LINE.match(line)] == ["1", "7"]
    assert "20.0 s/img" in lines[-2]
    assert lines[-1] == "stopped: stopped: loss is nan at [step 7]"


def test_speed_and_eta_leave_out_the_time_previews_take():
    out, clock = io.StringIO(), Clock()
    progress = ConsoleProgress(Console(file=out), interval=0.0, clock=clock)
    progress(RunStarted("r", "lora", 0, 10))
    clock.now = 60.0  # a minute of previews before the first step
    progress(SampleSaved(0, (), "r/samples/step-0/grid.png"))
    for step in range(1, 11):
        clock.now = 60.0 + step * 0.25  # 4 it/s
        progress(StepEnd(step, 10, 1, 0.5, 1e-4, 8.0))
    speeds = [m["speed"] for m in map(LINE.match, out.getvalue().splitlines()) if m]
    assert speeds == ["4.00 it/s"] * 10
