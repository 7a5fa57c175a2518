"""`tslm stats`: documents, bytes, characters, tokens and the document-length histogram of a text file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tinystories_cli import stats
from tinystories_cli.console import console, err_console, human_bytes, human_count, print_note
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import atomic_write_bytes, check_input_file, check_output_path, strict_json

COMMAND_KWARGS = {"no_args_is_help": True}


# the command's options, one alias each (keeps the signature one line per parameter)
FileArg = Annotated[Path, typer.Argument(help="Text file (documents separated by --separator).", show_default=False)]
TokenizerOpt = Annotated[
    Path | None,
    typer.Option("--tokenizer", "-t", help="Tokenizer directory (from `tslm bpe`): adds tokens and bytes/token."),
]
SeparatorOpt = Annotated[
    str, typer.Option("--separator", help="Document separator; '\\n' for one document per line.")
]
UnitOpt = Annotated[
    str | None,
    typer.Option(
        "--unit",
        help="Histogram unit: tokens | words | chars | bytes (default: tokens with --tokenizer, else words).",
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Write the histogram as a PNG (needs matplotlib) instead of printing it."),
]
BinsOpt = Annotated[
    int | None,
    typer.Option("--bins", help="Histogram bins (default: 20 in the terminal, 50 in a PNG).", show_default=False),
]
AsJsonOpt = Annotated[bool, typer.Option("--json", help="Print the figures as one JSON object.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")]


def command(
    file: FileArg,
    tokenizer: TokenizerOpt = None,
    separator: SeparatorOpt = stats.DEFAULT_SEPARATOR,
    unit: UnitOpt = None,
    out: OutOpt = None,
    bins: BinsOpt = None,
    as_json: AsJsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Corpus statistics: documents, bytes, characters, words, tokens, bytes/token, and a document-length histogram."""
    check_input_file(file, "text file")
    sep = stats.parse_separator(separator)
    unit = unit or ("tokens" if tokenizer is not None else "words")
    if unit not in stats.UNITS:
        raise UserError(f"unknown --unit {unit!r}", f"choose one of: {', '.join(stats.UNITS)}")
    if unit == "tokens" and tokenizer is None:
        raise UserError("--unit tokens needs a tokenizer", "pass --tokenizer DIR, or --unit words")
    if bins is None:
        bins = 50 if out is not None else 20
    if not 1 <= bins <= 500:
        raise UserError(f"--bins must be in 1..500, got {bins}")
    if out is not None:
        if out.suffix.lower() != ".png":
            raise UserError(f"--out must be a .png file, got {out}", "e.g. --out lengths.png")
        check_output_path(out, force)
    tok = stats.load_tokenizer(tokenizer) if tokenizer is not None else None

    size = file.stat().st_size
    with Progress(TextColumn("[dim]reading"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=err_console, transient=True, disable=size < (64 << 20)) as bar:
        task = bar.add_task("stats", total=size)
        s = stats.file_stats(file, sep, tok, progress=lambda n: bar.update(task, completed=n))
    if s.separators == 0 and s.documents == 1:
        print_note(f"separator {separator!r} not found: the whole file is one document (see --separator)")
    lengths = s.lengths(unit)

    if out is not None:
        atomic_write_bytes(out, stats.render_histogram_png(lengths, unit, bins=bins))
    if as_json:
        console.print_json(strict_json({"file": str(file), "separator": sep, **s.summary()}))
    else:
        _render(file, s, unit)
        if out is None:
            console.print(stats.render_histogram_ascii(lengths, unit, bins), markup=False, highlight=False)
    if out is not None:
        print_note(f"wrote {out}")


def _render(file: Path, s: stats.CorpusStats, unit: str) -> None:
    t = Table(title=f"{file}", title_justify="left")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_column("", justify="right")
    t.add_row("file size", human_bytes(s.file_bytes), f"{s.file_bytes:,} B")
    t.add_row("documents", human_count(s.documents), f"{s.documents:,}")
    t.add_row("characters", human_count(s.characters), f"{s.characters:,}")
    t.add_row("words", human_count(s.words), f"{s.words:,}")
    if s.tokens is not None:
        t.add_row("tokens", human_count(s.tokens), f"{s.tokens:,}")
        t.add_row("bytes / token", f"{s.bytes_per_token:.3f}" if s.bytes_per_token else "-", "")
    console.print(t)
    t = Table(title="Document lengths", title_justify="left")
    t.add_column("unit")
    for col in ("mean", "min", "p10", "median", "p90", "p99", "max"):
        t.add_column(col, justify="right")
    for u in stats.UNITS:
        if u == "tokens" and s.doc_tokens is None:
            continue
        d = stats.describe(s.lengths(u))
        if d["count"] == 0:
            continue
        t.add_row(u, f"{d['mean']:,.1f}", *(f"{d[k]:,}" for k in ("min", "p10", "p50", "p90", "p99", "max")))
    console.print(t)
