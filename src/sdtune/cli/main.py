"""The ``sdtune`` command.

Heavy libraries (torch, diffusers) are imported inside the commands that need them, so ``sdtune --help``
and ``sdtune validate`` start fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from sdtune.cli.data_cmds import data_app
from sdtune.cli.lora_cmds import lora_app
from sdtune.core import quiet
from sdtune.core.errors import SdtuneError

quiet.install()  # before torch/transformers/diffusers load: their notices, bars and warnings stay off the console

app = typer.Typer(
    name="sdtune",
    help="Teach Stable Diffusion models new concepts: embeddings, LoRA family, hypernetworks, DreamBooth, fine-tunes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(lora_app, name="lora")
app.add_typer(data_app, name="data")
console = Console(soft_wrap=True)  # paths and messages stay whole lines (copyable); tables still fit the width
err_console = Console(stderr=True, soft_wrap=True)  # one-line errors stay one line


@app.command()
def validate(
    config: Path = typer.Argument(..., help="A training config YAML file."),
    set_: list[str] = typer.Option([], "--set", help="Override a field before validation: --set optimizer.lr=1e-4"),
) -> None:
    """Check a training config without starting anything; print the resolved config."""
    from sdtune.config import dump_yaml, load_train_config

    cfg = load_train_config(config, set_)
    console.print(f"[green]ok[/green] {escape(str(config))}: method {cfg.method}", highlight=False)
    console.print(dump_yaml(cfg), highlight=False, markup=False)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs"), help="Folder for the demo run."),
    steps: int = typer.Option(500, min=1, help="Training steps."),
) -> None:
    """Teach the built-in model a concept it has never seen (an embedding), and show before/after."""
    from sdtune.tools.demo import DemoSettings, run_demo

    report = run_demo(out, DemoSettings(steps=steps), console)
    c, b = report["concept_fidelity"], report["base_accuracy"]
    console.print(f"\n[bold]{escape(report['token'])}[/bold] (a teal heart: never in the base model's training images)")
    console.print(
        f"concept fidelity with the new word: {c['before']:.0%} before training -> [bold]{c['after']:.0%}[/bold] "
        f"after, of {c['n']} images (the base model asked in plain words: {c['words']:.0%})"
    )
    console.print(f"base prompts:     {b['before']:.0%} -> {b['after']:.0%} of {b['n']} images (drift check)")
    for label, path in report["files"].items():
        console.print(f"{label}: {path}", highlight=False, markup=False)
    console.print(f"took {report['seconds']:.0f}s")


@app.command()
def train(
    config: Path = typer.Argument(..., help="A training config YAML, or a run folder to resume."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run folder's latest checkpoint."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: --set train.max_steps=500"),
    allow_config_change: bool = typer.Option(
        False,
        "--allow-config-change",
        help="Resume even if the config changed in a way that breaks the exact resume (batch, seed, data, ...); "
        "the changes are recorded in events.log.",
    ),
) -> None:
    """Train with a config (any method); progress, previews, checkpoints go to runs/<name>/."""
    from sdtune.methods.run import resolve, run

    cfg, resume = resolve(config, set_, resume)
    outputs = run(cfg, resume=resume, console=console, allow_config_change=allow_config_change)
    for path in outputs:
        console.print(f"output: {path}", highlight=False, markup=False)
    if cfg.eval is not None:  # the evaluation's three lines: best step, last step, its cost and the report
        from sdtune.methods.run import run_dir_of
        from sdtune.train.report import read_report, summary_lines

        folder = run_dir_of(cfg)
        report = read_report(folder)
        if report:
            html = folder.root / "report.html"
            for line in summary_lines(report, html if html.is_file() else None):
                console.print(line, highlight=False, markup=False)


@app.command()
def estimate(
    config: Path = typer.Argument(..., help="A training config YAML, or a run folder."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: --set data.batch_size=2"),
    json_: bool = typer.Option(
        False, "--json", help="Print one JSON object (peak_host_bytes, peak_device_bytes, ...)."
    ),
    measure: int = typer.Option(0, "--measure", min=0, help="Also run N real steps and report what they measured."),
) -> None:
    """What a run will cost before it starts: peak memory by part, time per step, and what would make it fit."""
    import json
    import tempfile

    from sdtune.methods.estimate import device_memory, estimate, measure_steps, summary_lines
    from sdtune.methods.run import resolve, run

    cfg, _ = resolve(config, set_)
    result = estimate(cfg)
    if measure:
        with tempfile.TemporaryDirectory(prefix="sdtune-estimate-") as work:
            result.measured = measure_steps(cfg, measure, Path(work), run)
    if json_:
        print(json.dumps(result.as_dict()))
        return
    for line in summary_lines(result, device_memory(result.device)):
        console.print(line, markup=False, highlight=False)
    if result.measured:
        m = result.measured
        console.print(
            f"  measured ({measure} steps): peak host {m['peak_host_bytes'] / 2**30:.2f} GiB, "
            f"{m['seconds_per_step']:.3g} s/step"
            + (f", peak GPU {m['peak_device_bytes'] / 2**30:.2f} GiB" if "peak_device_bytes" in m else ""),
            markup=False,
            highlight=False,
        )


@app.command()
def inspect(path: str = typer.Argument(..., help="A model folder, a .safetensors/.ckpt file, or 'builtin'.")) -> None:
    """Show a model's family, components, dtypes, parameter counts and the hashes UIs display."""
    from sdtune.cli.inspect_view import show

    show(path, console)


