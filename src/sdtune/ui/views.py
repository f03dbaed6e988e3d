"""What the Runs and Results pages show, read from a run folder: loss curve, evaluation figures, previews, logs,
outputs, numbers and the run's ``report.html`` (:mod:`sdtune.train.report`).

Only files of the run folder contract (:mod:`sdtune.train.rundir`) are read, so a run started on the command
line looks the same as one started from the UI. "Generate with this" applies the run's output to its base model
at a strength with :mod:`sdtune.tools.apply_outputs` (what ``sdtune generate --lora/--hypernetwork/--embedding``
uses), loads the model for that one call and lets it go.
"""

from __future__ import annotations

import gc
import html
import io
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from sdtune.config import load_train_config
from sdtune.config.methods import RunBase
from sdtune.core.errors import SdtuneError
from sdtune.inference.infotext import parse_infotext
from sdtune.train import report as run_report
from sdtune.train.listeners import format_speed
from sdtune.train.plots import smooth
from sdtune.train.rundir import RunDir
from sdtune.ui.jobs import LOG_FILE, RunStatus

_STEP = re.compile(r"^step-(\d+)$")


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def status_markdown(status: RunStatus) -> str:
    """One paragraph: state, step / max, it/s, ETA, checkpoints, and the reason or error."""
    parts = [f"**{status.name}** ({status.method}): **{status.state}**", f"step {status.step} / {status.max_steps}"]
    if status.steps_per_second:
        parts.append(format_speed(status.steps_per_second))  # 3 significant digits; s/step below 1 it/s
    if status.eta_seconds is not None:
        parts.append(f"ETA {_format_seconds(status.eta_seconds)}")
    if status.pid is not None:
        parts.append(f"pid {status.pid}")
    text = " · ".join(parts)
    shown = ", ".join(f"step-{s}" for s in status.checkpoints) or "none yet"
    text += f"\n\ncheckpoints: {shown}"
    if status.message:
        text += f"\n\n{status.message}"
    return text


