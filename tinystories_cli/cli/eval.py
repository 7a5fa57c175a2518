"""`tslm eval`: loss, perplexity and bits-per-byte of a trained model over a whole token file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tinystories_cli.console import console, err_console
from tinystories_cli.errors import UserError
from tinystories_cli.evaluate import evaluate_run
from tinystories_cli.fileio import atomic_write_text, check_output_path
from tinystories_cli.run_readme import write_run_readme


def command(
    run: Annotated[Optional[str], typer.Argument(help="Run name, run directory or checkpoint file (default: runs/latest).", show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Token file (default: the run's data/<dataset>/valid.npy).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 16,
    ctx: Annotated[Optional[int], typer.Option("--ctx", "--context-length", help="Window length (default and maximum: the model's context length).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (cuda > mps > cpu), cpu, cuda, mps.")] = "auto",
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the JSON here (default: <run>/eval_<data>.json).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON only.")] = False,
    latest: Annotated[bool, typer.Option("--latest", help="Use the latest step checkpoint instead of the best one.")] = False,
) -> None:
    """Mean loss, perplexity and bits-per-byte over a whole token file, in non-overlapping windows."""
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    if ctx is not None and ctx <= 0:
        raise UserError(f"--ctx must be positive, got {ctx}", "omit it to use the model's context length")
    if out is not None:
        check_output_path(out, force)
    with Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err_console, transient=True, disable=as_json) as progress:
        task = progress.add_task("eval", total=None)
        result = evaluate_run(run, data, batch_size=batch_size, context_length=ctx, device=device, latest=latest,
                              on_progress=lambda done, n: progress.update(task, completed=done, total=n))
    run_dir, ckpt_path, data, window = Path(result["run"]), result["checkpoint"], result["data"], result["context_length"]
    dest = out or run_dir / f"eval_{Path(data).stem}.json"
    atomic_write_text(dest, json.dumps(result, indent=2) + "\n")
    if out is None:
        write_run_readme(run_dir)  # refresh the run's README with the new bits-per-byte
    if as_json:
        console.print_json(json.dumps(result))
        return
    t = Table(title=f"{ckpt_path} (step {result['step']}) on {data}", title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("mean loss (nats/token)", f"{result['loss']:.4f}")
    t.add_row("perplexity", f"{result['perplexity']:.3f}")
    bpb = result["bits_per_byte"]
    t.add_row("bits per byte", f"{bpb:.4f}" if bpb is not None else "n/a (no source_bytes in the sidecar)")
    t.add_row("tokens predicted", f"{result['predicted_tokens']:,}")
    t.add_row("windows", f"{result['windows']:,} x {window}")
    console.print(t)
    console.print(f"wrote {dest}")
