"""Run directories: where a training run keeps its files, and how other commands find them.

    runs/<name>/
        config.json                     resolved preset + model + train config, parameter count, token budget
        tokenizer/                      a copy of the tokenizer the run was trained with
        metrics.jsonl                   one JSON object per logged step / evaluation
        checkpoints/step_0001000.safetensors   full state (model, optimizer, RNG, sampler); last K kept
        checkpoints/best.safetensors    weights with the lowest validation loss so far
        README.md                       what the run is, on what, its results and how to use it
        .tslm.lock                      while a process trains it: that process's PID and host
    runs/latest -> <name>               the newest run

One process owns a run directory at a time (`RunLock`); `tslm eval`, `generate` and `export` may read
a run that is being trained. Starting a run over (`--force`) removes only what a run writes
(`clear_run`), and a directory holding anything else is refused (`foreign_entries`).

`tslm eval` and `tslm generate` accept a run name, a run directory or a checkpoint file, and
default to `runs/latest` (`resolve_run`, `checkpoint_for`). Building the model from those files is one floor
up, in `tinystories_cli.trained`; `load_trained_model` and `model_from_checkpoint` stay importable from here
(loaded on first use, so this module never imports the model):

    >>> model, tokenizer, cfg = load_trained_model("runs/latest")      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tinystories_cli import paths
from tinystories_cli.config import ModelConfig, format_validation_error
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import atomic_write_text, fsync_dir, read_json
from tinystories_cli.tokenizer.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
BEST_CHECKPOINT = "best.safetensors"
LATEST_LINK = "latest"
EVAL_PREFIX = "eval_"                # eval_<data>.json: results of `tslm eval`
PREFERRED_EVAL = "eval_valid.json"
README_FILE = "README.md"
STORY_FILE = "story.txt"             # written by tslm quickstart
LOCK_FILE = ".tslm.lock"
ABANDONED_PREFIX = "abandoned-"      # checkpoints/abandoned-<time>/: a branch left by resuming earlier
# What a run writes at its top level (plus eval_*.json); `clear_run` removes only these.
TENSORBOARD_DIR = "tensorboard"      # --log tensorboard: event files (events.out.tfevents.*)
WANDB_DIR = "wandb"                  # --log wandb: W&B's own files (kept by --force: unsynced offline runs)
WANDB_ID_FILE = "wandb-run-id"       # --log wandb: the W&B run id a resumed run continues
RUN_FILES = (CONFIG_FILE, METRICS_FILE, README_FILE, STORY_FILE, LOCK_FILE, WANDB_ID_FILE)
TB_EVENTS_PREFIX = "events.out.tfevents."
_STEP_RE = re.compile(r"^step_(\d+)\.safetensors$")

# Names that moved up to `tinystories_cli.trained` and stay importable from here (the library contract names
# `tinystories_cli.runs.load_trained_model`). Resolved on first access, so importing `runs` never imports
# the model; tests/test_layout.py lists them as the allowed lazy re-exports.
LAZY_REEXPORTS = {"load_trained_model": "tinystories_cli.trained", "model_from_checkpoint": "tinystories_cli.trained"}


def __getattr__(name: str):
    if name in LAZY_REEXPORTS:
        import importlib
        return getattr(importlib.import_module(LAZY_REEXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *LAZY_REEXPORTS])


def step_checkpoint_name(step: int) -> str:
    """The file name of the full checkpoint at `step`.

    >>> step_checkpoint_name(1000)
    'step_0001000.safetensors'
    """
    return f"step_{step:07d}.safetensors"


def runs_root() -> Path:
    return paths.RUNS_ROOT


def resolve_run(run: str | os.PathLike | None) -> Path:
    """A run directory or checkpoint file from a name, a path, or None (= runs/latest)."""
    if run is None:
        latest = runs_root() / LATEST_LINK
        if not latest.exists():
            raise UserError(f"no run given and {latest} does not exist", "train one with `tslm train preset=debug`, "
                            "or pass a run name, run directory or checkpoint file")
        return latest.resolve()
    p = Path(run)
    if p.exists():
        return p.resolve() if p.is_symlink() else p
    under = runs_root() / str(run)
    if under.exists():
        return under.resolve() if under.is_symlink() else under
    known = sorted(d.name for d in runs_root().iterdir() if d.is_dir()) if runs_root().is_dir() else []
    hint = f"runs found: {', '.join(known[:8])}" if known else "train one first with `tslm train`"
    raise UserError(f"no run or checkpoint named {run!r} (looked for {p} and {under})", hint)


def run_dir_of(path: Path) -> Path:
    """The run directory of a run dir or of a checkpoint file inside `<run>/checkpoints/`."""
    if path.is_dir():
        return path
    parent = path.parent
    return parent.parent if parent.name == CHECKPOINT_DIR else parent


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the full checkpoints of a run, oldest first."""
    d = Path(run_dir) / CHECKPOINT_DIR
    if not d.is_dir():
        return []
    found = []
    for f in d.iterdir():
        m = _STEP_RE.match(f.name)
        if m and f.is_file():
            found.append((int(m.group(1)), f))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = step_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def best_checkpoint(run_dir: Path) -> Path | None:
    p = Path(run_dir) / CHECKPOINT_DIR / BEST_CHECKPOINT
    return p if p.is_file() else None


