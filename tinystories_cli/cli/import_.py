"""`tslm import`: a Hugging Face LlamaForCausalLM or GPT2LMHeadModel directory as a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinystories_cli import paths, runs
from tinystories_cli.console import console, print_note
from tinystories_cli.errors import UserError

FINE_TUNE_TEXT_MAX = 64 << 20  # a larger train.txt takes a long time to encode: not suggested


def command(
    src: Annotated[
        Path,
        typer.Argument(
            help="Hugging Face model directory: config.json, model.safetensors, tokenizer.json "
            "(or vocab.json + merges.txt).",
            show_default=False,
        ),
    ],
    run_name: Annotated[
        str | None,
        typer.Option(
            "--run-name",
            help="Run directory name under runs/ (default: the source directory's name).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Import a Hugging Face Llama or GPT-2 model (safetensors + byte-level BPE tokenizer) as runs/NAME."""
    from tinystories_cli.importer import import_hf

    if run_name is not None and (not run_name or "/" in run_name or run_name in (".", "..", runs.LATEST_LINK)):
        raise UserError(f"--run-name {run_name!r} is not a plain directory name", "pass a name such as --run-name gpt2")
    name = run_name or src.resolve().name
    from tinystories_cli.cli.encode import stopped_cleanly
    from tinystories_cli.tokenizer.chunking import signals_raise

    with signals_raise(), stopped_cleanly():  # SIGTERM/SIGINT: the temporary run directory is removed
        result = import_hf(src, runs.runs_root() / name)
    cfg = result.cfg
    console.print(f"imported {src} ({result.architecture}, {result.parameters:,} parameters, vocab {cfg.vocab_size}, "
                  f"context {cfg.context_length}) into {result.run_dir}", markup=False, highlight=False, soft_wrap=True)
    for note in result.notes:
        print_note(note)
    console.print("\n[bold]next[/bold]")
    for what, cmd in next_commands(result.run_dir):
        console.print(f"  [dim]# {what}[/dim]", soft_wrap=True)
        console.print(f"  {cmd}", soft_wrap=True, markup=False, highlight=False)


def next_commands(run_dir: Path) -> list[tuple[str, str]]:
    """(what, command) pairs that work as printed on an imported run: its own tokenizer encodes the text
    (the data/ token files were made by another tokenizer), into new files inside the run directory."""
    tok = runs.tokenizer_dir_of(run_dir)
    out = [("a story", f'tslm generate "Once upon a time" --run {run_dir}')]
    for dataset in ("tinystories", "quickstart"):
        valid_txt, train_txt = paths.text_path(dataset, "valid"), paths.text_path(dataset, "train")
        if not valid_txt.is_file():
            continue
        valid_npy = run_dir / f"{dataset}-valid.npy"
        out.append(
            (
                f"loss on {valid_txt} (encoded with this model's tokenizer)",
                f"tslm encode {valid_txt} --tokenizer {tok} --out {valid_npy} "
                f"&& tslm eval {run_dir} --data {valid_npy}",
            )
        )
        if train_txt.is_file() and train_txt.stat().st_size <= FINE_TUNE_TEXT_MAX:
            train_npy = run_dir / f"{dataset}-train.npy"
            out.append(
                (
                    f"fine-tune on {train_txt}",
                    f"tslm encode {train_txt} --tokenizer {tok} --out {train_npy} && tslm train --init-from {run_dir} "
                    f"--train-data {train_npy} --valid-data {valid_npy} --lr 1e-4 --max-steps 300 "
                    f"--run-name {run_dir.name}-tuned",
                )
            )
        break
    else:
        out.append(("evaluate or fine-tune: encode a text with this model's tokenizer first",
                    f"tslm encode --help   # then: tslm encode TEXT --tokenizer {tok} --out FILE.npy"))
    return out
