"""`tslm import`: a Hugging Face LlamaForCausalLM or GPT2LMHeadModel directory as a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tinystories_cli import runs
from tinystories_cli.console import console, print_note
from tinystories_cli.errors import UserError


def command(
    src: Annotated[Path, typer.Argument(help="Hugging Face model directory: config.json, model.safetensors, tokenizer.json (or vocab.json + merges.txt).", show_default=False)],
    run_name: Annotated[Optional[str], typer.Option("--run-name", help="Run directory name under runs/ (default: the source directory's name).", show_default=False)] = None,
) -> None:
    """Import a Hugging Face Llama or GPT-2 model (safetensors + byte-level BPE tokenizer) as runs/NAME."""
    from tinystories_cli.interop.importer import import_hf

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
    ref = result.run_dir
    print_note(f"next: tslm generate \"Once upon a time\" --run {ref}   |   tslm eval {ref}   |   "
               f"tslm train --init-from {ref} --train-data my.npy --valid-data my_valid.npy --lr 1e-4 --max-steps 300")
