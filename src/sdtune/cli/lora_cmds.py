"""``sdtune lora ...``: merge LoRAs into a model, resize, extract, convert and inspect LoRA files.

Each command is a thin layer over :mod:`sdtune.tools.lora_tools`; torch and the tools are imported inside the
commands so ``sdtune --help`` stays fast. Errors are :class:`~sdtune.core.errors.SdtuneError`\\ s, which
``sdtune.cli.main`` prints as one line (exit code 2).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from sdtune.core.errors import SdtuneError

lora_app = typer.Typer(
    help="LoRA files: merge into a model, resize, extract, convert, inspect, check.", no_args_is_help=True
)
console = Console(soft_wrap=True)  # paths and messages stay whole lines (copyable); tables still fit the width
DTYPES = ("fp16", "bf16", "fp32")


def _dtype(name: str):
    from sdtune.core.dtypes import TORCH_DTYPES

    if name not in TORCH_DTYPES:
        raise SdtuneError(f"--dtype {name}: use one of {', '.join(DTYPES)}")
    return TORCH_DTYPES[name]


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """``file.safetensors:0.5`` -> ``("file.safetensors", 0.5)``; no ``:number`` suffix means weight 1."""
    path, sep, weight = arg.rpartition(":")
    if sep:
        try:
            return path, float(weight)
        except ValueError:
            pass  # a ':' inside the path (C:\...), not a weight
    return arg, 1.0


def _report(reports, what: str) -> None:
    if not reports:
        return
    kept = [r.retained for r in reports]
    ranks = sorted({r.rank for r in reports})
    console.print(
        f"{what} {len(reports)} modules at rank {', '.join(map(str, ranks))}; Frobenius norm kept: "
        f"min {min(kept):.4f}, mean {sum(kept) / len(kept):.4f}",
        highlight=False,
    )


@lora_app.command("merge")
def merge(
    base: str = typer.Argument(..., help="Base model: a diffusers folder, a .safetensors/.ckpt file or 'builtin'."),
    loras: list[str] = typer.Argument(..., help="LoRA files, each optionally with a weight: file.safetensors:0.7"),
    out: Path = typer.Option(..., "--out", help="Output file (single_file) or folder (diffusers)."),
    layout: str = typer.Option("single_file", help="single_file or diffusers."),
    dtype: str = typer.Option("fp16", help="Saved precision: fp16, bf16 or fp32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    strength_as: str = typer.Option(
        "a1111", "--strength-as", help="How a weight scales OFT/BOFT: a1111 (W + w(W'-W)) or comfyui (its formulas)."
    ),
) -> None:
    """Merge LoRAs into a model, one after another (kohya merge_lora.py), and save it."""
    from sdtune.tools.lora_tools import merge_loras

    pairs = [parse_lora_arg(a) for a in loras]
    path = merge_loras(base, pairs, out, layout, _dtype(dtype), overwrite, strength_as)  # type: ignore[arg-type]
    console.print(f"merged {len(pairs)} LoRA(s) into {path}", highlight=False, markup=False)


@lora_app.command("resize")
def resize(
    file: Path = typer.Argument(..., help="A LoRA, LoCon or DoRA .safetensors file."),
    rank: int = typer.Option(..., "--rank", min=1, help="New rank."),
    out: Path = typer.Option(..., "--out", help="Output file."),
    conv_rank: int | None = typer.Option(None, "--conv-rank", min=1, help="New rank of k x k convolutions."),
) -> None:
    """Resize a LoRA's rank by SVD (kohya resize_lora.py)."""
    from sdtune.tools.lora_tools import resize_lora

    _report(resize_lora(file, rank, out, conv_rank), "resized")
    console.print(f"wrote {out}", highlight=False, markup=False)


@lora_app.command("extract")
def extract(
    base: str = typer.Argument(..., help="The base model."),
    tuned: str = typer.Argument(..., help="The fine-tuned model."),
    rank: int = typer.Option(..., "--rank", min=1, help="Rank of the extracted LoRA."),
    out: Path = typer.Option(..., "--out", help="Output .safetensors file."),
    conv_rank: int | None = typer.Option(None, "--conv-rank", min=1, help="Also extract convolutions (LoCon)."),
    targets: str = typer.Option("attention_ff", help="attention, attention_ff or all."),
) -> None:
    """Extract a LoRA from the difference of two models (kohya extract_lora_from_models.py)."""
    from sdtune.tools.lora_tools import extract_lora

    _report(extract_lora(base, tuned, rank, out, conv_rank, targets), "extracted")
    console.print(f"wrote {out}", highlight=False, markup=False)


