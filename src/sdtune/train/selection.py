"""The best evaluated step and early stopping, from the rows of ``eval.jsonl`` (a pure function of them, so a resumed
run that keeps its rows up to the checkpoint reaches the same decisions).

- The **best step** is the evaluated step (after step 0, the base model) with the highest ``eval.select`` figure;
  on a tie the earlier step.
- **Patience**: an evaluation *improves* when its figure beats the figure of the last improvement by at least
  ``eval.min_delta`` (by anything when ``min_delta`` is 0); ``eval.patience`` evaluations in a row without one end
  the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Selection:
    select: str
    min_delta: float = 0.0
    patience: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    stale: int = 0  # evaluations since the last improvement
    _mark: float | None = None  # the figure of the last improvement

    @classmethod
    def of(cls, rows: list[dict[str, Any]], select: str, min_delta: float = 0.0, patience: int = 0) -> Selection:
        out = cls(select, min_delta, patience)
        for row in rows:
            out.add(row)
        return out

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        value = row.get(self.select)
        if row["step"] == 0 or value is None:
            return
        if self.best is None or value > self.best[self.select]:
            self.best = row
        if self._mark is None or (value >= self._mark + self.min_delta if self.min_delta else value > self._mark):
            self._mark, self.stale = value, 0
        else:
            self.stale += 1

    @property
    def best_step(self) -> int | None:
        return None if self.best is None else int(self.best["step"])

    @property
    def evaluated(self) -> set[int]:
        return {int(r["step"]) for r in self.rows}

    @property
    def exhausted(self) -> bool:
        return bool(self.patience) and self.stale >= self.patience

    def stop_reason(self) -> str:
        return (
            f"early stop: {self.stale} evaluations without {self.select} rising"
            + (f" by {self.min_delta:g}" if self.min_delta else "")
            + f" (best {self.best[self.select]:g} at step {self.best_step})"
        )

    def report(self, last_step: int, stopped: str, eval_seconds: float, train_seconds: float) -> dict[str, Any]:
        """What ``report.json`` holds."""
        last = self.rows[-1] if self.rows else None
        return {
            "best_step": self.best_step,
            "selected_by": self.select,
            "best": _figures(self.best),
            "last_step": last_step,
            "last": _figures(last),
            "stopped": stopped,
            "evaluations": len(self.rows),
            "eval_seconds": round(eval_seconds, 2),
            "train_seconds": round(train_seconds, 2),
        }


def _figures(row: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if row is None else {k: v for k, v in row.items() if k != "seconds"}
