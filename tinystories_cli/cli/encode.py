"""`tslm encode`: text files -> .npy token files (+ JSON sidecars) with a trained tokenizer.

    tslm encode                          data/tinystories/{train,valid}.txt -> data/tinystories/{train,valid}.npy
    tslm encode owt                      the same for data/owt/
    tslm encode notes.txt --out n.npy    any UTF-8 file (default output: notes.npy beside it)
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from tinystories_cli import paths
from tinystories_cli.console import console, err_console, human_bytes, human_count, print_error, print_note
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import check_output_path, check_source_outside, strict_json

# the command's options, one alias each (keeps the signature one line per parameter)
InputsArg = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="[DATASET | FILE...]",
        help="A dataset name (encodes data/<dataset>/{train,valid}.txt) or text files (default: tinystories).",
        show_default=False,
    ),
]
TokenizerOpt = Annotated[
    Path | None,
    typer.Option(
        "--tokenizer",
        "-t",
        help="Tokenizer directory from `tslm bpe` (default: data/<dataset>/tokenizer/), "
        "or `gpt2` for GPT-2's (`tslm download gpt2-tokenizer`).",
        show_default=False,
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Output .npy (only with one input file; default: the input with .npy).",
        show_default=False,
    ),
]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", "-j", help="Worker processes (default: all cores).", show_default=False)
]
ErrorsOpt = Annotated[
    str, typer.Option("--errors", help="Invalid UTF-8: strict (fail, naming the byte offset) | replace (U+FFFD).")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing token files.")]
BackendOpt = Annotated[
    str,
    typer.Option(
        "--backend",
        help="auto (tiktoken when installed and it gives the same ids, else python) | python "
        "(the from-scratch encoder) | tiktoken. Every backend writes the same ids.",
    ),
]
AsJsonOpt = Annotated[bool, typer.Option("--json", help="Print the summary as JSON (no progress bar).")]


def command(
    inputs: InputsArg = None,
    tokenizer: TokenizerOpt = None,
    out: OutOpt = None,
    workers: WorkersOpt = None,
    errors: ErrorsOpt = "strict",
    force: ForceOpt = False,
    backend: BackendOpt = "auto",
    as_json: AsJsonOpt = False,
) -> None:
    """Encode text into .npy token files (uint16/uint32) with a JSON sidecar, in parallel."""
    from tinystories_cli.tokenizer.backends import BACKENDS, resolve_backend
    from tinystories_cli.tokenizer.chunking import signals_raise
    from tinystories_cli.tokenizer.encode import encode_file
    from tinystories_cli.tokenizer.tokenizer import Tokenizer

    if errors not in ("strict", "replace"):
        raise UserError(f"--errors must be strict or replace, got {errors!r}")
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    workers = workers or _cpu_count()
    jobs, tok_dir = _plan(inputs or [], tokenizer, out)
    for src, dst in jobs:  # refuse before doing any work
        check_source_outside(src, [dst, paths.sidecar_path(dst)], "the text to encode")
        check_output_path(dst, force)
        check_output_path(paths.sidecar_path(dst), force)
    tok = Tokenizer.from_dir(tok_dir)
    try:
        backend = resolve_backend(tok, backend)
    except ValueError as e:
        raise UserError(f"--backend {backend}: {e}") from None

    results = []
    # SIGINT/SIGTERM: the workers are ended and every temporary file removed on the way out
    with signals_raise(), stopped_cleanly(), disk_full_is_user_error():
        for src, dst in jobs:
            t0 = time.perf_counter()
            if as_json:
                meta = encode_file(src, dst, tok, workers=workers, errors=errors, force=force, tokenizer_dir=tok_dir,
                                   backend=backend)
            else:
                meta = _with_progress(src, dst, tok, workers, errors, force, tok_dir, backend, encode_file)
            meta["output"] = str(dst)
            meta["wall_seconds"] = time.perf_counter() - t0
            results.append(meta)
    _report(results, tok_dir, as_json)


@contextlib.contextmanager
def stopped_cleanly() -> Iterator[None]:
    """`Interrupted` (SIGINT/SIGTERM, after the cleanup ran) -> one line and exit 128 + the signal number."""
    from tinystories_cli.tokenizer.chunking import Interrupted

    try:
        yield
    except Interrupted as e:
        print_error(f"{e}: stopped; the partial output and temporary files were removed")
        raise typer.Exit(e.exit_code) from None


@contextlib.contextmanager
def disk_full_is_user_error() -> Iterator[None]:
    """A full disk (or quota) while writing is one line and exit 2, not a traceback."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        raise UserError(f"no space left on the device{where}; the partial output was removed",
                        "free some space, or write elsewhere with --out") from None


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


GPT2 = "gpt2"  # `--tokenizer gpt2` names GPT-2's tokenizer, in data/gpt2-tokenizer/ (`tslm download gpt2-tokenizer`)


