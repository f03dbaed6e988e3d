"""AUTOMATIC1111 learning-rate schedule strings (sdtune.config.rate_schedule)."""

from __future__ import annotations

from typing import Annotated

import pytest
from pydantic import AfterValidator, Field

from sdtune.config import RateSchedule, StrictModel, check_rate_schedule, parse_config, parse_rate_schedule
from sdtune.core.errors import ConfigError

A1111 = "0.005:100, 1e-3:1000, 1e-5"
SYNTAX = 'expected a number or "rate:step" items, e.g. "0.005:100, 1e-3:1000, 1e-5"'

# (schedule, max_steps, cur_step, expected (rate, end_step) items) -- what RateSchedule trains with.
CASES = [
    pytest.param("0.005", 1000, 0, [(0.005, 1000)], id="plain number"),
    pytest.param(0.005, 1000, 0, [(0.005, 1000)], id="float, not a string"),
    pytest.param("0.01:100, 0.001", 1000, 0, [(0.01, 100), (0.001, 1000)], id="two items"),
    pytest.param(A1111, 2000, 0, [(0.005, 100), (1e-3, 1000), (1e-5, 2000)], id="three items"),
    pytest.param("0.1, 0.2:50", 1000, 0, [(0.1, 1000)], id="bare rate ends parsing"),
    pytest.param("0.1:100, 0.2:-1, 0.3:500", 1000, 0, [(0.1, 100), (0.2, 1000)], id="step -1 ends parsing"),
    pytest.param("0.1:100, 0.2:5000, 0.3", 1000, 0, [(0.1, 100), (0.2, 1000)], id="step > max clamped, ends"),
    pytest.param("0.1:1000, 0.2", 1000, 0, [(0.1, 1000), (0.2, 1000)], id="step == max does not end"),
    pytest.param("0.1:100, 0.05:300", 1000, 0, [(0.1, 100), (0.05, 300)], id="ends before max steps"),
    pytest.param(A1111, 2000, 150, [(1e-3, 1000), (1e-5, 2000)], id="resume mid item"),
    pytest.param(A1111, 2000, 100, [(1e-3, 1000), (1e-5, 2000)], id="resume at a boundary"),
    pytest.param(A1111, 2000, 99, [(0.005, 100), (1e-3, 1000), (1e-5, 2000)], id="resume before a boundary"),
    pytest.param("0.1:100, 0.2:-1", 1000, 500, [(0.2, 1000)], id="resume past items, then -1"),
    pytest.param("  0.005 :100 ,1e-3:  1000,\t1e-5  ", 2000, 0, [(0.005, 100), (1e-3, 1000), (1e-5, 2000)],
                 id="whitespace"),
    pytest.param("0.1:100,,", 1000, 0, [(0.1, 100)], id="empty items skipped as in A1111"),
    pytest.param("1E-4:10,2.5e-5", 20, 0, [(1e-4, 10), (2.5e-5, 20)], id="scientific notation"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "max_steps", "cur_step", "items"), CASES)
def test_schedule_items(text: str, max_steps: int, cur_step: int, items: list[tuple[float, int]]) -> None:
    assert list(RateSchedule(text, max_steps, cur_step).items) == items
    if cur_step == 0:
        assert parse_rate_schedule(text, max_steps) == items


def rates_by_step(schedule: RateSchedule, start: int, stop: int) -> tuple[dict[int, float], int | None]:
    """Drive the schedule like the training loop; return the rate used at each step and the stop step."""
    used: dict[int, float] = {}
    for step in range(start, stop):
        schedule.advance(step)
        if schedule.finished:
            return used, step
        used[step] = schedule.rate
    return used, None


def test_three_item_schedule_step_by_step() -> None:
    schedule = RateSchedule(A1111, 2000)
    assert schedule.describe() == "Training at rate of 0.005 until step 100"
    used, stopped = rates_by_step(schedule, 0, 2000)
    assert stopped is None
    assert used[0] == used[99] == 0.005
    assert used[100] == used[999] == 1e-3
    assert used[1000] == used[1999] == 1e-5
    assert schedule.describe() == "Training at rate of 1e-05 until step 2000"
    assert schedule.final_step == 2000
    assert schedule.advance(2000) is False
    assert schedule.finished


