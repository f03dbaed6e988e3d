"""The ``sdtune`` command.

Heavy libraries (torch, diffusers) are imported inside the commands that need them, so ``sdtune --help``
and ``sdtune validate`` start fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from sdtune.core.errors import SdtuneError

app = typer.Typer(
    name="sdtune",
    help="Teach Stable Diffusion models new concepts: embeddings, LoRA family, hypernetworks, DreamBooth, fine-tunes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # one-line errors stay one line


@app.command()
def validate(
    config: Path = typer.Argument(..., help="A training config YAML file."),
    set_: list[str] = typer.Option([], "--set", help="Override a field before validation: --set optimizer.lr=1e-4"),
) -> None:
    """Check a training config without starting anything; print the resolved config."""
    from sdtune.config import dump_yaml, load_train_config

    cfg = load_train_config(config, set_)
    console.print(f"[green]ok[/green] {config}: method {cfg.method}")
    console.print(dump_yaml(cfg), highlight=False, markup=False)


@app.command()
def inspect(path: str = typer.Argument(..., help="A model folder, a .safetensors/.ckpt file, or 'builtin'.")) -> None:
    """Show a model's family, components, dtypes, parameter counts and the hashes UIs display."""
    from sdtune.cli.inspect_view import show

    show(path, console)


def main() -> None:
    """Entry point: run the app, print sdtune errors as one line (exit 2), never a traceback."""
    try:
        app(standalone_mode=False)
    except SdtuneError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click's usage errors arrive here with standalone_mode=False
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
