"""`tslm bpe`: train a byte-level BPE tokenizer on a text file.

Defaults chain with the other commands: the input is `data/tinystories/train.txt` and the output
`data/tinystories/tokenizer/`, where `encode` and `train` look. For an input under
`data/<dataset>/` the output is `data/<dataset>/tokenizer/`; for any other input it is
`<input stem>_tokenizer/` beside the input (e.g. `notes.txt` -> `notes_tokenizer/`), so a
tokenizer trained on an ad-hoc file never lands in, or clobbers, a dataset directory.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from tinystories_cli import paths
from tinystories_cli.cli.encode import disk_full_is_user_error, stopped_cleanly
from tinystories_cli.config import get_preset
from tinystories_cli.console import console, err_console, human_bytes
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import check_input_file, check_source_outside, remove_stale_temps, sha256_file, strict_json
from tinystories_cli.tokenizer import bpe
from tinystories_cli.tokenizer.chunking import signals_raise

DEFAULT_PRESET = "tinystories-17m"  # its dataset and vocab size are the defaults
DEFAULT_SPECIAL = "<|endoftext|>"


def default_out_dir(input_path: Path) -> Path:
    """data/<dataset>/tokenizer/ for an input under data/<dataset>/, else <stem>_tokenizer/ beside it.

    >>> default_out_dir(Path("data/tinystories/train.txt")).as_posix()
    'data/tinystories/tokenizer'
    >>> default_out_dir(Path("corpus/notes.txt")).as_posix()
    'corpus/notes_tokenizer'
    """
    dataset = paths.dataset_of(input_path)
    if dataset is not None:
        return paths.tokenizer_dir(dataset, root=input_path.parent.parent)
    return input_path.with_name(f"{input_path.stem}_tokenizer")


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process and of its largest finished child (worker)."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) * scale


# the command's options, one alias each (keeps the signature one line per parameter)
InputPathArg = Annotated[
    Path | None,
    typer.Argument(
        metavar="[INPUT]", help="UTF-8 text file (default: the preset dataset's train.txt).", show_default=False
    ),
]
VocabSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--vocab-size",
        help="Final vocabulary size incl. 256 bytes and special tokens (default: the preset's).",
        show_default=False,
    ),
]
SpecialTokensOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--special-token",
        metavar="TOKEN",
        help=f"Special token, repeatable; ids 0..k-1 in order (default: {DEFAULT_SPECIAL}).",
        show_default=False,
    ),
]
NoSpecialOpt = Annotated[bool, typer.Option("--no-special-tokens", help="Train without any special token.")]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Output directory (default: data/<dataset>/tokenizer/, or <input stem>_tokenizer/ beside the input).",
        show_default=False,
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", help="Pre-tokenization processes (default: available cores).", show_default=False),
]
ErrorsOpt = Annotated[
    str, typer.Option("--errors", help="Invalid UTF-8: strict (fail, naming the byte offset) | replace (U+FFFD).")
]
PresetOpt = Annotated[
    str, typer.Option("--preset", help="Preset whose dataset and vocab size are the defaults.")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace a different tokenizer already in --out.")]
AsJsonOpt = Annotated[bool, typer.Option("--json", help="Print the summary as JSON (no progress bars).")]


def command(
    input_path: InputPathArg = None,
    vocab_size: VocabSizeOpt = None,
    special_tokens: SpecialTokensOpt = None,
    no_special: NoSpecialOpt = False,
    out: OutOpt = None,
    workers: WorkersOpt = None,
    errors: ErrorsOpt = "strict",
    preset: PresetOpt = DEFAULT_PRESET,
    force: ForceOpt = False,
    as_json: AsJsonOpt = False,
) -> None:
    """Train a byte-level BPE tokenizer (GPT-2 pre-tokenization) and write vocab.json + merges.txt."""
    t_start = time.perf_counter()
    # --- validate everything before reading or writing anything
    vocab_size, specials, dataset = _settings(preset, vocab_size, special_tokens, no_special, errors, workers)
    input_path, out_dir = _paths(input_path, out, dataset)

    t0 = time.perf_counter()
    source_sha = sha256_file(input_path)
    fingerprint = bpe.training_fingerprint(vocab_size, specials, source_sha, errors)
    remove_stale_temps(out_dir)  # what a killed earlier run left there (before the directory is checked)
    bpe.check_output_dir(out_dir, fingerprint, force)
    t_hash = time.perf_counter() - t0

    # --- train, with progress bars on stderr; SIGINT/SIGTERM end the workers and remove temporary files
    size = input_path.stat().st_size
    show = not as_json and err_console.is_terminal
    with signals_raise(), stopped_cleanly(), disk_full_is_user_error():
        result, t_write = _train_and_save(input_path, out_dir, vocab_size, specials, workers, errors, fingerprint,
                                          size, show)
    seconds = {"hash": round(t_hash, 3), **{k: round(v, 3) for k, v in result.seconds.items()},
               "write": round(t_write, 3), "total": round(time.perf_counter() - t_start, 3)}
    summary = _summary(result, input_path, size, out_dir, specials, seconds)
    if as_json:
        console.print_json(strict_json(summary))
        return
    _render(summary)


def _settings(preset: str, vocab_size: int | None, special_tokens: list[str] | None, no_special: bool, errors: str,
              workers: int | None) -> tuple[int, list[str], str]:
    """(vocab size, special tokens, the preset's dataset), checked."""
    p = get_preset(preset)
    vocab_size = p.model.vocab_size if vocab_size is None else vocab_size
    if no_special and special_tokens:
        raise UserError("--no-special-tokens conflicts with --special-token", "pass one or the other")
    specials = [] if no_special else bpe.check_special_tokens(special_tokens or [DEFAULT_SPECIAL])
    bpe.check_vocab_size(vocab_size, len(specials))
    if errors not in bpe.ERRORS:
        raise UserError(f"--errors must be strict or replace, got {errors!r}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    return vocab_size, specials, p.train.dataset


def _paths(input_path: Path | None, out: Path | None, dataset: str) -> tuple[Path, Path]:
    """(the text to learn from, the output directory), checked: the text exists and is not an output."""
    default_input = input_path is None
    input_path = paths.text_path(dataset, "train") if default_input else input_path
    hint = f"run `tslm download {dataset}` first, or pass INPUT" if default_input else "check the path"
    check_input_file(input_path, "input file", hint)
    out_dir = out if out is not None else default_out_dir(input_path)
    check_source_outside(input_path, [out_dir / n for n in bpe.TOKENIZER_FILES], "the text to learn from")
    return input_path, out_dir


def _summary(result, input_path: Path, size: int, out_dir: Path, specials: list[str], seconds: dict) -> dict:
    learned = [t for i, t in result.vocab.items() if i >= len(specials)]  # the special tokens are not learned
    longest = max(learned, key=len)
    return {
        "input": str(input_path), "input_bytes": size, "out": str(out_dir),
        "vocab_size": len(result.vocab), "num_merges": len(result.merges), "special_tokens": specials,
        "pretokens": result.num_pretokens, "distinct_pretokens": result.num_distinct, "workers": result.workers,
        "seconds": seconds,
        "peak_rss_bytes": _peak_rss_bytes(),
        "longest_token": longest.decode("utf-8", errors="replace"), "longest_token_bytes": len(longest),
    }


def _render(s: dict) -> None:
    sec = s["seconds"]
    t = Table(title=f"BPE tokenizer -> {s['out']}", title_justify="left", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("vocabulary",
              f"{s['vocab_size']:,} ({len(s['special_tokens'])} special + 256 bytes + {s['num_merges']:,} merges)")
    t.add_row("input", f"{s['input']} ({human_bytes(s['input_bytes'])})")
    t.add_row("pre-tokens", f"{s['pretokens']:,} ({s['distinct_pretokens']:,} distinct)")
    rate = s["input_bytes"] / max(sec["pretokenize"], 1e-9)
    t.add_row(f"pre-tokenize ({s['workers']} workers)", f"{sec['pretokenize']:.2f} s ({human_bytes(rate)}/s)")
    t.add_row("merges", f"{sec['merge']:.2f} s ({s['num_merges'] / max(sec['merge'], 1e-9):,.0f} merges/s)")
    t.add_row("hash + write", f"{sec['hash']:.2f} s + {sec['write']:.2f} s")
    t.add_row("total", f"{sec['total']:.2f} s")
    t.add_row("peak memory (RSS)", human_bytes(s["peak_rss_bytes"]))
    t.add_row("longest token", f"{s['longest_token']!r} ({s['longest_token_bytes']} bytes)")
    console.print(t)


def _train_and_save(input_path, out_dir, vocab_size, specials, workers, errors, fingerprint, size, show):
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), console=err_console, disable=not show, transient=False,
    ) as bar:
        tasks: dict[str, int] = {}
        started: dict[str, float] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                label = "pre-tokenize" if phase == "pretokenize" else "merge"
                tasks[phase] = bar.add_task(label, total=max(total, 1), rate="")
                started[phase] = time.perf_counter()
            dt = time.perf_counter() - started[phase]
            if dt < 0.2:  # too early for a meaningful rate
                rate = ""
            else:
                rate = f"{human_bytes(done / dt)}/s" if phase == "pretokenize" else f"{done / dt:,.0f} merges/s"
            bar.update(tasks[phase], completed=done, rate=rate)

        result = bpe.train_bpe_file(input_path, vocab_size, specials, workers=workers, errors=errors, progress=progress)

    # --- write atomically
    t0 = time.perf_counter()
    extra = {"source": {"path": str(input_path), "bytes": size}, "trained_with": "tslm bpe"}
    bpe.save_tokenizer(out_dir, result.vocab, result.merges, fingerprint, extra)
    t_write = time.perf_counter() - t0
    return result, t_write