def checkpoint_for(path: Path, prefer_best: bool = True) -> Path:
    """The checkpoint file to load for a run dir (best if present, else the latest) or a file as given."""
    if path.is_file():
        return path
    best = best_checkpoint(path) if prefer_best else None
    ckpt = best or latest_checkpoint(path)
    if ckpt is None:
        raise UserError(f"run {path} has no checkpoints yet", "train it (or wait for the first `save_every` step)")
    return ckpt


def describe_source(run: str | os.PathLike | None, prefer_best: bool = True) -> str:
    """One line naming what `run` (a name, a path or None) loads: the checkpoint file and its run, and that
    runs/latest stood in when no run was given."""
    target = resolve_run(run)
    ckpt = checkpoint_for(target, prefer_best)
    via = f" ({runs_root() / LATEST_LINK}: no run given)" if run is None else ""
    return f"using {ckpt} of run {run_dir_of(target).resolve() if run is None else run_dir_of(target)}{via}"


def read_run_config(run_dir: Path) -> dict[str, Any]:
    f = Path(run_dir) / CONFIG_FILE
    if not f.is_file():
        raise UserError(f"{run_dir} is not a tslm run directory (no {CONFIG_FILE})", "pass a directory under runs/")
    data = read_json(f, "run config", "the run directory is damaged")
    if not isinstance(data, dict) or "model" not in data:
        raise UserError(f"{f} is not a tslm run config", "the run directory is damaged")
    return data


def tokenizer_dir_of(run_dir: Path) -> Path:
    return Path(run_dir) / TOKENIZER_DIR


def load_tokenizer(tokenizer_dir: Path):
    """The Tokenizer saved in a run (or any `tslm bpe` output directory)."""
    if not Path(tokenizer_dir).is_dir():
        raise UserError(f"tokenizer directory not found: {tokenizer_dir}",
                        "train a tokenizer with `tslm bpe` or copy the run's tokenizer/ back")
    return Tokenizer.from_dir(tokenizer_dir)


def model_config_of(ckpt, run_dir: Path):
    """The ModelConfig stored in a checkpoint's metadata, else in the run's config.json (one-line errors)."""
    data = ckpt.metadata.get("model_config")
    if data is None:
        data = read_run_config(run_dir)["model"]
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, f"model config in {ckpt.source}"),
                        "the checkpoint or run directory is damaged") from None


def update_latest_link(run_dir: Path) -> None:
    """Point <runs root>/latest at `run_dir` (a relative link: a new link, then an atomic rename over the
    old one). Only for runs directly under the runs root; a `latest` that is not a symlink (a file or
    directory someone made) is never replaced. Silently skipped where symlinks are not allowed."""
    run_dir = Path(run_dir)
    root = run_dir.parent
    link = root / LATEST_LINK
    if root.resolve() != runs_root().resolve() or (link.exists() and not link.is_symlink()):
        return
    tmp = root / f".{LATEST_LINK}.{os.getpid()}.tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(run_dir.name, tmp, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


# ---------------------------------------------------------------------------------------------
# metrics.jsonl and eval_*.json: the one reader of each
# ---------------------------------------------------------------------------------------------