def loss_plot(run_root: Path) -> Image.Image | None:
    """The loss curve (raw, smoothed, validation if logged) as an image; None before the first step."""
    rows = [r for r in RunDir(run_root).metrics() if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
    every = max(1, len(rows) // 4000)  # a long run: plot every k-th point (redrawn once a second while live)
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    ax.plot(steps[::every], losses[::every], color="#9ab", linewidth=0.8, label="loss")
    ax.plot(steps[::every], smooth(losses)[::every], color="#136", linewidth=1.6, label="smoothed")
    validation = [(r["step"], r["validation_loss"]) for r in rows if r.get("validation_loss") is not None]
    if validation:
        ax.plot(*zip(*validation, strict=True), "o-", color="#c52", markersize=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{run_root.name}: step {steps[-1]}")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer)


def eval_plot(run_root: Path) -> Image.Image | None:
    """The evaluation figures (``eval.jsonl``) against the step, the best step marked once ``report.json`` names
    it; None before the first evaluation."""
    return run_report.eval_plot(RunDir(run_root))


def eval_signature(run_root: Path) -> list:
    """What the evaluation plot is drawn from (size and time of ``eval.jsonl`` and ``report.json``): redraw only
    when it changes."""
    out: list = []
    for name in (run_report.EVAL_LOG, run_report.REPORT_JSON):
        try:
            s = (Path(run_root) / name).stat()
            out += [s.st_size, s.st_mtime_ns]
        except OSError:
            out += [None, None]
    return out


def sample_steps(run_root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the preview folders ``samples/step-N`` that hold a finished ``grid.png``, by step."""
    samples = RunDir(run_root).samples
    found = []
    if samples.is_dir():
        for folder in samples.iterdir():
            m = _STEP.match(folder.name)
            if m and (folder / "grid.png").is_file():
                found.append((int(m.group(1)), folder))
    return sorted(found)


def preview_gallery(run_root: Path) -> list[tuple[str, str]]:
    """Preview grids, newest first, captioned with their step."""
    return [(str(folder / "grid.png"), f"step {step}") for step, folder in reversed(sample_steps(run_root))]


_DEBUG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d debug ", re.MULTILINE)


def log_text(run_root: Path, limit: int = 12_000) -> str:
    """The run's event log without its ``debug`` lines (third-party notices, kept in events.log for whoever
    debugs), then the tail of the job's console output (errors show there)."""
    run = RunDir(run_root)
    events = "".join(
        line for line in _tail(run.events_path, 4 * limit).splitlines(keepends=True) if not _DEBUG_LINE.match(line)
    )[-limit:]
    console = _tail(run_root / LOG_FILE, limit // 2)
    text = events or "(no events yet)"
    if console.strip():
        text += "\n\n--- console (ui.log) ---\n" + console
    return text


def _tail(path: Path, limit: int) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


# -- results ----------------------------------------------------------------------------------------------------


@dataclass
class Results:
    before: str | None = None  # grid.png before training (step 0) or the earliest preview
    after: str | None = None  # the latest preview grid
    before_label: str = ""
    after_label: str = ""
    files: list[str] = field(default_factory=list)  # output/ files to download, then report.html
    folders: list[str] = field(default_factory=list)  # output/ folders (diffusers layouts)
    numbers: list[list] = field(default_factory=list)  # [what, before, after]
    evaluation: list[list] = field(default_factory=list)  # [figure, base, best, last] (EVALUATION_HEADERS)
    report: str | None = None  # report.html, if the run wrote one
    report_html: str = ""  # the gr.HTML value showing it

    def message(self) -> str:
        outputs = len(self.files) - (self.report is not None)
        text = f"{outputs} output files"
        if self.folders:
            text += f" · folders: {', '.join(f'`{Path(f).name}/`' for f in self.folders)}"
        if self.report is not None:
            text += " · report: `report.html`"
        return text


EVALUATION_HEADERS = ["figure", "base", "best", "last"]


def results(run_root: Path) -> Results:
    """Before/after grids, numbers and output files of a run."""
    run = RunDir(run_root)
    out = Results()
    steps = sample_steps(run_root)
    if steps:
        (first, first_dir), (last, last_dir) = steps[0], steps[-1]
        out.before, out.before_label = str(first_dir / "grid.png"), f"before (step {first})"
        if last != first:
            out.after, out.after_label = str(last_dir / "grid.png"), f"after (step {last})"
    if run.output.is_dir():
        for item in sorted(run.output.iterdir()):
            (out.folders if item.is_dir() else out.files).append(str(item))
    out.numbers = numbers(run_root, steps)
    out.evaluation = evaluation_numbers(run_root)
    page = run.root / run_report.REPORT_HTML
    if page.is_file():
        out.report = str(page)
        out.files.append(out.report)
        out.report_html = report_view(run_root)
    return out


def evaluation_numbers(run_root: Path) -> list[list]:
    """Rows [figure, base, best, last] of the evaluations: the first row is the step of each, then every figure.

    base: the first evaluation (step 0, the model before training); best and last: ``report.json``'s (a run still
    going has no best yet, and its last is the latest evaluation). Empty without evaluations."""
    run = RunDir(run_root)
    rows = run_report.eval_rows(run)
    found = run_report.read_report(run) or {}
    base = rows[0] if rows else None
    best_step = run_report.best_step(found)
    best = {**(found.get("best") or {}), "step": best_step} if best_step is not None else None
    last_step = found.get("last_step")
    if isinstance(last_step, int) and isinstance(found.get("last"), dict):
        last = {**found["last"], "step": last_step}
    else:
        last = rows[-1] if rows else None
    columns = [base, best, last]
    present = [c for c in columns if c]
    if not present:
        return []
    out = [["step", *(str(c["step"]) if c and isinstance(c.get("step"), int) else "-" for c in columns)]]
    for key in run_report.figure_keys(present):
        label = f"{key} (lower = better)" if key == "drift" else key
        out.append([label, *(_point(c.get(key)) if c else "-" for c in columns)])
    return out


def _point(value) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def report_view(run_root: Path, height: int = 900) -> str:
    """``report.html`` in a sandboxed iframe (its own page, no scripts), the value of a ``gr.HTML``; "" without it."""
    try:
        page = (Path(run_root) / run_report.REPORT_HTML).read_text(encoding="utf-8")
    except OSError:
        return ""
    return (
        f'<iframe title="report" sandbox="" srcdoc="{html.escape(page, quote=True)}" '
        f'style="width: 100%; height: {int(height)}px; border: 1px solid #ddd; background: #fff;"></iframe>'
    )


def numbers(run_root: Path, steps: list[tuple[int, Path]] | None = None) -> list[list]:
    """Rows [measure, before, after]: loss at the start and end (mean of 10 steps), validation loss, and on the
    built-in model what the shapes-world scorer reads in each preview image before and after training."""
    rows: list[list] = []
    metrics = [r for r in RunDir(run_root).metrics() if "loss" in r]
    if metrics:
        head, tail = metrics[:10], metrics[-10:]
        mean = sum(r["loss"] for r in head) / len(head), sum(r["loss"] for r in tail) / len(tail)
        rows.append(["loss (mean of 10 steps)", f"{mean[0]:.4f}", f"{mean[1]:.4f}"])
        validation = [r["validation_loss"] for r in metrics if r.get("validation_loss") is not None]
        if validation:
            rows.append(["validation loss", f"{validation[0]:.4f}", f"{validation[-1]:.4f}"])
    steps = sample_steps(run_root) if steps is None else steps
    cfg = _config(run_root)
    if cfg is not None and cfg.model.base == "builtin" and len(steps) >= 2:
        from sdtune.world import score_image

        before, after = steps[0][1], steps[-1][1]
        for image in sorted(p for p in after.glob("*.png") if p.name != "grid.png"):
            earlier = before / image.name
            prompt = _prompt_of(image)
            readings = [_reading(score_image, p) if p.is_file() else "-" for p in (earlier, image)]
            rows.append([f"scorer reads: {prompt}", *readings])
    return rows


def _reading(score_image, path: Path) -> str:
    with Image.open(path) as im:
        r = score_image(im.convert("RGB"))
    return " ".join(x or "?" for x in (r.fg, r.shape, "on", r.bg))


def _prompt_of(path: Path) -> str:
    with Image.open(path) as im:
        text = im.info.get("parameters", "")
    return parse_infotext(text)[0] if text else path.name


def _config(run_root: Path) -> RunBase | None:
    try:
        return load_train_config(RunDir(run_root).config_path)
    except SdtuneError:
        return None


# -- generate with this -----------------------------------------------------------------------------------------


def default_prompt(run_root: Path) -> str:
    cfg = _config(run_root)
    if cfg is None:
        return ""
    word = getattr(cfg, "token", None) or getattr(cfg, "instance_token", None) or cfg.name
    if cfg.preview.prompts:
        return cfg.preview.prompts[0].replace("[name]", word)
    return f"a {word} on a blue background" if cfg.model.base == "builtin" else f"a photo of {word}"


def generate_with(
    run_root: Path, prompt: str, seed: int, strength: float = 1.0, steps: int = 20, out_dir: Path | None = None
) -> list[str]:
    """Generate 1 image with the run's output applied at ``strength`` (LoRA weight, hypernetwork multiplier, whole
    model blended with its base; 0 = the base model; embeddings have no strength) and return the PNG paths (A1111
    infotext inside), written to ``out_dir`` or a new temporary folder."""
    if not prompt.strip():
        raise SdtuneError("prompt: empty; write what to draw, with the trained word")
    from sdtune.inference.generate import GenerationSettings, generate, infotext, save_images
    from sdtune.tools.apply_outputs import load_with_output, run_output

    output = run_output(run_root)
    model, prompts = load_with_output(output, float(strength), [prompt])
    try:
        settings = GenerationSettings(steps=int(steps))
        images = generate(model, prompts, [int(seed)], settings)
        name = "sdtune-builtin" if output.base == "builtin" else Path(output.base).stem
        info = infotext(model, prompt, int(seed), settings, None, name)
    finally:
        del model
        gc.collect()
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="sdtune-ui-generate-"))
    return [str(p) for p in save_images(images, [info], out)]
