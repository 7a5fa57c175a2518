"""`tslm eval`: loss, perplexity and bits-per-byte of a trained model over a whole token file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from tinystories_cli.cli import common
from tinystories_cli.console import console, err_console
from tinystories_cli.errors import UserError
from tinystories_cli.evaluate import evaluate_run, position_buckets
from tinystories_cli.fileio import atomic_write_bytes, atomic_write_text, check_output_path, strict_json
from tinystories_cli.plot import figure_png, pyplot
from tinystories_cli.run_readme import write_run_readme

# the command's options, one alias each (keeps the signature one line per parameter)
RunArg = Annotated[
    str | None,
    typer.Argument(help="Run name, run directory or checkpoint file (default: runs/latest).", show_default=False),
]
DataOpt = Annotated[
    Path | None, typer.Option("--data", help="Token file (default: the run's data/<dataset>/valid.npy).")
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")]
CtxOpt = Annotated[
    int | None,
    typer.Option(
        "--ctx", "--context-length", help="Window length (default and maximum: the model's context length)."
    ),
]
OutOpt = Annotated[
    Path | None, typer.Option("--out", help="Write the JSON here (default: <run>/eval_<data>.json).")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite --out and --plot if they exist.")]
AsJsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON only.")]
LatestOpt = Annotated[
    bool, typer.Option("--latest", help="Use the latest step checkpoint instead of the best one.")
]
PerPositionOpt = Annotated[
    bool,
    typer.Option(
        "--per-position",
        help="Also report the loss by position in the context window (a table of position buckets; "
        "position_nats/position_tokens/position_buckets in the JSON).",
    ),
]
BucketsOpt = Annotated[int, typer.Option("--buckets", help="Position buckets in the --per-position table.")]
PlotOpt = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        help="Write a PNG of the loss at every position here (implies --per-position; needs matplotlib).",
        show_default=False,
    ),
]


def command(
    run: RunArg = None,
    data: DataOpt = None,
    batch_size: BatchSizeOpt = 16,
    ctx: CtxOpt = None,
    device: common.Device = "auto",
    out: OutOpt = None,
    force: ForceOpt = False,
    as_json: AsJsonOpt = False,
    latest: LatestOpt = False,
    per_position: PerPositionOpt = False,
    buckets: BucketsOpt = 8,
    plot: PlotOpt = None,
) -> None:
    """Mean loss, perplexity and bits-per-byte over a whole token file, in non-overlapping windows.

    With --per-position, also the loss by position in the window: the direct check of what the model does with a longer context (RoPE / NoPE / learned / sinusoidal ablations).
    """  # noqa: E501 (one line per paragraph: the help renderer keeps line breaks)
    _check_args(batch_size, ctx, buckets, out, plot, force)
    per_position = per_position or plot is not None
    with Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err_console, transient=True, disable=as_json) as progress:
        task = progress.add_task("eval", total=None)
        result = evaluate_run(run, data, batch_size=batch_size, context_length=ctx, device=device, latest=latest,
                              on_progress=lambda done, n: progress.update(task, completed=done, total=n),
                              per_position=per_position)
    if per_position:
        result["position_buckets"] = position_buckets(result["position_nats"], result["position_tokens"], buckets)
    dest = _write(result, out, plot)
    if as_json:
        console.print_json(strict_json(result))
        return
    _render(result, per_position)
    console.print(f"wrote {dest}")
    if plot is not None:
        console.print(f"wrote {plot}")


def _check_args(batch_size: int, ctx: int | None, buckets: int, out: Path | None, plot: Path | None,
                force: bool) -> None:
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    if ctx is not None and ctx <= 0:
        raise UserError(f"--ctx must be positive, got {ctx}", "omit it to use the model's context length")
    if buckets <= 0:
        raise UserError(f"--buckets must be positive, got {buckets}")
    if out is not None:
        check_output_path(out, force)
    if plot is not None:
        check_output_path(plot, force)
        if plot.suffix.lower() != ".png":
            raise UserError(f"--plot writes a PNG; got {plot}", "name the file *.png")
        pyplot()  # fail now, not after the evaluation, when matplotlib is missing


def _write(result: dict, out: Path | None, plot: Path | None) -> Path:
    """The JSON (at --out, else beside the run, refreshing its README) and the --plot PNG; returns the JSON's path."""
    run_dir, data = Path(result["run"]), result["data"]
    dest = out or run_dir / f"eval_{Path(data).stem}.json"
    atomic_write_text(dest, strict_json(result, indent=2) + "\n")
    if out is None:
        write_run_readme(run_dir)  # refresh the run's README with the new bits-per-byte
    if plot is not None:
        atomic_write_bytes(plot, _position_png(result, f"{run_dir.name} (step {result['step']}) on {Path(data).name}"))
    return dest


def _render(result: dict, per_position: bool) -> None:
    # What was loaded, on one line the terminal wraps (a table title broke file names mid-word).
    console.print(Text(f"using {result['checkpoint']} (step {result['step']}) of run {Path(result['run'])}, "
                       f"on {result['data']}", style="dim"), soft_wrap=True)
    t = Table()
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("whole-file loss (nats/token)", f"{result['loss']:.4f}")
    t.add_row("perplexity", f"{result['perplexity']:.3f}")
    bpb = result["bits_per_byte"]
    t.add_row("bits per byte", f"{bpb:.4f}" if bpb is not None else "n/a (no source_bytes in the sidecar)")
    t.add_row("tokens predicted", f"{result['predicted_tokens']:,}")
    t.add_row("windows", f"{result['windows']:,} x {result['context_length']}")
    console.print(t)
    if per_position:
        console.print(_position_table(result))


def _position_table(result: dict) -> Table:
    t = Table(title="loss by position in the window (position p: the prediction after p + 1 tokens)",
              title_justify="left")
    for name in ("positions", "predictions", "mean loss", "vs overall"):
        t.add_column(name, justify="left" if name == "positions" else "right")
    for b in result["position_buckets"]:
        loss = b["loss"]
        t.add_row(f"{b['first']}-{b['last']}" if b["last"] > b["first"] else str(b["first"]), f"{b['tokens']:,}",
                  "-" if loss is None else f"{loss:.4f}", "-" if loss is None else f"{loss - result['loss']:+.4f}")
    return t


def _position_png(result: dict, title: str) -> bytes:
    """Mean loss at every position (the line) and per bucket (the steps), with the overall mean."""
    plt = pyplot()
    xs = [p for p, n in enumerate(result["position_tokens"]) if n]
    ys = [result["position_nats"][p] / result["position_tokens"][p] for p in xs]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    try:
        ax.plot(xs, ys, linewidth=1.0, alpha=0.6, label="each position")
        for i, b in enumerate(result["position_buckets"]):
            if b["loss"] is not None:
                ax.hlines(b["loss"], b["first"], b["last"], colors="C1", linewidth=2.5,
                          label="bucket mean" if i == 0 else None)
        ax.axhline(result["loss"], color="gray", linestyle="--", linewidth=1, label=f"overall {result['loss']:.4f}")
        ax.set_xlabel("position in the window (tokens of context - 1)")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        return figure_png(fig)
    finally:
        plt.close(fig)
