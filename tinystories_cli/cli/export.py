"""`tslm export`: a trained run as a Hugging Face Llama directory or as plain safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinystories_cli import export, runs
from tinystories_cli.console import console, human_bytes, print_note
from tinystories_cli.errors import UserError
from tinystories_cli.interop.llama import NotLlamaCompatible


def command(
    run: Annotated[
        str | None,
        typer.Argument(help="Run name, run directory or checkpoint file (default: runs/latest).", show_default=False),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="hf (transformers LlamaForCausalLM or GPT2LMHeadModel + tokenizer.json) | "
            "safetensors (tslm's own format) | gguf (one file for llama.cpp / ollama).",
        ),
    ] = "hf",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output directory (created; replaced only with --force); for gguf the .gguf file.",
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="Weight dtype: float32 | bfloat16 | float16; gguf: f32 | f16 | q8_0.")
    ] = "float32",
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it holds an earlier export.")] = False,
) -> None:
    """Export a trained model for transformers/tokenizers (--format hf), llama.cpp (--format gguf),
    or as plain safetensors weights + config."""
    if out is None:
        raise UserError("missing --out", "pass the directory to write, e.g. --out exports/my-model")
    if fmt not in export.FORMATS:
        raise UserError(f"unknown --format {fmt!r}", f"choose one of: {', '.join(export.FORMATS)}")
    if fmt == "gguf":
        dtype = export.gguf_type(dtype)
    elif dtype not in export.DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}", f"choose one of: {', '.join(export.DTYPES)}")
    from tinystories_cli.cli.encode import stopped_cleanly
    from tinystories_cli.tokenizer.chunking import signals_raise

    try:
        with signals_raise(), stopped_cleanly():  # SIGTERM/SIGINT: the temporary directory is removed
            path, cfg = export.export_run(run, fmt, out, force, dtype)
    except NotLlamaCompatible as e:
        raise UserError(e.what, "export with --format safetensors (tslm's own format) instead") from None
    print_note(runs.describe_source(run))
    if fmt == "gguf":
        console.print(f"wrote {path} (gguf {dtype}, {human_bytes(path.stat().st_size)})", markup=False, highlight=False)
        print_note(f"run it with llama.cpp: llama-cli -m {path} -p \"Once upon a time\" -n 128 --temp 0")
        return
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    console.print(f"wrote {path} ({fmt}, {human_bytes(size)}): " + ", ".join(sorted(
        str(f.relative_to(path)) for f in path.rglob("*") if f.is_file())), markup=False, highlight=False)
    if fmt == "hf":
        print_note(f"load it with: transformers.AutoModelForCausalLM.from_pretrained({str(path)!r}) and "
                   f"AutoTokenizer.from_pretrained({str(path)!r}); needs: pip install transformers tokenizers")
