"""`tslm compare`: one table of several runs: the settings that differ, progress, and validation quality."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from tinystories_cli import compare
from tinystories_cli.cli import common
from tinystories_cli.console import console, print_note
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import strict_json

COMMAND_KWARGS = {"no_args_is_help": True}


def command(
    runs: Annotated[
        list[str], typer.Argument(help="Run names under runs/ or run directories.", show_default=False, metavar="RUN")
    ],
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Evaluate every run on this token file now (as `tslm eval` does) "
            "instead of reading saved eval_*.json results.",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass with --data.")] = 16,
    device: Annotated[str, common.device_option("With --data: ")] = "auto",
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table (for a results file).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print every run's summary as JSON.")] = False,
    no_group: Annotated[
        bool, typer.Option("--no-group", help="One row per run, even for runs that differ only by seed.")
    ] = False,
) -> None:
    """Compare runs: differing settings, steps, tokens, best/final val loss, and eval loss/perplexity/bits-per-byte.

    Runs that differ only by --seed are one row: mean ± std over the seeds, and ~ where a mean is within seed noise of the first row's.
    """  # noqa: E501 (one line per paragraph: the help renderer keeps line breaks)
    if markdown and as_json:
        raise UserError("--markdown and --json exclude each other", "pick one")
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")

    def progress(i: int, n: int, name: str) -> None:
        print_note(f"evaluating {name} on {data} ({i + 1}/{n})")

    summaries = compare.compare_runs(runs, data, batch_size, device, on_run=progress)
    for s in summaries:
        for note in s.notes:
            print_note(note)
    if as_json:
        console.print_json(strict_json([s.as_dict() for s in summaries]))
        return
    grouped = not no_group and compare.has_seed_groups(summaries)
    cols, rows = compare.compare_table(summaries, group=not no_group)
    legend = compare.noise_legend(summaries) if grouped else None
    if markdown:
        # Plain print: rich would wrap long lines and interpret [brackets].
        print(compare.to_markdown(cols, rows))
        if legend:
            print(f"\n{legend}")
        return
    _print_table(cols, rows, summaries, legend)


def _print_table(cols: list[str], rows: list[list[str]], summaries, legend: str | None) -> None:
    """The comparison as a rich table, never squeezing numbers into ellipses.

    A table wider than the terminal is turned on its side (one column per run), which fits a few runs with
    many differing settings; failing that it is printed at full width.
    """
    captions = []
    if any(s.eval for s in summaries):
        captions.append("best/final val: logged during training on fixed windows; eval loss, ppl, bpb (bits per byte): "
                        "`tslm eval` on the whole file")
    if legend:
        captions.append(legend)
    t = Table(box=box.SIMPLE_HEAD, caption="\n".join(captions) or None, caption_justify="left")
    for c in cols:
        t.add_column(c, justify="right" if c in compare.NUMERIC_COLUMNS else "left", no_wrap=True)
    for row in rows:
        t.add_row(*row)

    def natural(table: Table) -> int:
        return Measurement.get(console, console.options.update(width=100_000), table).maximum

    out = console
    if natural(t) > console.width:
        side = Table(box=box.SIMPLE_HEAD, caption=t.caption, caption_justify="left")
        side.add_column("", no_wrap=True)
        for row in rows:
            side.add_column(row[0], justify="right", no_wrap=True)
        for i, c in enumerate(cols[1:], start=1):
            side.add_row(c, *(row[i] for row in rows))
        if natural(side) <= console.width:
            t = side
        else:
            out = Console(width=natural(t), highlight=False, force_terminal=console.is_terminal)
    out.print(t)