def finite(v) -> float | None:
    """`v` as a float when it is a finite number, else None (NaN, inf, null, strings, bools).

    >>> finite(2), finite(float("nan")), finite(True), finite("3")
    (2.0, None, None, None)
    """
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl. A half-written last line (a run still writing) is skipped;
    a malformed line elsewhere is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no metrics file: {path}",
                        "has this run logged anything yet? `tslm train` writes metrics.jsonl")
    records: list[dict] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()  # metrics files are small (one line per logged step)
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)  # Python's json accepts NaN / Infinity as written by json.dumps
        except (json.JSONDecodeError, RecursionError):
            if lineno == len(lines):
                break  # the run is writing this line right now
            raise UserError(f"malformed line {lineno} in {path}", "each line must be one JSON object") from None
        if isinstance(rec, dict):
            records.append(rec)
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint's `step` (they will be logged again) and a
    half-written last line from a killed run."""
    if not path.is_file():
        return
    keep = [json.dumps(r) for r in read_metrics(path) if isinstance(r.get("step", 0), int) and r.get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def summarize_metrics(records: list[dict]) -> dict[str, Any]:
    """Last step/tokens/time and the best and final validation loss of a run's metrics records.

    >>> s = summarize_metrics([{"step": 1, "tokens": 8, "val_loss": 3.0}, {"step": 2, "tokens": 16, "val_loss": 3.5}])
    >>> s["steps"], s["tokens"], s["best_val_loss"], s["best_val_step"], s["final_val_loss"]
    (2, 16, 3.0, 1, 3.5)
    """
    out: dict[str, Any] = dict(steps=None, tokens=None, elapsed_s=None, best_val_loss=None, best_val_step=None,
                               final_val_loss=None, final_val_step=None)
    for rec in records:
        step = rec.get("step")
        if isinstance(step, int) and (out["steps"] is None or step >= out["steps"]):
            out["steps"] = step
            out["tokens"] = rec.get("tokens", out["tokens"])
            out["elapsed_s"] = rec.get("elapsed_s", out["elapsed_s"])
        if "val_loss" in rec:
            v = rec["val_loss"]
            out["final_val_loss"] = v if isinstance(v, (int, float)) else None
            out["final_val_step"] = step
            fv = finite(v)
            if fv is not None and (out["best_val_loss"] is None or fv < out["best_val_loss"]):
                out["best_val_loss"], out["best_val_step"] = fv, step
    return out


def summarize_run_metrics(run_dir: Path) -> dict[str, Any]:
    """`summarize_metrics` of a run directory's metrics.jsonl (all None when it has none yet)."""
    f = Path(run_dir) / METRICS_FILE
    return summarize_metrics(read_metrics(f) if f.is_file() else [])


def read_eval_result(run_dir: Path) -> dict | None:
    """The run's `tslm eval` result: eval_valid.json if present, else the newest eval_*.json."""
    files = sorted(Path(run_dir).glob(f"{EVAL_PREFIX}*.json"))
    if not files:
        return None
    preferred = [f for f in files if f.name == PREFERRED_EVAL]
    f = preferred[0] if preferred else max(files, key=lambda p: p.stat().st_mtime)
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(data, dict) or "loss" not in data:
        return None
    return {"loss": data.get("loss"), "perplexity": data.get("perplexity"),
            "bits_per_byte": data.get("bits_per_byte"), "data": data.get("data"), "step": data.get("step"),
            "file": str(f)}


# ---------------------------------------------------------------------------------------------
# Owning, naming and cleaning run directories
# ---------------------------------------------------------------------------------------------


def check_run_name(name: str) -> str:
    """A run name is one plain directory name under runs/ (paths go through an explicit run directory).

    >>> check_run_name("lr-3e-4")
    'lr-3e-4'
    >>> check_run_name("../elsewhere")
    Traceback (most recent call last):
    tinystories_cli.errors.UserError: run name '../elsewhere' is not a plain directory name (no '/', '\\', '..', leading '.', or 'latest') (pass a plain name, or a directory with `run_dir`)
    """  # noqa: E501 (a doctest's expected one-line output)
    bad = (not name or name == LATEST_LINK or name.startswith(".") or any(c in name for c in "/\\\0")
           or os.path.isabs(name))
    if bad:
        raise UserError(f"run name {name!r} is not a plain directory name (no '/', '\\', '..', leading '.', "
                        f"or '{LATEST_LINK}')", "pass a plain name, or a directory with `run_dir`")
    return name


def _ours_in_checkpoints(entry: Path) -> bool:
    name = entry.name
    if entry.is_symlink():
        return False
    if entry.is_file():
        return bool(_STEP_RE.match(name)) or name == BEST_CHECKPOINT or (name.startswith(".") and name.endswith(".tmp"))
    return entry.is_dir() and name.startswith(ABANDONED_PREFIX) and all(
        f.is_file() and not f.is_symlink() and (_STEP_RE.match(f.name) or f.name == BEST_CHECKPOINT)
        for f in entry.iterdir())


