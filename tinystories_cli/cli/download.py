"""`tslm download`: a registry dataset into data/<dataset>/, a Hugging Face model repo into
data/hf/<owner>--<name>/ (`tslm download hf-model REPO`), or any URL into --out FILE."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from tinystories_cli import download as dl
from tinystories_cli.console import console, err_console, human_bytes, print_note
from tinystories_cli.errors import UserError

COMMAND_KWARGS = {"no_args_is_help": True}

_STAGES = {"download": "downloading", "verify": "verifying", "decompress": "decompressing"}


# the command's options, one alias each (keeps the signature one line per parameter)
DatasetArg = Annotated[
    str | None,
    typer.Argument(
        metavar="DATASET|URL",
        help=f"One of: {', '.join(dl.DATASETS)}; or `{dl.HF_MODEL} REPO`; "
        "or a URL (http(s)://, file://) or a local file path to fetch into --out.",
        show_default=False,
    ),
]
RepoArg = Annotated[
    str | None,
    typer.Argument(
        metavar="REPO",
        help=f"With `{dl.HF_MODEL}`: the Hugging Face model repo, e.g. openai-community/gpt2.",
        show_default=False,
    ),
]
OutDirOpt = Annotated[
    Path | None,
    typer.Option("--dir", help="Data root; files land in DIR/<dataset>/ (default: data/, or $TSLM_DATA)."),
]
SplitOpt = Annotated[str, typer.Option("--split", help="train | valid | all.")]
EndpointOpt = Annotated[
    str | None,
    typer.Option(
        "--endpoint",
        help="Hugging Face mirror URL or local mirror directory (default: $HF_ENDPOINT, else https://huggingface.co).",
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help=f"URL mode: the file to write. `{dl.HF_MODEL}`: the directory (default: DIR/hf/<owner>--<name>/).",
    ),
]
Sha256Opt = Annotated[
    str | None, typer.Option("--sha256", help="URL mode: expected sha256 (hex) of the downloaded bytes.")
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Download again even if the file exists; the old file is replaced only once the new one is verified.",
    ),
]
MaxBytesOpt = Annotated[
    int | None,
    typer.Option(
        "--max-bytes",
        min=1,
        help="Refuse a file (downloaded or unpacked) larger than this many bytes; "
        "overrides the registry's cap for .gz sources.",
    ),
]
ListDatasetsOpt = Annotated[bool, typer.Option("--list", help="List the datasets and exit.")]


def command(
    dataset: DatasetArg = None,
    repo: RepoArg = None,
    out_dir: OutDirOpt = None,
    split: SplitOpt = "all",
    endpoint: EndpointOpt = None,
    out: OutOpt = None,
    sha256: Sha256Opt = None,
    force: ForceOpt = False,
    max_bytes: MaxBytesOpt = None,
    list_datasets: ListDatasetsOpt = False,
) -> None:
    """Resumable, verified downloads: `tslm download tinystories`, or `tslm download URL --out FILE`.

    Interrupted downloads continue from FILE.part (its origin in FILE.part.json) on the next run. A file's sha256 is checked against the registry (or --sha256), and against the sha256 Hugging Face publishes for large (LFS) files; otherwise it is printed and recorded in FILE.sha256, so a later run notices a corrupted file. Complete, verified files are skipped. `tslm download hf-model REPO` fetches a model's config.json, model.safetensors and tokenizer files and prints the directory (for `tslm import`).
    """  # noqa: E501 (typer's rich help keeps a paragraph's line breaks: one line, so the terminal wraps it)
    if list_datasets:
        for d in dl.DATASETS.values():
            console.print(f"{d.name:<16} {d.description}", soft_wrap=True)
        console.print(
            f"{dl.HF_MODEL + ' REPO':<16} a Hugging Face model: config.json, model.safetensors, tokenizer files",
            soft_wrap=True,
        )
        return
    if dataset is None:
        raise UserError("missing DATASET or URL", f"e.g. tslm download tinystories; datasets: {', '.join(dl.DATASETS)}")
    if dataset == dl.HF_MODEL:
        if repo is None:
            raise UserError(f"`{dl.HF_MODEL}` needs a repo id",
                            f"e.g. tslm download {dl.HF_MODEL} openai-community/gpt2")
        if out is not None and out_dir is not None:
            raise UserError("--dir and --out together",
                            "--out DIR is the model directory; --dir is the data root (files go to DIR/hf/...)")
        if sha256 is not None or split != "all":
            raise UserError(f"--sha256/--split do not apply to `{dl.HF_MODEL}`",
                            "large files are checked against the sha256 the Hub publishes")
        _download_hf_model(repo, out_dir, out, endpoint, force, max_bytes)
        return
    if repo is not None:
        raise UserError(f"unexpected extra argument {repo!r}", f"only `{dl.HF_MODEL}` takes a REPO")
    if "://" not in dataset and dataset not in dl.DATASETS and _looks_like_path(dataset, out):
        dataset = Path(dataset).expanduser().resolve().as_uri()  # a plain local path: the same as its file:// URL
    if "://" in dataset:
        if out is None:
            raise UserError("a URL needs --out FILE", f"e.g. tslm download {dataset} --out data/corpus.txt")
        for flag, given in (("--dir", out_dir), ("--endpoint", endpoint)):
            if given is not None:
                raise UserError(f"{flag} applies to registry datasets, not to a URL", "use --out FILE")
        jobs = [dl.PlannedFile(dataset, out, sha256.strip().lower() if sha256 else None)]
    else:
        if out is not None or sha256 is not None:
            raise UserError("--out/--sha256 apply to URL downloads",
                            f"registry files go to DIR/{dataset}/ (DIR: --dir, default data/) and use the "
                            "registry's checksums; a URL or a local file takes --out FILE")
        with _cli_errors():
            jobs = dl.plan_dataset(dataset, split, out_dir, endpoint)
    for pf in jobs:
        _download_one(pf, force, max_bytes)


def _looks_like_path(arg: str, out: Path | None) -> bool:
    """A DATASET argument that names a local file: it exists, or it is written like a path and --out is given."""
    return os.path.lexists(arg) or (out is not None and (os.sep in arg or arg.startswith(("~", "."))))


OFFLINE_FIX = ("no network? `tslm quickstart --text FILE` learns from your own text; `tslm download` takes a "
               "plain path or a file:// URL with --out FILE; a mirror is set with --endpoint URL (or HF_ENDPOINT)")
# The library's parameters whose flag here is not `--parameter-name` (the error handler's translator reads this).
FLAG_RENAMES = {"root": "--dir", "out_dir": "--out"}


@contextlib.contextmanager
def _cli_errors() -> Iterator[None]:
    """Ctrl-C as a note on what was kept (exit 130); an unreachable source says what works offline."""
    try:
        yield
    except dl.DownloadInterrupted as e:  # Ctrl-C: the bar is closed, say what was kept
        err_console.print(f"[yellow]interrupted:[/yellow] kept {human_bytes(e.have)} in {e.part}; "
                          "rerun the same command to resume", soft_wrap=True)
        raise typer.Exit(130) from None
    except dl.Unreachable as e:
        raise UserError(e.what, OFFLINE_FIX) from None


def _download_one(pf: dl.PlannedFile, force: bool, max_bytes: int | None = None) -> None:
    with _cli_errors(), progress_bar(pf.dest.name) as progress:
        res = dl.download_planned(pf, force=force, progress=progress, max_bytes=max_bytes)
    _report(pf, res)


def _download_hf_model(repo: str, root: Path | None, out: Path | None, endpoint: str | None, force: bool,
                       max_bytes: int | None) -> None:
    with _cli_errors():
        res = dl.download_hf_model(
            repo, out, root, endpoint, progress_for=lambda pf: progress_bar(pf.dest.name),
            on_missing=lambda name: print_note(f"  {name}: not in {repo}; skipped (optional)"),
            on_done=_report, force=force, max_bytes=max_bytes)
    console.print(f"[green]model files of {repo}[/green] in (for `tslm import`):", soft_wrap=True)
    console.print(str(res.dir), soft_wrap=True, markup=False)


@contextlib.contextmanager
def progress_bar(name: str) -> Iterator[dl.Progress]:
    """A rich bar (bytes, speed, ETA) on stderr, fed by the library's progress callback."""
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=err_console, transient=False,
    )
    task: TaskID | None = None
    state = {"stage": None}

    def update(stage: str, done: int, total: int | None) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(name, total=total)
        if stage != state["stage"]:
            state["stage"] = stage
            # A new stage restarts the speed/ETA estimate (verify/decompress run at disk speed).
            bar.reset(task, total=total, completed=done, description=f"{_STAGES.get(stage, stage)} {name}")
        else:
            bar.update(task, completed=done, total=total)

    try:
        yield update
        if task is not None:
            bar.update(task, description=f"[green]done[/green] {name}")
    finally:
        if task is not None:
            bar.stop()




def _report(pf: dl.PlannedFile, res: dl.DownloadResult) -> None:
    rec = dl.record_path(res.path)
    if res.status == "skipped":
        how = "verified against the registry" if res.verified else f"matches {rec.name}"
        console.print(f"[green]ok[/green] {res.path} ({human_bytes(res.size)}) already complete, {how}; skipped",
                      soft_wrap=True)
        return
    resumed = f", resumed at {human_bytes(res.resumed_from)}" if res.resumed_from else ""
    console.print(f"[green]downloaded[/green] {res.path} ({human_bytes(res.size)}{resumed})", soft_wrap=True)
    if res.verified:
        console.print(f"  sha256 {res.source_sha256} verified", soft_wrap=True)
    else:
        # Not in the registry yet: print it so it can be checked elsewhere and recorded.
        console.print(f"  sha256 {res.source_sha256} (no expected value known; recorded in {rec})", soft_wrap=True)
    if res.sha256 != res.source_sha256:
        console.print(f"  sha256 {res.sha256} after decompression", soft_wrap=True)
    print_note(f"  source: {pf.url}")
