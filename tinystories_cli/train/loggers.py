"""Where a run's metrics go besides metrics.jsonl: TensorBoard and Weights & Biases (`--log tensorboard,wandb`).

metrics.jsonl is always written (by the loop); these loggers get the same records:

    loggers = open_loggers(["tensorboard"], run_dir, config=summary, start_step=0)
    loggers.log_metrics(step, record)   # the record written to metrics.jsonl: numbers become scalars
    loggers.log_text(step, "samples", text)
    loggers.close()

A logger is a small component (the `Logger` protocol): `log_metrics`, `log_text`, `close`, and
`state_dict` / `load_state_dict` for what a resumed run needs (W&B's run id). `MultiLogger` fans a call
out to every logger and catches their failures: the first one prints a single warning, that logger is
switched off, and training goes on (the record is already in metrics.jsonl).

Resume continues the same logs with no duplicated or missing steps: TensorBoard reopens the run's
event directory with `purge_step` at the first step after the checkpoint (events a killed run wrote past
the checkpoint are dropped by every TensorBoard reader, as metrics.jsonl drops its lines); W&B reopens the
run whose id is stored in the run directory (`resume="allow"`), and steps it already holds are not sent again.

Both packages are optional (the `track` extra); `check_available` refuses a missing one before a run
starts, in one line naming the extra.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import secrets
import string
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from tinystories_cli import runs
from tinystories_cli.config import LOGGERS, parse_log  # noqa: F401 (parse_log: part of this API)
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import atomic_write_text

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # logger -> the module it needs
EXTRA_HINT = 'pip install -e ".[track]" (or pip install "tslm[track]")'
# <run>/tensorboard/events.out.tfevents.*; <run>/wandb/ (W&B's own files: offline runs to `wandb sync`);
# <run>/wandb-run-id (the W&B run id, so a resumed run continues the same W&B run)
TENSORBOARD_DIR, WANDB_DIR, WANDB_ID_FILE = runs.TENSORBOARD_DIR, runs.WANDB_DIR, runs.WANDB_ID_FILE
WANDB_PROJECT = "tslm"

# metrics.jsonl key -> scalar name; any other numeric key is logged under its own name.
SCALAR_NAMES = {
    "train_loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
    "tokens_per_s": "perf/tokens_per_s", "mfu": "perf/mfu", "val_loss": "val/loss", "val_ppl": "val/ppl",
    "val_bpb": "val/bits_per_byte", "tokens": "train/tokens", "elapsed_s": "perf/elapsed_s",
    "skipped_steps": "train/skipped_steps", "loss_scale": "train/loss_scale",
}


def names_of(log: str) -> list[str]:
    return [n for n in log.split(",") if n]


def check_available(log: str) -> None:
    """Refuse (one line, naming the extra) a logger whose package is not installed."""
    missing = [n for n in names_of(log) if importlib.util.find_spec(PACKAGES[n]) is None]
    if missing:
        pkgs = " and ".join(PACKAGES[n] for n in missing)
        raise UserError(f"logging to {', '.join(missing)} needs the {pkgs} package, which is not installed",
                        f"install the track extra: {EXTRA_HINT}")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record under their scalar names (step and flags left out)."""
    out = {}
    for k, v in record.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        out[SCALAR_NAMES.get(k, k)] = float(v)
    return out