@lora_app.command("convert")
def convert(
    file: Path = typer.Argument(..., help="A LoRA .safetensors file."),
    to: str = typer.Option(..., "--to", help="kohya (A1111, ComfyUI) or peft (diffusers load_lora_weights)."),
    out: Path = typer.Option(..., "--out", help="Output file."),
    base: str | None = typer.Option(
        None, help="The model it is for (module names; a DoRA to peft needs its weights); default: the real model."
    ),
) -> None:
    """Convert a LoRA file between the kohya/LyCORIS and diffusers PEFT layouts."""
    from sdtune.tools.lora_tools import convert_lora

    console.print(f"wrote {convert_lora(file, to, out, base)}", highlight=False, markup=False)  # type: ignore[arg-type]


@lora_app.command("inspect")
def inspect(file: Path = typer.Argument(..., help="A LoRA .safetensors file.")) -> None:
    """Show a LoRA file's layout, algorithm, ranks, modules and metadata."""
    from rich.table import Table
    from rich.text import Text

    from sdtune.formats.lora_files import lora_summary

    if not file.is_file():
        raise SdtuneError(f"{file}: no such file")
    try:
        s = lora_summary(file)
    except SdtuneError:
        raise
    except Exception as exc:  # safetensors' own errors for files of another kind
        raise SdtuneError(f"{file}: not a LoRA .safetensors file ({str(exc)[:100]})") from None
    components = ", ".join(f"{c} {n}" for c, n in sorted(s["components"].items()))
    console.print(str(file), style="bold", highlight=False, markup=False)
    console.print(
        f"layout: {s['layout']}  algo: {s['algo']}  rank: {', '.join(map(str, s['ranks'])) or '-'}", highlight=False
    )
    alphas = ", ".join(f"{a:g}" for a in s["alphas"]) or "-"
    console.print(f"alpha: {alphas}  modules: {s['modules']} ({components})  tensors: {s['tensors']}", highlight=False)
    if s["metadata"]:
        table = Table("metadata", "value", show_lines=False)
        for key, value in sorted(s["metadata"].items()):
            table.add_row(Text(key), Text(value if len(value) <= 100 else value[:97] + "..."))  # as written
        console.print(table)


@lora_app.command("check")
def check(
    file: Path = typer.Argument(..., help="A LoRA .safetensors file (sdtune's, kohya/LyCORIS or diffusers PEFT)."),
    for_: str = typer.Option("all", "--for", help="a1111, comfyui, invoke, diffusers, or all (comma-separated)."),
    examples: int = typer.Option(5, "--examples", min=0, help="Ignored keys to list per target."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Would A1111 / ComfyUI / InvokeAI / diffusers load every key? Exit 1 if any target drops or misapplies one."""
    import json

    from rich.table import Table
    from rich.text import Text

    from sdtune.tools import lora_check

    result = lora_check.check_file(file, lora_check.parse_targets(for_))
    if as_json:
        print(json.dumps(lora_check.as_json(result, examples), indent=2))
    else:
        console.print(
            Text(f"{file}  ({result['family']}, {result['layout']} layout, {result['algo']})", style="bold"),
            highlight=False,
        )
        table = Table("target", "status", "mapped", "ignored", "issues")
        for target, report in result["targets"].items():
            status = Text("ok", "green") if report.ok else Text("refused" if report.error else "PROBLEMS", "red")
            notes = [report.error] if report.error else report.issues
            table.add_row(target, status, str(len(report.mapped)), str(len(report.ignored)), Text("\n".join(notes)))
        console.print(table)
        for target, report in result["targets"].items():
            for key in report.ignored[:examples] if not report.error else []:
                console.print(f"{target} ignores: {key}", highlight=False, markup=False)
    if not result["ok"]:
        raise typer.Exit(1)
