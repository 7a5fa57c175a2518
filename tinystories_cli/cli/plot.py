"""`tslm plot`: draw one metric of one or more runs on one figure (PNG or terminal)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinystories_cli import plot
from tinystories_cli.console import console, print_note
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import atomic_write_bytes, check_output_path

COMMAND_KWARGS = {"no_args_is_help": True}



MAX_WIDTH, MAX_HEIGHT = 1000, 500  # characters x lines: far past any terminal, small enough to draw at once

def command(
    runs: Annotated[
        list[str],
        typer.Argument(help="Run directories, run names under runs/, or metrics.jsonl files.", show_default=False),
    ],
    metric: Annotated[
        str, typer.Option("--metric", "-m", help="val_loss | train_loss | grad_norm | lr (or any logged key).")
    ] = "val_loss",
    x: Annotated[str, typer.Option("--x", help="step | tokens | time.")] = "step",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="PNG file to write (needs matplotlib).")] = None,
    ascii_: Annotated[bool, typer.Option("--ascii", help="Print a terminal plot (no extra dependency).")] = False,
    log_y: Annotated[bool, typer.Option("--log-y", help="Logarithmic y axis.")] = False,
    smooth_k: Annotated[
        int, typer.Option("--smooth", help="Trailing moving average over K logged points (1 = off).")
    ] = 1,
    title: Annotated[str | None, typer.Option("--title", help="Figure title.")] = None,
    width: Annotated[int, typer.Option("--width", help="Terminal plot width in characters.")] = 72,
    height: Annotated[int, typer.Option("--height", help="Terminal plot height in lines.")] = 20,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
) -> None:
    """Plot a metric of one or more runs (metrics.jsonl) on one figure: PNG with --out, terminal with --ascii."""
    if x not in plot.X_KEYS:
        raise UserError(f"unknown --x {x!r}", f"choose one of: {', '.join(plot.X_KEYS)}")
    if out is None and not ascii_:
        raise UserError("nothing to draw to", "pass --out FILE.png, --ascii, or both")
    if out is not None and out.suffix.lower() != ".png":
        raise UserError(f"--out must be a .png file, got {out}", "e.g. --out loss.png")
    if not (10 <= width <= MAX_WIDTH and 3 <= height <= MAX_HEIGHT):
        raise UserError(f"--width must be 10..{MAX_WIDTH} and --height 3..{MAX_HEIGHT}, got {width} and {height}")
    if out is not None:
        check_output_path(out, force)
    loaded = [plot.load_series(r, metric, x) for r in runs]
    names = [s.name for s in loaded]
    for s, r in zip(loaded, runs):
        if names.count(s.name) > 1:
            s.name = r  # two runs share a directory name: label them by the path given
    series = plot.prepare(loaded, metric, smooth_k, log_y)
    for s in series:
        if not s.y:
            print_note(f"{s.name}: no finite {metric} values (skipped)")
        elif s.dropped:
            print_note(f"{s.name}: {s.dropped} non-finite {metric} value(s) dropped")
    drawn = [s for s in series if s.y]
    if out is not None:
        png = plot.render_png(drawn, metric, x, log_y, title)
        atomic_write_bytes(out, png)
        print_note(f"wrote {out} ({len(drawn)} run(s))")
    if ascii_:
        console.print(plot.render_ascii(drawn, metric, x, log_y, width, height), markup=False, highlight=False)