class Logger(Protocol):
    name: str

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None: ...
    def log_text(self, step: int, tag: str, text: str) -> None: ...
    def close(self) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TensorBoardLogger:
    """Event files in <run>/tensorboard/ through `torch.utils.tensorboard.SummaryWriter`."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict | None, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = Path(run_dir) / TENSORBOARD_DIR
        had_events = log_dir.is_dir() and any(log_dir.glob("events.out.tfevents.*"))
        # On resume: every reader drops what an earlier writer logged at steps >= purge_step.
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step > 0 else None)
        if config is not None and not had_events:
            self.log_text(start_step, "config", "```\n" + json.dumps(config, indent=2) + "\n```")

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        for tag, value in scalars(metrics).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class WandbLogger:
    """A W&B run named after the run directory, its files in <run>/wandb/; the run id is kept in
    <run>/wandb-run-id so a resumed run continues it. WANDB_MODE=offline works without a network."""

    name = "wandb"

    def __init__(self, run_dir: Path, config: dict | None, start_step: int):
        import wandb

        run_dir = Path(run_dir)
        self.id_file = run_dir / WANDB_ID_FILE
        self.run_id = read_run_id(self.id_file) if start_step > 0 else None
        if self.run_id is None:
            self.run_id = new_run_id()
            atomic_write_text(self.id_file, self.run_id + "\n")
        (run_dir / WANDB_DIR).mkdir(exist_ok=True)
        self.run = wandb.init(project=WANDB_PROJECT, name=run_dir.name, config=config, id=self.run_id,
                              resume="allow", dir=str(run_dir))
        self.first_new = int(getattr(self.run, "starting_step", 0) or 0)  # steps below it are already there

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        if step >= self.first_new:
            self.run.log(scalars(metrics), step=step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        if step >= self.first_new:
            import wandb
            self.run.log({tag: wandb.Html(f"<pre>{_html_escape(text)}</pre>")}, step=step)

    def close(self) -> None:
        self.run.finish()

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id", self.run_id)


def new_run_id() -> str:
    """A W&B-style run id: 8 random lowercase letters and digits."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def read_run_id(path: Path) -> str | None:
    """The stored W&B run id, or None when absent or not an id (a damaged file starts a new W&B run)."""
    try:
        text = path.read_text(encoding="utf-8").strip() if path.is_file() and not path.is_symlink() else ""
    except (OSError, UnicodeDecodeError):
        return None
    return text if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", text) else None


FACTORIES: dict[str, Callable[[Path, dict | None, int], Logger]] = {
    "tensorboard": TensorBoardLogger, "wandb": WandbLogger}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class MultiLogger:
    """Every logger, each switched off (with one warning) at its first failure; never raises."""

    def __init__(self, loggers: list[Logger], warn: Callable[[str], None] = _stderr):
        self.loggers = list(loggers)
        self.warn = warn

    def _each(self, what: str, call: Callable[[Logger], None]) -> None:
        for lg in list(self.loggers):
            try:
                call(lg)
            except Exception as e:  # a logger must never take the run down
                self.loggers.remove(lg)
                self.warn(f"warning: the {lg.name} logger failed in {what} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160] if str(e) else ''}); it is off for the rest of the run, "
                          "metrics.jsonl has every record")

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        self._each("log_metrics", lambda lg: lg.log_metrics(step, metrics))

    def log_text(self, step: int, tag: str, text: str) -> None:
        self._each("log_text", lambda lg: lg.log_text(step, tag, text))

    def close(self) -> None:
        self._each("close", lambda lg: lg.close())
        self.loggers = []

    def state_dict(self) -> dict[str, Any]:
        return {lg.name: lg.state_dict() for lg in self.loggers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for lg in self.loggers:
            if lg.name in state:
                lg.load_state_dict(state[lg.name])

    @property
    def names(self) -> list[str]:
        return [lg.name for lg in self.loggers]


def open_loggers(names: list[str], run_dir: Path, config: dict | None = None, start_step: int = 0,
                 warn: Callable[[str], None] = _stderr) -> MultiLogger:
    """The loggers named (see `parse_log`), opened on `run_dir`; one that fails to start is left out with
    a warning (training goes on)."""
    opened: list[Logger] = []
    for name in names:
        try:
            opened.append(FACTORIES[name](Path(run_dir), config, start_step))
        except Exception as e:
            warn(f"warning: the {name} logger did not start ({type(e).__name__}: "
                 f"{str(e).splitlines()[0][:160] if str(e) else ''}); training goes on with metrics.jsonl")
    return MultiLogger(opened, warn)