@app.command("generate")
def generate_cmd(
    prompts: list[str] = typer.Argument(..., help="One or more prompts."),
    model: str = typer.Option("builtin", help="Model: 'builtin', a diffusers folder or a .safetensors/.ckpt file."),
    n: int = typer.Option(1, min=1, help="Images per prompt (seeds seed, seed+1, ...)."),
    seed: int = typer.Option(0, help="Seed of the first image."),
    steps: int = typer.Option(20, min=1, max=1000, help="Sampling steps."),
    cfg: float = typer.Option(7.0, min=0.0, help="Classifier-free guidance scale."),
    sampler: str = typer.Option("ddim", help="ddim, euler, euler_a or dpmpp_2m."),
    negative: str = typer.Option("", help="Negative prompt."),
    width: int | None = typer.Option(None, help="Width in pixels (default: the model's native size)."),
    height: int | None = typer.Option(None, help="Height in pixels (default: the model's native size)."),
    out: Path = typer.Option(Path("outputs"), help="Output folder for the PNGs (with A1111 infotext) and grid."),
    embedding: list[Path] = typer.Option([], help="Textual-inversion file(s); its name is the word to use in prompts."),
    hypernetwork: list[str] = typer.Option([], help="A1111 hypernetwork file(s): FILE or FILE:strength (default 1)."),
    lora: list[str] = typer.Option([], help="LoRA / LyCORIS file(s): FILE or FILE:weight (default 1)."),
) -> None:
    """Generate images; each PNG carries A1111-style parameters, and a grid.png shows them all."""
    from sdtune.cli.generate_view import run_generate

    run_generate(
        prompts,
        model,
        n,
        seed,
        steps,
        cfg,
        sampler,
        negative,
        width,
        height,
        out,
        console,
        embedding,
        hypernetwork,
        lora,
    )


