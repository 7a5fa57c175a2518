"""`tslm quickstart`: download -> tokenizer -> encode -> train -> a story, in one command."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from tinystories_cli import quickstart as qs
from tinystories_cli.cli import common
from tinystories_cli.console import console, err_console, human_bytes

COMMAND_KWARGS = {"no_args_is_help": False}
# The library's `time_budget` (a run with a deadline: "`time_budget` spent at step N") is quickstart's --minutes.
FLAG_RENAMES = {"time_budget": "--minutes"}



@common.with_options(common.config_options(qs.QuickstartOptions, None))
def command(
    plain: Annotated[bool, typer.Option("--plain", help="Plain training log lines instead of the live display.",
                                        rich_help_panel=qs.ADVANCED)] = False,
    settings: dict | None = None,
) -> None:
    """From nothing to a generated story: download, train a tokenizer, encode, train a small model for
    --minutes, then tell a story. Rerunning skips what is done (and resumes an interrupted run)."""
    opts = qs.QuickstartOptions(**common.options_from(qs.QuickstartOptions, settings),
                                display="plain" if plain else "auto")
    t0 = time.perf_counter()
    console.rule("[bold]tslm quickstart", align="left")
    out = _Output()
    from tinystories_cli.cli.download import progress_bar
    from tinystories_cli.download import DownloadInterrupted
    from tinystories_cli.tokenizer.chunking import Interrupted

    try:
        try:
            result = qs.run_quickstart(opts, out.notify, download_progress=progress_bar, bpe_progress=out.bars[0],
                                       encode_progress=out.bars[1], on_story_text=out.on_story_text)
        finally:
            out.close_bars()
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


class _Output:
    """What the pipeline prints: a line per stage (`notify`), the stages' progress bars, the streamed story."""

    def __init__(self):
        self.bars = (_StageBar(_bpe_label), _StageBar(_encode_label))
        self.train_started = False
        self.story_started = False

    def close_bars(self) -> None:
        for b in self.bars:
            b.close()

    def notify(self, stage: str, message: str) -> None:
        self.close_bars()  # a line from the pipeline means the stage that drew a bar is over
        if stage == "train" and not self.train_started:
            console.rule("[bold]train", align="left")
            self.train_started = True
        console.print(f"[bold cyan]{stage}[/bold cyan] {message}", soft_wrap=True, highlight=False)

    def on_story_text(self, chunk: str) -> None:
        if not self.story_started:
            self.close_bars()
            console.rule("[bold]a story from your model", align="left")
            console.print(Text(chunk, style="bold"), end="", soft_wrap=True)
            self.story_started = True
        else:
            console.file.write(chunk)
        console.file.flush()


class _StageBar:
    """Progress bars of one stage (tokenizer, encode) on stderr, shown only on a terminal.

    The bar starts at the first progress callback and `close()` ends it when the stage ends (the
    next `notify` line, the story, an error): it is transient, so nothing of it stays on the screen,
    and no live display redraws over what is printed later (the training log, the streamed story)."""

    def __init__(self, label):
        self._label = label
        self._bar: Progress | None = None
        self._tasks: dict[str, int] = {}

    def __call__(self, key: str, done: int, total: int, *_rest) -> None:
        if self._bar is None:
            if not err_console.is_terminal:
                return
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                 TimeElapsedColumn(), console=err_console, transient=True)
            self._bar.start()
        if key not in self._tasks:
            self._tasks[key] = self._bar.add_task(self._label(key), total=max(total, 1))
        self._bar.update(self._tasks[key], completed=done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            self._tasks.clear()


def _bpe_label(phase: str) -> str:
    return "tokenizer: pre-tokenize" if phase == "pretokenize" else "tokenizer: merge"


def _encode_label(name: str) -> str:
    return f"encode {name}"


def _render(r: qs.QuickstartResult, total_s: float) -> None:
    console.rule("[bold]done", align="left")
    st, sec = r.stages, r.seconds

    def note(stage: str) -> str:
        s = {
            "skipped": "already there",
            "given": "--text",
            "downloaded": "downloaded",
            "bundled": "bundled sample, offline",
            "done": "new",
            "resumed": "resumed",
        }.get(st.get(stage, ""), st.get(stage, ""))
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
    best = (f", best validation loss {r.best_val_loss:.3f} (sampled estimate; `tslm eval` gives the whole-file loss)"
            if r.best_val_loss is not None else "")
    speed = f" at {r.tokens_per_s / 1e3:.1f}K tokens/s" if r.tokens_per_s else ""
    console.print(f"model: {qs.model_label(r)} on {r.device}, {r.steps:,}/{r.max_steps:,} steps{speed}{best}; "
                  f"total {total_s / 60:.1f} min", soft_wrap=True)
    console.print("\n[bold]next[/bold]")
    for what_, cmd in qs.next_commands(r):
        console.print(f"  [dim]# {what_}[/dim]", soft_wrap=True)
        console.print(f"  {cmd}", soft_wrap=True, markup=False, highlight=False)
    if r.stages.get("train") == "skipped":
        console.print("[dim]training was already finished; pass --force to start everything over[/dim]", soft_wrap=True)