def foreign_entries(run_dir: Path) -> list[str]:
    """What `run_dir` holds that a run did not write (paths relative to it), sorted.

    A run writes RUN_FILES, eval_*.json, its atomic-write temporaries, tokenizer/ (plain files) and
    checkpoints/ (step_N, best, abandoned-*/ of those). Symlinks are never ours.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = []
    for entry in run_dir.iterdir():
        name = entry.name
        if entry.is_symlink():
            out.append(name)
        elif entry.is_file():
            if not (name in RUN_FILES or (name.startswith(EVAL_PREFIX) and name.endswith(".json"))
                    or (name.startswith(".") and name.endswith(".tmp"))):
                out.append(name)
        elif name == TOKENIZER_DIR and entry.is_dir():
            out += [f"{name}/{f.name}" for f in entry.iterdir() if f.is_symlink() or not f.is_file()]
        elif name == CHECKPOINT_DIR and entry.is_dir():
            out += [f"{name}/{f.name}" for f in entry.iterdir() if not _ours_in_checkpoints(f)]
        elif name == TENSORBOARD_DIR and entry.is_dir():
            out += [f"{name}/{f.name}" for f in entry.iterdir()
                    if f.is_symlink() or not f.is_file() or not f.name.startswith(TB_EVENTS_PREFIX)]
        elif name == WANDB_DIR and entry.is_dir():
            pass  # W&B's own tree (offline runs, logs); never deleted by tslm
        else:
            out.append(name)
    return sorted(out)


def check_no_foreign(run_dir: Path) -> None:
    """Refuse to start a run in a directory that holds files tslm did not write, naming them."""
    foreign = foreign_entries(run_dir)
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        raise UserError(f"{run_dir} holds files tslm did not write ({shown}); a run never deletes them",
                        "choose another `run_name` (or `run_dir`), or move those files away")


def clear_run(run_dir: Path) -> None:
    """--force: remove what an earlier run wrote into `run_dir` (only that; see `foreign_entries`)."""
    run_dir = Path(run_dir)
    check_no_foreign(run_dir)
    for name in RUN_FILES:
        if name != LOCK_FILE:  # the lock belongs to the process that is starting over
            with contextlib.suppress(FileNotFoundError):
                (run_dir / name).unlink()
    for f in run_dir.glob(f"{EVAL_PREFIX}*.json"):
        f.unlink()
    tok = run_dir / TOKENIZER_DIR
    if tok.is_dir():
        for f in tok.iterdir():
            f.unlink()
        tok.rmdir()
    tb = run_dir / TENSORBOARD_DIR
    if tb.is_dir():  # the earlier run's event files: the new run must not inherit its steps
        for f in tb.glob(f"{TB_EVENTS_PREFIX}*"):
            f.unlink()
        tb.rmdir()
    ckpts = run_dir / CHECKPOINT_DIR
    if ckpts.is_dir():
        for f in ckpts.iterdir():
            shutil.rmtree(f) if f.is_dir() else f.unlink()
        ckpts.rmdir()
    fsync_dir(run_dir)


def remove_stale_temps(run_dir: Path) -> int:
    """Remove the temporary files (`.NAME.*.tmp`) that a killed writer left in a run directory and its
    checkpoints/. Only the owner of the run (who holds its `RunLock`) may call this: no other process of
    ours can be writing there. Returns how many were removed."""
    n = 0
    for d in (Path(run_dir), Path(run_dir) / CHECKPOINT_DIR):
        for f in d.glob(".*.tmp") if d.is_dir() else ():
            if f.is_file() and not f.is_symlink():
                f.unlink()
                n += 1
    return n


def abandon_later_checkpoints(run_dir: Path, step: int, best_step: int | None) -> Path | None:
    """Resuming from `step` of a run that went further: move the later step checkpoints (and a best
    checkpoint from after `step`) to checkpoints/abandoned-<UTC time>/, out of the current trajectory.
    Returns that directory, or None when there was nothing later."""
    later = [p for s, p in step_checkpoints(run_dir) if s > step]
    best = best_checkpoint(run_dir)
    if best is not None and (best_step is None or best_step > step):
        later.append(best)
    if not later:
        return None
    dest = Path(run_dir) / CHECKPOINT_DIR / f"{ABANDONED_PREFIX}{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}"
    dest.mkdir()
    for p in later:
        os.rename(p, dest / p.name)
    fsync_dir(dest)
    fsync_dir(dest.parent)
    return dest


class RunLock:
    """One process owns a run directory: `.tslm.lock` holds an exclusive `flock` and the holder's PID and host.

    The kernel drops the lock when its process dies, so a lock left by a killed run is stale by
    construction and the next run takes it over. A second owner is refused with one line naming the holder.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise UserError(f"{self.path.parent} is in use by {holder}",
                                "wait for that run to finish (or stop it), or choose another `run_name`") from None
            # The file may have been removed and re-created by a previous holder as we opened it.
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.now(UTC).isoformat(timespec="seconds")}
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)  # closing drops the flock
        self.fd = None


def lock_holder(run_dir: Path) -> str | None:
    """Who trains `run_dir` right now ("process PID on HOST (since ...)"), or None when nobody holds its lock.
    Only probes the lock (a shared, non-blocking flock, dropped at once); never creates the lock file."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
        return f"process {int(info['pid'])} on {info['host']} (since {info.get('since', '?')})"
    except (ValueError, KeyError, TypeError, RecursionError):
        return "another process"