@app.command("eval")
def eval_cmd(
    path: Path = typer.Argument(..., help="A run folder, or a LoRA / embedding / hypernetwork / checkpoint file."),
    base: str = typer.Option("builtin", help="Files: the model to apply them to ('builtin', a folder or a file)."),
    concept: str | None = typer.Option(None, help="Files on the built-in model: star, teal_heart or night."),
    prompt: list[str] = typer.Option([], help="Concept prompt(s); [name] = --word."),
    prior_prompt: list[str] = typer.Option([], "--prior-prompt", help="Prompt(s) the model should keep (drift)."),
    word: str | None = typer.Option(None, help="How prompts name the concept (trigger / token); embeddings: its word."),
    kind: str | None = typer.Option(None, help="Files: lora, embedding, hypernetwork or model (default: from keys)."),
    clip_model: str | None = typer.Option(None, "--clip-model", help="A local CLIP folder (CLIP-I, CLIP-T)."),
    dino_model: str | None = typer.Option(None, "--dino-model", help="A local DINOv2 folder (DINO, drift)."),
    reference_images: str | None = typer.Option(
        None, "--reference-images", help="The concept's images (CLIP-I / DINO likeness)."
    ),
    strength: float = typer.Option(1.0, help="LoRA weight, hypernetwork multiplier, or a model blended with --base."),
    steps: int = typer.Option(12, min=1, max=1000, help="Files: sampling steps (a run uses its own eval.steps)."),
    seed: int = typer.Option(1000, help="Files: the first image's seed (a run uses its own eval.seed)."),
    resolution: int | None = typer.Option(
        None, min=8, help="Files: image size in pixels (default: the model's native size; a run uses its own)."
    ),
    grid: Path | None = typer.Option(None, help="Also save the evaluation images as one grid PNG here."),
    json_: Path | None = typer.Option(None, "--json", help="Write the figures as JSON to this file."),
) -> None:
    """Score a run's output or any file the way training evaluates: fidelity, adherence, drift, score (points)."""
    import json

    from rich.table import Table

    from sdtune.config.blocks import EvalConfig
    from sdtune.core.atomic import write_text
    from sdtune.tools.evaluate_files import evaluate_file, evaluate_run

    if path.is_dir() and (path / "config.yaml").is_file():
        figures = evaluate_run(path, strength, grid)
    else:
        fields = {"concept": concept, "prompts": prompt, "prior_prompts": prior_prompt, "clip_model": clip_model}
        fields |= {"dino_model": dino_model, "reference_images": reference_images, "steps": steps, "seed": seed}
        from pydantic import ValidationError

        from sdtune.config.errors import config_error

        try:
            e = EvalConfig(**{k: v for k, v in fields.items() if v not in (None, [])})
        except ValidationError as exc:
            raise config_error(exc, EvalConfig) from None
        figures = evaluate_file(path, base, e, word, kind, strength, grid, resolution)
    table = Table("figure", "points", title=str(path))
    for key, value in figures.items():
        table.add_row(key, f"{value:g}")
    console.print(table)
    if json_ is not None:
        write_text(json_, json.dumps(figures, indent=1) + "\n")
        console.print(f"figures: {json_}", highlight=False, markup=False)


