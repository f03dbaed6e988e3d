"""Resuming with an edited config: name every changed field, and refuse the ones that break the exact resume.

An uninterrupted run and a run killed and resumed give bit-equal weights (see :mod:`sdtune.train.loop`), but only
if the remaining steps compute what they would have computed. The rule is an allowlist: a field may change on
resume only if it changes what is saved, previewed or logged, or when training stops (:data:`HARMLESS`). Every
other field (batch size, accumulation, seed, data and captions, method, model, adapter shape, optimizer and
schedule, precision, ... and any field added later) changes the remaining steps, so a change is refused unless
the user passes ``--allow-config-change``, which is then recorded in ``events.log``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sdtune.config import MethodConfig, load_yaml, parse_config
from sdtune.config.methods import RunBase
from sdtune.core.errors import ConfigError, SdtuneError
from sdtune.train.rundir import RunDir

# Dotted fields (or "block." prefixes) whose change leaves every remaining training step the same.
HARMLESS: tuple[str, ...] = (
    "name",  # the run folder is found by name and output_dir: a different spelling of the same folder
    "output_dir",
    "train.max_steps",  # when training stops (a decaying schedule then spans the new length: noted when printed)
    "train.validation_every_n_steps",  # the held-out loss is measured, never trained on
    "train.validation_timesteps",
    "train.gradient_checkpointing",  # recomputes activations instead of storing them: memory only
    "save.",  # checkpoint cadence, how many are kept, the export dtype
    "preview.",  # preview images only
    "eval",  # evaluation measures the weights users get, never trains them (on or off: `eval`, its fields: `eval.`)
    "eval.",
)
_MISSING = object()


@dataclass(frozen=True)
class Change:
    """One field that differs between the stored config and the new one."""

    field: str
    old: Any
    new: Any

    @property
    def harmless(self) -> bool:
        return any(self.field == h or (h.endswith(".") and self.field.startswith(h)) for h in HARMLESS)

    def __str__(self) -> str:
        return f"{self.field} {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    return "(unset)" if value is _MISSING else json.dumps(value, ensure_ascii=False)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {prefix + key: value})
    return flat


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every dotted field whose value differs (lists compare whole), in the new config's order."""
    a, b = _flatten(old), _flatten(new)
    keys = list(b) + [k for k in a if k not in b]
    return [Change(k, a.get(k, _MISSING), b.get(k, _MISSING)) for k in keys if a.get(k, _MISSING) != b.get(k, _MISSING)]


def stored_config(run: RunDir) -> tuple[dict[str, Any], str] | None:
    """The config the run's latest checkpoint was trained with, with defaults filled in, and where it came from.

    A checkpoint holds its own ``config.yaml`` (so an edit of the run folder's ``config.yaml`` is still seen as a
    change); older checkpoints fall back to the run folder's file."""
    latest = run.latest_checkpoint()
    if latest is None:
        return None
    path = latest.path / "config.yaml"
    if not path.is_file():
        path = run.config_path
        if not path.is_file():
            return None
    data = load_yaml(path)
    try:  # filled with today's defaults, so a field added since then is not reported as a change
        data = parse_config(data, MethodConfig).model_dump(mode="json")
    except SdtuneError:
        pass  # written by another version: compare the file as it is
    return data, str(path)


def check_resume(run: RunDir, cfg: RunBase, allow: bool = False) -> list[Change]:
    """The changes between the run's stored config and ``cfg``; a one-line :class:`ConfigError` if any of them
    breaks the exact resume and ``allow`` is not set."""
    stored = stored_config(run)
    if stored is None:
        return []
    old, where = stored
    changes = config_changes(old, cfg.model_dump(mode="json"))
    breaking = [c for c in changes if not c.harmless]
    if breaking and not allow:
        others = [c for c in changes if c.harmless]
        also = f" (also changed: {', '.join(map(str, others))})" if others else ""
        raise ConfigError(
            f"{', '.join(map(str, breaking))}: changed since the checkpoint was written ({where}){also}; these change "
            f"what the remaining steps compute, so the run would no longer resume exactly. Resume with the stored "
            f"config (sdtune train {run.root}), or pass --allow-config-change to train on with the changes"
        )
    return changes


def describe(changes: list[Change], cfg: RunBase, allowed: bool) -> str:
    """The line printed and written to ``events.log`` when a resume goes ahead with changes."""
    text = ", ".join(map(str, changes))
    if any(c.field == "train.max_steps" for c in changes) and cfg.schedule.name not in (
        "constant",
        "constant_with_warmup",
    ):
        text += f" (the {cfg.schedule.name} schedule now spans {cfg.train.max_steps} steps)"
    flag = " (--allow-config-change)" if allowed and any(not c.harmless for c in changes) else ""
    return f"resuming with a changed config{flag}: {text}"