def _plan(inputs: list[str], tokenizer: Path | None, out: Path | None) -> tuple[list[tuple[Path, Path]], Path]:
    """(source, output) pairs and the tokenizer directory for the given arguments."""
    if tokenizer is not None and str(tokenizer) == GPT2 and not tokenizer.exists():
        tokenizer = paths.dataset_dir(paths.GPT2_TOKENIZER)  # `--tokenizer gpt2`: GPT-2's downloaded files
        if not (tokenizer / "vocab.json").is_file():
            raise UserError(f"--tokenizer gpt2: GPT-2's tokenizer is not in {tokenizer}",
                            "fetch it with `tslm download gpt2-tokenizer`")
    if len(inputs) <= 1 and (not inputs or _is_dataset_name(inputs[0])):
        dataset = inputs[0] if inputs else paths.DEFAULT_DATASET
        if out is not None:
            raise UserError("--out needs a single input file",
                            "name the text file, e.g. `tslm encode data/tinystories/valid.txt --out valid.npy`")
        texts = [paths.text_path(dataset, s) for s in paths.SPLITS]
        present = [t for t in texts if t.is_file()]
        if not present:
            raise UserError(f"no text for dataset {dataset!r}: {' and '.join(map(str, texts))} not found",
                            f"run `tslm download {dataset}` first, or pass text files")
        for t in texts:
            if t not in present:
                print_note(f"note: {t} not found, encoding {', '.join(map(str, present))} only")
        tok_dir = tokenizer or paths.tokenizer_dir(dataset)
        _check_tokenizer(tok_dir, f"tslm bpe {paths.text_path(dataset, 'train')}", given=tokenizer is not None)
        return [(t, paths.tokens_path(dataset, t.stem)) for t in present], tok_dir

    files = [Path(p) for p in inputs]
    if out is not None and len(files) > 1:
        raise UserError("--out needs a single input file", "drop --out: each FILE is written to FILE with .npy")
    for f in files:
        if not f.is_file():
            hint = "check the path" if not _is_dataset_name(str(f)) else f"run `tslm download {f}` first"
            raise UserError(f"text file not found: {f}", hint)
    jobs = [(f, out if out is not None else f.with_suffix(".npy")) for f in files]
    if tokenizer is not None:
        tok_dir = tokenizer
    else:
        ds = paths.dataset_of(files[0])
        beside = files[0].with_name(f"{files[0].stem}_tokenizer")  # where `tslm bpe FILE` writes
        candidates = ([paths.tokenizer_dir(ds, root=files[0].parent.parent)] if ds else []) + [
            beside, paths.tokenizer_dir(paths.DEFAULT_DATASET)]
        tok_dir = next((c for c in candidates if (c / "vocab.json").is_file()), candidates[0])
    _check_tokenizer(tok_dir, f"tslm bpe {files[0]}", given=tokenizer is not None)
    return jobs, tok_dir


def _is_dataset_name(arg: str) -> bool:
    """A bare name such as `tinystories` or `owt` (no path separator, no suffix, not an existing file)."""
    return not Path(arg).is_file() and "/" not in arg and os.sep not in arg and "." not in arg


def _check_tokenizer(tok_dir: Path, bpe_command: str, given: bool) -> None:
    if not (tok_dir / "vocab.json").is_file() or not (tok_dir / "merges.txt").is_file():
        fix = ("pass --tokenizer DIR pointing at a `tslm bpe` output" if given
               else f"train one with `{bpe_command}`, or pass --tokenizer DIR")
        raise UserError(f"no tokenizer in {tok_dir} (vocab.json and merges.txt)", fix)


def _with_progress(src, dst, tok, workers, errors, force, tok_dir, backend, encode_file) -> dict:
    size = Path(src).stat().st_size
    columns = [
        TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[mbps]:>6.1f} MB/s {task.fields[tps]:>8} tok/s"), TimeElapsedColumn(),
    ]
    # auto_refresh=False: no background thread, so forking the worker processes is safe.
    with Progress(*columns, console=err_console, auto_refresh=False, transient=False) as bar:
        task = bar.add_task(Path(src).name, total=size, mbps=0.0, tps="0")
        t0 = time.perf_counter()
        last = [0.0]

        def progress(done: int, tokens: int) -> None:
            now = time.perf_counter()
            dt = max(now - t0, 1e-9)
            bar.update(task, completed=done, mbps=done / dt / 1e6, tps=human_count(round(tokens / dt)))
            if now - last[0] > 0.1 or done >= size:
                last[0] = now
                bar.refresh()

        meta = encode_file(
            src,
            dst,
            tok,
            workers=workers,
            errors=errors,
            force=force,
            progress=progress,
            tokenizer_dir=tok_dir,
            backend=backend,
        )
        bar.refresh()
    return meta


def _report(results: list[dict], tok_dir: Path, as_json: bool) -> None:
    if as_json:
        console.print_json(strict_json(results if len(results) > 1 else results[0]))
        return
    for r in results:
        secs = max(r["wall_seconds"], 1e-9)
        ratio = f"{r['bytes_per_token']:.3f} bytes/token" if r["bytes_per_token"] else "no tokens"
        console.print(
            f"[bold]{r['output']}[/bold]: {r['num_tokens']:,} tokens ({r['dtype']}) "
            f"from {human_bytes(r['source_bytes'])}, "
            f"{ratio}; {r['source_bytes'] / secs / 1e6:.1f} MB/s, "
            f"{human_count(round(r['num_tokens'] / secs))} tokens/s "
            f"on {r['workers']} worker{'s' if r['workers'] != 1 else ''} ({r['backend']} backend)",
            soft_wrap=True,
        )
    print_note(f"tokenizer: {tok_dir} (fingerprint {results[0]['fingerprint'][:12]})")