@app.command("ui")
def ui_cmd(
    root: list[Path] = typer.Option(
        [], "--root", help="A folder the UI may read and write (repeat for more); default: the current folder."
    ),
    runs: Path | None = typer.Option(None, "--runs", help="Folder of run folders (default: the first root's runs/)."),
    host: str = typer.Option("127.0.0.1", help="Address to serve on; 127.0.0.1 = this machine only."),
    port: int = typer.Option(7860, min=1, max=65535, help="Port to serve on."),
) -> None:
    """Web UI: datasets and captions, training forms from the schemas, live runs, results (needs the ui extra)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SdtuneError("sdtune ui needs gradio; install it with: pip install 'sdtune[ui]'") from None
    from sdtune.ui.app import launch
    from sdtune.ui.paths import Roots

    roots = Roots(root or [Path.cwd()])
    if host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(
            "[yellow]warning:[/yellow] "
            + escape(
                f"serving on {host}: anyone who reaches it can train and read files in {roots.shown()}; the UI has "
                "no login: use --host 127.0.0.1 unless this network is trusted"
            ),
            highlight=False,
        )
    console.print(f"sdtune ui: http://{host}:{port} · folders: {roots.shown()}", highlight=False, markup=False)
    launch(roots, runs, host, port)


builtin_app = typer.Typer(help="The built-in shapes-world base model.", no_args_is_help=True)
app.add_typer(builtin_app, name="builtin")


@builtin_app.command("build")
def builtin_build(
    work_dir: Path = typer.Option(Path(".builtin-build"), help="Where the resumable build state lives."),
    minutes: float = typer.Option(0, help="Stop (resumably) after this many minutes; 0 = run to the end."),
    out: Path | None = typer.Option(None, help="Export folder (default: the package's built-in model folder)."),
) -> None:
    """Train the built-in base model from scratch on the shapes world (resumable; ~40 min on 2 CPU cores)."""
    import time

    import torch

    from sdtune.tools.builtin_build import Build, BuildSettings

    torch.set_num_threads(max(1, torch.get_num_threads()))
    build = Build(work_dir, BuildSettings(), console)
    deadline = time.time() + minutes * 60 if minutes > 0 else float("inf")
    if build.run(deadline):
        path = build.export(out) if out else build.export()
        console.print(f"built-in model written to {path}", highlight=False, markup=False)
    else:
        console.print(f"paused at stage {build.state['stage']} step {build.state['step']}; run again to resume")


@builtin_app.command("dataset")
def builtin_dataset(
    concept: str = typer.Argument(
        ..., help="A held-out concept of the shapes world (teal_heart, star) or a style (night)."
    ),
    out: Path = typer.Argument(..., help="Folder to write images + .txt captions into."),
    n: int = typer.Option(20, min=1, help="Number of images."),
    token: str | None = typer.Option(None, help="Write this token in the captions instead of the concept's words."),
) -> None:
    """Write a built-in concept or style dataset (PNG + .txt sidecar captions) for training."""
    from sdtune.world import CONCEPTS, STYLES, write_concept_dataset, write_style_dataset

    if concept in STYLES and token is None:
        paths = write_style_dataset(concept, out, n=n)
    elif concept in CONCEPTS:
        paths = write_concept_dataset(concept, out, n=n, token=token)
    else:
        choices = ", ".join([*CONCEPTS, *STYLES])
        raise SdtuneError(f"concept: unknown {concept!r}; choose one of {choices} (--token is for concepts only)")
    console.print(f"wrote {len(paths)} images with captions to {out}", highlight=False, markup=False)


def _usage_error_classes() -> tuple[type[Exception], ...]:
    """The click exception classes a command line can raise: typer's vendored click (typer >= 0.20) and real click."""
    from typer._click.exceptions import ClickException as TyperClickException

    classes: list[type[Exception]] = [TyperClickException]
    try:
        import click

        classes.append(click.ClickException)
    except ImportError:  # typer no longer needs click; it may be absent
        pass
    return tuple(classes)


def _print_error(message: str) -> None:
    """``error: <message>`` as one line on stderr; the message is printed literally (``[name]`` stays ``[name]``)."""
    err_console.print(Text.assemble(("error:", "red"), " ", " ".join(message.split())), highlight=False)


def main() -> None:
    """Entry point: run the app, print sdtune errors and usage errors as one line (exit 2), never a traceback."""
    try:
        code = app(standalone_mode=False, prog_name="sdtune")  # "Try 'sdtune train --help'" also under python -m
        if isinstance(code, int) and code:  # a command's typer.Exit(n): click returns n without standalone mode
            sys.exit(code)
    except SdtuneError as exc:
        _print_error(str(exc))
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        _print_error("aborted")
        sys.exit(1)
    except Exception as exc:  # click's usage errors arrive here with standalone_mode=False
        if not isinstance(exc, _usage_error_classes()):
            raise
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group (`sdtune lora`): its help, not an error
            if help_text := exc.format_message().strip():  # with rich installed typer has printed it already
                console.print(help_text, markup=False, highlight=False)
            sys.exit(0)
        message = " ".join(exc.format_message().split()).rstrip()
        if not message.endswith((".", "!", "?")):
            message += "."
        hint = f" Try '{ctx.command_path} --help'." if ctx is not None else ""
        _print_error(f"{message}{hint}")
        sys.exit(getattr(exc, "exit_code", 2) or 2)  # usage errors: 2


if __name__ == "__main__":
    main()
