"""What a training run shows and hears: the live display (a rich line on a terminal, plain log lines
otherwise), its header, and the SIGINT/SIGTERM handling that turns a signal into a clean stop."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from tinystories_cli import console as terminal
from tinystories_cli import runs
from tinystories_cli.console import console, human_count
from tinystories_cli.train.prepare import Run


def format_duration(seconds: float) -> str:
    """Hours and minutes, or minutes and seconds.

    >>> format_duration(3725), format_duration(65.2)
    ('1h02m', '1m05s')
    """
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Display:
    def __init__(self, mode: str, start_step: int, end_step: int, enabled: bool):
        self.console = console
        if not enabled:
            mode = "quiet"
        elif mode == "auto":
            mode = "rich" if console.is_terminal else "plain"
        self.mode = mode
        self.progress = None
        self.task = None
        if mode == "rich":
            self.progress = Progress(TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(bar_width=24),
                                     TextColumn("{task.fields[stats]}"), console=console, transient=False)
            self.task = self.progress.add_task("train", total=end_step, completed=start_step, stats="starting...")
            self.progress.start()

    def log(self, step: int, end: int, text: str) -> None:
        if self.mode == "rich":
            self.progress.update(self.task, completed=step, stats=text)
        elif self.mode == "plain":
            print(f"step {step}/{end} | {text}", flush=True)

    def retotal(self, end_step: int) -> None:
        """The run now ends at `end_step` (its schedule was shortened or lengthened)."""
        if self.mode == "rich":
            self.progress.update(self.task, total=end_step)

    def note(self, text: str) -> None:
        text = terminal.show_parameters(text)
        if self.mode == "rich":
            self.progress.console.print(text, soft_wrap=True, markup=False)
        elif self.mode == "plain":
            print(text, flush=True)

    def warn(self, text: str) -> None:
        """A warning: shown like a note, and on stderr even when the display is quiet."""
        if self.mode == "quiet":
            print(terminal.show_parameters(text), file=sys.stderr, flush=True)
        else:
            self.note(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class Signals:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and exits at the end of the step.
    A second Ctrl-C interrupts immediately.

    An inherited SIG_IGN for SIGINT is respected: a shell starts background jobs (`cmd &`, CI runners,
    `nohup`) with SIGINT ignored so that a Ctrl-C at the terminal does not reach them, and that choice
    belongs to whoever started us. SIGTERM is always handled: it is how schedulers ask for a clean stop."""

    def __init__(self):
        self.stop = False
        self.signame = ""
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
                    continue
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop = True
        self.signame = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def print_header(display: Display, run: Run, summary: dict, peak_note: str, start_step: int, notes: list[str]) -> None:
    cfg, tc = run.model_cfg, run.train_cfg
    lines = [
        f"run {run.run_dir}  ({'new' if run.fresh else f'resuming from step {start_step}: {run.resume_from}'}; "
        f"resolved config in {run.run_dir / runs.CONFIG_FILE})",
        f"preset {run.preset}  model: vocab {cfg.vocab_size}, ctx {cfg.context_length}, {cfg.num_layers} x "
        f"d{cfg.d_model}, {cfg.num_heads} heads, d_ff {cfg.d_ff}, {cfg.norm_position}-{cfg.norm}, {cfg.pos_emb}, "
        f"{cfg.ffn}, {'tied' if cfg.tie_embeddings else 'untied'}, init {cfg.init}",
        f"train: {optimizer_label(tc)}, lr {tc.lr:g} -> {tc.min_lr:g}, warmup {tc.warmup_steps}, "
        f"wd {tc.weight_decay:g}, betas "
        f"({tc.beta1:g}, {tc.beta2:g}), clip {tc.grad_clip:g}, batch {tc.batch_size} x accum {tc.grad_accum_steps} "
        f"x {summary['world_size']} proc, seed {tc.seed}, device {summary['device']}, "
        f"dtype {summary['chosen']['dtype']}"
        f"{' (auto)' if tc.dtype == 'auto' else ''}"
        f"{', compile' + (' (auto)' if tc.compile is None else '') if summary['chosen']['compile'] else ''}"
        f"{', ' + summary['chosen']['parallel'] if summary['chosen']['parallel'] != 'none' else ''}"
        f"{', activation checkpointing' if tc.activation_checkpointing else ''}",
        f"parameters {human_count(summary['parameters'])} ({summary['parameters']:,})  tokens/step "
        f"{summary['tokens_per_step']:,}  steps {run.max_steps:,}"
        + (f" (stopping at {run.end_step:,})" if run.end_step < run.max_steps else "")
        + f"  planned tokens {human_count(summary['planned_tokens'])}",
        f"MFU against {peak_note}",
    ]
    if display.mode == "quiet":
        return
    for line in lines + [f"note: {n}" for n in notes]:
        display.note(line)


def optimizer_label(tc) -> str:
    """How the header names the optimizer.

    >>> from tinystories_cli.config import TrainConfig
    >>> optimizer_label(TrainConfig()), optimizer_label(TrainConfig(optimizer="muon"))
    ('adamw', 'muon (lr 0.02, momentum 0.95) on the hidden matrices + adamw')
    """
    if tc.optimizer != "muon":
        return tc.optimizer
    return f"muon (lr {tc.muon_lr:g}, momentum {tc.muon_momentum:g}) on the hidden matrices + adamw"