def test_advance_reports_rate_changes() -> None:
    schedule = RateSchedule(A1111, 2000)
    assert schedule.advance(0) is False
    assert schedule.advance(99) is False
    assert schedule.advance(100) is True
    assert schedule.describe() == "Training at rate of 0.001 until step 1000"


def test_schedule_ending_early_finishes_training_early() -> None:
    schedule = RateSchedule("0.1:100, 0.05:300", 1000)
    assert schedule.final_step == 300
    used, stopped = rates_by_step(schedule, 0, 1000)
    assert stopped == 300
    assert used[299] == 0.05
    assert schedule.rate_at(299) == 0.05
    assert schedule.rate_at(300) is None


def test_resume_starts_at_the_right_rate() -> None:
    schedule = RateSchedule(A1111, 2000, cur_step=150)
    assert schedule.rate == 1e-3
    assert schedule.describe() == "Training at rate of 0.001 until step 1000"
    used, stopped = rates_by_step(schedule, 150, 2000)
    assert stopped is None
    assert used[150] == 1e-3
    assert used[1000] == 1e-5


def test_rate_at_is_stateless() -> None:
    schedule = RateSchedule(A1111, 2000)
    assert [schedule.rate_at(s) for s in (0, 99, 100, 999, 1000, 1999, 2000)] == [
        0.005,
        0.005,
        1e-3,
        1e-3,
        1e-5,
        1e-5,
        None,
    ]
    assert schedule.rate == 0.005  # rate_at did not move the schedule


def test_resume_after_the_last_item_raises() -> None:
    with pytest.raises(ValueError) as info:
        RateSchedule("0.005:100, 1e-3:1000", 2000, cur_step=1000)
    assert str(info.value) == (
        "learning-rate schedule '0.005:100, 1e-3:1000' ends at step 1000, but training resumes at step 1000; "
        'add a rate for the later steps, e.g. "0.005:100, 1e-3:1000, 1e-5"'
    )


@pytest.mark.parametrize(
    "text",
    ["abc", "0.1:", "0.1:ten", ":100", "", " , ", "0.1:100:200", "0.1;100", "0.1:1e3", "0.1:2.5", "0.1, x"],
)
def test_malformed_schedules_show_the_syntax(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_rate_schedule(text, 1000)
    assert str(info.value) == f"invalid learning-rate schedule '{text}': {SYNTAX}"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("-0.1", "rate -0.1 must be a number > 0"),
        ("0", "rate 0 must be a number > 0"),
        ("nan", "rate nan must be a number > 0"),
        ("0.1:100, inf", "rate inf must be a number > 0"),
        ("0.1:0", "step 0 must be >= 1, or -1 for 'until the end'"),
        ("0.1:-5", "step -5 must be >= 1, or -1 for 'until the end'"),
        ("0.1:500, 0.2:100", "step 100 comes after step 500; steps must increase"),
        ("0.1:500, 0.2:500", "step 500 comes after step 500; steps must increase"),
    ],
)
def test_invalid_values_name_the_problem(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_rate_schedule(text, 1000)
    assert str(info.value) == (
        f"invalid learning-rate schedule '{text}': {reason}, e.g. \"0.005:100, 1e-3:1000, 1e-5\""
    )


@pytest.mark.parametrize("max_steps", [0, -1, 1.5, True])
def test_max_steps_must_be_a_positive_integer(max_steps: object) -> None:
    with pytest.raises(ValueError, match="max_steps must be an integer >= 1"):
        parse_rate_schedule("0.1", max_steps)  # type: ignore[arg-type]


def test_check_rate_schedule_returns_input_or_raises() -> None:
    assert check_rate_schedule(A1111) == A1111
    assert check_rate_schedule(0.005) == 0.005
    with pytest.raises(ValueError, match="invalid learning-rate schedule 'fast'"):
        check_rate_schedule("fast")


def test_schedule_errors_become_config_errors() -> None:
    class Embedding(StrictModel):
        lr: Annotated[str, AfterValidator(check_rate_schedule)] = Field("0.005", examples=[A1111])
        """Learning rate or AUTOMATIC1111 schedule."""

    assert parse_config({"lr": A1111}, Embedding).lr == A1111
    with pytest.raises(ConfigError) as info:
        parse_config({"lr": "0.1:ten"}, Embedding)
    assert str(info.value) == f"lr: invalid learning-rate schedule '0.1:ten': {SYNTAX}"
