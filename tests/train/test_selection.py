"""The best step and early stopping as functions of the evaluation rows."""

from __future__ import annotations

import pytest

from sdtune.train.selection import Selection


def rows(*scores):
    return [{"step": 100 * i, "score": s} for i, s in enumerate(scores)]


def test_best_is_the_maximum_after_the_base_and_the_earliest_on_a_tie():
    s = Selection.of(rows(99.0, 10.0, 30.0, 30.0, 20.0), "score")
    assert s.best_step == 200  # step 0 (the base) is never selected, even with the highest figure
    assert s.best["score"] == 30.0
    assert s.evaluated == {0, 100, 200, 300, 400}


def test_rows_without_the_figure_are_recorded_but_never_selected():
    s = Selection.of([{"step": 0}, {"step": 100, "fidelity": 5.0}, {"step": 200, "score": 1.0}], "score")
    assert s.best_step == 200
    assert s.evaluated == {0, 100, 200}


@pytest.mark.parametrize(
    ("scores", "min_delta", "patience", "stale", "exhausted"),
    [
        ((0, 10, 9, 8), 0.0, 2, 2, True),  # two evaluations below the best
        ((0, 10, 9, 11), 0.0, 2, 0, False),  # a new best resets the count
        ((0, 10, 10, 10), 0.0, 2, 2, True),  # equal is no improvement
        ((0, 10, 10.5, 10.9), 1.0, 2, 2, True),  # rises smaller than min_delta do not count
        ((0, 10, 10.5, 10.9), 1.0, 3, 2, False),
        ((0, 10, 10.5, 11.0), 1.0, 2, 0, False),  # exactly min_delta counts
        ((0, 10, 10.5, 11.5), 1.0, 2, 0, False),  # 11.5 >= 10 + 1: an improvement
        ((0, 10, 1, 1, 1, 1), 0.0, 0, 4, False),  # patience 0 never stops
    ],
)
def test_patience_counts_evaluations_since_the_last_improvement(scores, min_delta, patience, stale, exhausted):
    s = Selection.of(rows(*scores), "score", min_delta, patience)
    assert s.stale == stale
    assert s.exhausted is exhausted


def test_small_rises_move_the_best_but_not_the_patience_mark():
    s = Selection.of(rows(0, 10, 10.5, 10.9), "score", min_delta=1.0, patience=2)
    assert s.best_step == 300  # the maximum, as report.json's best_step promises
    assert s.exhausted
    assert "best 10.9 at step 300" in s.stop_reason()


def test_the_report_names_best_and_last_without_timings():
    s = Selection.of([r | {"seconds": 1.5} for r in rows(0, 20, 10)], "score")
    report = s.report(last_step=250, stopped="max steps reached", eval_seconds=4.5, train_seconds=40.0)
    assert report["best_step"] == 100 and report["best"] == {"step": 100, "score": 20}
    assert report["last"] == {"step": 200, "score": 10} and report["last_step"] == 250
    assert report["selected_by"] == "score" and report["evaluations"] == 3 and report["eval_seconds"] == 4.5
