"""`tslm quickstart`: download -> tokenizer -> encode -> train -> a story, in one command."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from tinystories_cli import quickstart as qs
from tinystories_cli.console import console, err_console, human_bytes

COMMAND_KWARGS = {"no_args_is_help": False}
ADVANCED = "Advanced"



def command(
    text: Annotated[Optional[Path], typer.Option(
        "--text", help="Learn from this UTF-8 text file instead of downloading TinyStories' validation file "
                       "(documents separated by <|endoftext|> or blank lines).", show_default=False)] = None,
    minutes: Annotated[float, typer.Option(
        "--minutes", help="Wall-clock budget for training (the rest takes about a minute more).")] = qs.DEFAULT_MINUTES,
    workdir: Annotated[Optional[Path], typer.Option(
        "--dir", help="Work directory: data/ and runs/ go under it (default: the current directory).",
        show_default=False)] = None,
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Tokenizer vocabulary size.")] = qs.DEFAULT_VOCAB_SIZE,
    device: Annotated[str, typer.Option("--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Redo every stage (a complete download is kept).")] = False,
    preset: Annotated[Optional[str], typer.Option(
        "--preset", help=f"A fixed model preset instead of the auto size (default on a CPU: the size and learning rate that "
                         f"the measured rule picks for --minutes, see README; on a CUDA GPU: {qs.GPU_PRESET}).",
        rich_help_panel=ADVANCED, show_default=False)] = None,
    prompt: Annotated[str, typer.Option("--prompt", help="Start of the story.", rich_help_panel=ADVANCED)] = qs.DEFAULT_PROMPT,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Length limit of the story in tokens.",
                                            rich_help_panel=ADVANCED)] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed for the story.", rich_help_panel=ADVANCED)] = 0,
    endpoint: Annotated[Optional[str], typer.Option(
        "--endpoint", help="Hugging Face mirror URL or local mirror directory (default: $HF_ENDPOINT, else "
                           "https://huggingface.co).", rich_help_panel=ADVANCED, show_default=False)] = None,
    plain: Annotated[bool, typer.Option("--plain", help="Plain training log lines instead of the live display.",
                                        rich_help_panel=ADVANCED)] = False,
) -> None:
    """From nothing to a generated story: download, train a tokenizer, encode, train a small model for
    --minutes, then tell a story. Rerunning skips what is done (and resumes an interrupted run)."""
    opts = qs.QuickstartOptions(
        text=text, minutes=minutes, workdir=workdir, vocab_size=vocab_size, device=device, force=force,
        preset=preset, endpoint=endpoint, prompt=prompt, max_new_tokens=max_tokens, seed=seed,
        display="plain" if plain else "auto",
    )
    t0 = time.perf_counter()
    console.rule("[bold]tslm quickstart", align="left")
    story_started = {"yes": False}

    def notify(stage: str, message: str) -> None:
        if stage == "train" and not notify.train_started:  # type: ignore[attr-defined]
            console.rule("[bold]train", align="left")
            notify.train_started = True  # type: ignore[attr-defined]
        console.print(f"[bold cyan]{stage}[/bold cyan] {message}", soft_wrap=True, highlight=False)

    notify.train_started = False  # type: ignore[attr-defined]

    def on_story_text(chunk: str) -> None:
        if not story_started["yes"]:
            console.rule("[bold]a story from your model", align="left")
            console.print(Text(chunk, style="bold"), end="", soft_wrap=True)
            story_started["yes"] = True
        else:
            console.file.write(chunk)
        console.file.flush()

    from tinystories_cli.cli.download import progress_bar

    from tinystories_cli.download import DownloadInterrupted
    from tinystories_cli.tokenizer.chunking import Interrupted

    try:
        with _bpe_progress() as bpe_progress, _encode_progress() as encode_progress:
            result = qs.run_quickstart(opts, notify, download_progress=progress_bar, bpe_progress=bpe_progress,
                                       encode_progress=encode_progress, on_story_text=on_story_text)
    except DownloadInterrupted as e:
        err_console.print(f"[yellow]interrupted:[/yellow] kept {human_bytes(e.have)} in {e.part}; rerun the same "
                          "command to resume", soft_wrap=True)
        raise typer.Exit(130) from None
    except qs.Interrupted as e:
        err_console.print(f"[yellow]interrupted:[/yellow] {e.message}", soft_wrap=True)
        raise typer.Exit(130) from None
    except Interrupted as e:  # SIGTERM/SIGINT in the split, tokenizer or encode stage: its temporaries are gone
        err_console.print(f"[yellow]interrupted:[/yellow] {e}; temporary files were removed, rerun the same command "
                          "to continue", soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    console.file.write("\n")
    _render(result, time.perf_counter() - t0)


@contextlib.contextmanager
def _bpe_progress() -> Iterator:
    """Progress bars for BPE training (pre-tokenize bytes, merges), shown only on a terminal."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                   console=err_console, disable=not err_console.is_terminal, transient=True)
    tasks: dict[str, int] = {}

    def progress(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            label = "tokenizer: pre-tokenize" if phase == "pretokenize" else "tokenizer: merge"
            tasks[phase] = bar.add_task(label, total=max(total, 1))
        bar.update(tasks[phase], completed=done)

    with bar:
        yield progress


@contextlib.contextmanager
def _encode_progress() -> Iterator:
    """One bar per encoded file (bytes), shown only on a terminal."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                   console=err_console, disable=not err_console.is_terminal, transient=True)
    tasks: dict[str, int] = {}

    def progress(name: str, done: int, total: int, _tokens: int) -> None:
        if name not in tasks:
            tasks[name] = bar.add_task(f"encode {name}", total=max(total, 1))
        bar.update(tasks[name], completed=done)

    with bar:
        yield progress


def _render(r: qs.QuickstartResult, total_s: float) -> None:
    console.rule("[bold]done", align="left")
    st, sec = r.stages, r.seconds

    def note(stage: str) -> str:
        s = {"skipped": "already there", "given": "--text", "downloaded": "downloaded", "done": "new",
             "resumed": "resumed"}.get(st.get(stage, ""), st.get(stage, ""))
        return f"({s}, {sec[stage]:.1f} s)" if stage in sec else ""

    rows = [
        ("text", f"{r.source}", note("text")),
        ("train / valid text", f"{r.train_text}  {r.valid_text}", note("split")),
        ("tokenizer", f"{r.tokenizer_dir}", note("tokenizer")),
        ("token ids", f"{r.train_tokens}  {r.valid_tokens}", note("encode")),
        ("run", f"{r.run_dir}", note("train")),
        ("checkpoint", f"{r.checkpoint}", ""),
        ("story", f"{r.story_file}", ""),
    ]
    for label, where, how in rows:
        line = Text(f"{label:<19}", style="bold")
        line.append(where)
        if how:
            line.append(f"  {how}", style="dim")
        console.print(line, soft_wrap=True)
    best = f", best validation loss {r.best_val_loss:.3f}" if r.best_val_loss is not None else ""
    speed = f" at {r.tokens_per_s / 1e3:.1f}K tokens/s" if r.tokens_per_s else ""
    console.print(f"model: {qs.model_label(r)} on {r.device}, {r.steps:,}/{r.max_steps:,} steps{speed}{best}; "
                  f"total {total_s / 60:.1f} min", soft_wrap=True)
    console.print("\n[bold]next[/bold]")
    for what_, cmd in qs.next_commands(r):
        console.print(f"  [dim]# {what_}[/dim]", soft_wrap=True)
        console.print(f"  {cmd}", soft_wrap=True, markup=False, highlight=False)
    if r.stages.get("train") == "skipped":
        console.print("[dim]training was already finished; pass --force to start everything over[/dim]", soft_wrap=True)
