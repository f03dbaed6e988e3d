"""Stepped learning-rate schedules written as text, with AUTOMATIC1111 semantics.

This follows AUTOMATIC1111 ``modules/textual_inversion/learn_schedule.py`` (``LearnScheduleIterator`` and
``LearnRateScheduler``), so schedules copied from the web UI train the same way here.

Syntax: comma-separated items, each ``rate:step`` ("use this rate until step N") or a bare ``rate``
("use this rate until the end"). ``"0.005:100, 1e-3:1000, 1e-5"`` trains at 0.005 until step 100, at 1e-3
until step 1000 and at 1e-5 until ``max_steps``. A plain number such as ``"0.005"`` is a constant rate.

Rules, as in AUTOMATIC1111:

* A bare rate, or a step of ``-1``, runs to ``max_steps`` and ends the schedule: later items are ignored.
* A step beyond ``max_steps`` is clamped to ``max_steps`` and also ends the schedule.
* If the last item ends before ``max_steps``, training stops there (:attr:`RateSchedule.finished`).
* When resuming at ``cur_step``, items whose step is ``<= cur_step`` are skipped.
* Whitespace around numbers and empty items (``"0.1:100,,"``) are ignored.

Deliberately stricter than AUTOMATIC1111, which accepts these silently and then trains oddly:

* Rates must be finite and > 0 (no ``nan``, ``inf``, ``0`` or negative rates).
* Steps must be integers >= 1, or ``-1``; explicit steps must increase from left to right.
* Every item must be well-formed, including items after the one that ends the schedule.
* Resuming after the last item raises (AUTOMATIC1111 raises too, with a generic message).
"""

from __future__ import annotations

import math

#: The example shown in every error message.
EXAMPLE = "0.005:100, 1e-3:1000, 1e-5"


def parse_rate_schedule(text: str | float, max_steps: int) -> list[tuple[float, int]]:
    """Return the schedule as ``(rate, end_step)`` pairs; each rate applies to steps before its end step.

    >>> parse_rate_schedule("0.005:100, 1e-3:1000, 1e-5", 2000)
    [(0.005, 100), (0.001, 1000), (1e-05, 2000)]

    Raises ``ValueError`` with the syntax in its message when ``text`` is malformed.
    """
    _check_steps(max_steps)
    return _select(_parse_items(text), max_steps, cur_step=0)


def check_rate_schedule(text: str | float) -> str | float:
    """Validate the syntax of a schedule without knowing ``max_steps``; return it unchanged.

    Meant for config fields (``AfterValidator(check_rate_schedule)``): the ``ValueError`` message becomes
    the config error.
    """
    _parse_items(text)
    return text


class RateSchedule:
    """The rate to train at, step by step (AUTOMATIC1111's ``LearnRateScheduler``).

    Typical loop, with ``step`` the number of steps already done::

        schedule = RateSchedule(config.lr, max_steps, cur_step=resumed_step)
        log(schedule.describe())
        for step in range(resumed_step, max_steps):
            if schedule.advance(step):
                set_lr(optimizer, schedule.rate)
                log(schedule.describe())
            if schedule.finished:
                break
            ...train one step at schedule.rate...
    """

    def __init__(self, text: str | float, max_steps: int, cur_step: int = 0) -> None:
        _check_steps(max_steps)
        if isinstance(cur_step, bool) or not isinstance(cur_step, int) or cur_step < 0:
            raise ValueError(f"cur_step must be an integer >= 0, got {cur_step!r}")
        items = _parse_items(text)
        self.text = str(text)
        self.max_steps = max_steps
        self.items: tuple[tuple[float, int], ...] = tuple(_select(items, max_steps, cur_step))
        if not self.items:
            last = max(step for _, step in items if step is not None)
            raise ValueError(
                f"learning-rate schedule '{self.text}' ends at step {last}, but training resumes at step "
                f'{cur_step}; add a rate for the later steps, e.g. "{self.text.strip()}, 1e-5"'
            )
        self._index = 0
        #: True once a step at or past :attr:`final_step` was passed to :meth:`advance`: stop training.
        self.finished = False

    @property
    def rate(self) -> float:
        """The current learning rate."""
        return self.items[self._index][0]

    @property
    def end_step(self) -> int:
        """The step at which the current rate stops applying."""
        return self.items[self._index][1]

    @property
    def final_step(self) -> int:
        """The step at which training ends: ``max_steps``, or earlier if the schedule ends earlier."""
        return self.items[-1][1]

    def advance(self, step: int) -> bool:
        """Move to the item that covers ``step``; return True when the rate changed.

        Sets :attr:`finished` when ``step`` reaches :attr:`final_step`. AUTOMATIC1111 moves one item per
        call; this moves as far as needed, which is the same for consecutive steps.
        """
        changed = False
        while not self.finished and step >= self.end_step:
            if self._index + 1 < len(self.items):
                self._index += 1
                changed = True
            else:
                self.finished = True
        return changed

    def rate_at(self, step: int) -> float | None:
        """The rate for ``step``, or None at and after :attr:`final_step` (training is over)."""
        for rate, end_step in self.items:
            if step < end_step:
                return rate
        return None

    def describe(self) -> str:
        """The console line, as in AUTOMATIC1111: ``Training at rate of 0.005 until step 100``."""
        return f"Training at rate of {self.rate} until step {self.end_step}"

    def __repr__(self) -> str:
        return f"RateSchedule({self.text!r}, max_steps={self.max_steps}, items={list(self.items)})"


def _parse_items(text: str | float) -> list[tuple[float, int | None]]:
    """Check every item's syntax; return ``(rate, step)`` pairs, step None for a bare rate."""
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise _error(text)
    items: list[tuple[float, int | None]] = []
    for chunk in str(text).split(","):
        if not chunk.strip():
            continue  # AUTOMATIC1111 skips empty items, so "0.1:100," is accepted
        rate_text, colon, step_text = chunk.partition(":")
        try:
            rate = float(rate_text)
            step = int(step_text) if colon else None
        except ValueError:
            raise _error(text) from None
        if not math.isfinite(rate) or rate <= 0:
            raise _error(text, f"rate {rate_text.strip()} must be a number > 0")
        if step is not None and step != -1 and step < 1:
            raise _error(text, f"step {step} must be >= 1, or -1 for 'until the end'")
        items.append((rate, step))
    if not items:
        raise _error(text)
    previous = 0
    for _, step in items:
        if step is None or step == -1:
            continue
        if step <= previous:
            raise _error(text, f"step {step} comes after step {previous}; steps must increase")
        previous = step
    return items


def _select(items: list[tuple[float, int | None]], max_steps: int, cur_step: int) -> list[tuple[float, int]]:
    """AUTOMATIC1111's ``LearnScheduleIterator.__init__``: pick the items that apply from ``cur_step``."""
    selected: list[tuple[float, int]] = []
    for rate, step in items:
        if step is None:  # a bare rate runs to the end and ends the schedule
            selected.append((rate, max_steps))
            break
        if step > cur_step:
            selected.append((rate, min(step, max_steps)))
            if step > max_steps:
                break
        elif step == -1:
            selected.append((rate, max_steps))
            break
    return selected


def _check_steps(max_steps: int) -> None:
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")


def _error(text: object, reason: str | None = None) -> ValueError:
    shown = text if isinstance(text, str) else repr(text)
    what = reason or 'expected a number or "rate:step" items'
    return ValueError(f"invalid learning-rate schedule '{shown}': {what}, e.g. \"{EXAMPLE}\"")
