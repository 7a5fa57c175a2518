"""`tslm quickstart`: from nothing to a generated story with one command.

The pipeline is the one a user would type by hand, run with defaults sized for the machine:

    1. text       download TinyStories' validation file (22 MB) into data/tinystories/valid.txt,
                  or use --text FILE
    2. split      data/quickstart/train.txt + valid.txt: the last 5% of the documents (separated
                  by <|endoftext|>; blank lines or lines when there is none) are held out
    3. tokenizer  byte-level BPE (default 2048 ids) on the first 4 MB of train.txt
                  -> data/quickstart/tokenizer/
    4. encode     data/quickstart/train.npy + valid.npy (token ids, with .json sidecars)
    5. train      runs/quickstart/: on a CPU the model the size rule picks for the budget
                  (`train.autosize`; --preset forces one; tinystories-17m on a GPU), for at most
                  --minutes of wall-clock time (see `train.budget`)
    6. story      a sample from the trained model, printed and saved in runs/quickstart/story.txt

Every stage is skipped when its output is already there and matches (so rerunning after Ctrl-C
continues where it stopped: an interrupted download resumes from its .part, an interrupted
training run from its last checkpoint). An output that exists but does not match (another
--text, another --vocab-size) is an error that names the fix: --force redoes every stage.

Bounded time: the training schedule (cosine, warmup) must know its length before the first step,
so the number of steps is computed up front. A short probe times real optimizer steps of the
chosen model on the chosen device, and `budget.plan_bounded_run` turns the remaining budget into steps:

    >>> plan = budget.plan_bounded_run(budget_s=600, tokens_per_s=10_000, tokens_per_step=8192,
    ...                   train_tokens=5_000_000, eval_tokens=81_920)
    >>> plan.steps, plan.limited_by
    (640, 'time')

The budget is also a deadline the training loop keeps (`train.time_plan`): should the machine slow
down after the probe, the schedule is shortened so that it still decays and ends in time; should the
probe have under-read the machine, the auto size's WSD schedule is lengthened while still flat (up to
MAX_EPOCHS passes over the data).

This module does not print: the CLI passes `notify(stage, message)` and progress callbacks.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tinystories_cli import download as dl
from tinystories_cli import paths, runs, sample
from tinystories_cli import train as tl
from tinystories_cli.config import PRESETS, TrainConfig, get_preset, option
from tinystories_cli.device import pick_device
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import (
    atomic_write_bytes,
    atomic_write_text,
    check_input_file,
    check_source_outside,
    remove_stale_temps,
    sha256_file,
    temp_prefix,
)
from tinystories_cli.generate import generate_samples
from tinystories_cli.sampling_grid import run_grid
from tinystories_cli.tokenizer import bpe
from tinystories_cli.tokenizer.bpe import default_workers
from tinystories_cli.tokenizer.chunking import signals_raise
from tinystories_cli.tokenizer.encode import encode_file
from tinystories_cli.tokens import check_tokens
from tinystories_cli.train import autosize, budget
from tinystories_cli.train.budget import MAX_EPOCHS, MIN_STEPS, NUM_EVALS, StepPlan, eval_batches_for  # noqa: F401

DATASET = "quickstart"            # data/quickstart/: never collides with a real `tslm download` dataset
RUN_NAME = "quickstart"           # runs/quickstart/
SOURCE_DATASET = "tinystories"    # what is downloaded without --text ...
SOURCE_SPLIT = "valid"            # ... only its 22 MB validation file
SAMPLE_DATASET = "tinystories-sample"  # data/tinystories-sample/: the bundled sample, used when offline
EOT = "<|endoftext|>"
VALID_FRACTION = 0.05             # documents held out for validation
MAX_TEXT_BYTES = 64 << 20         # a larger --text is cut (at a document boundary) to this much
BPE_SAMPLE_BYTES = 4 << 20        # the tokenizer is trained on this much of train.txt
DEFAULT_VOCAB_SIZE = 2048
DEFAULT_MINUTES = 10.0
CPU_PRESET = "tinystories-cpu"
GPU_PRESET = "tinystories-17m"
DEFAULT_PROMPT = "Once upon a time"
STORY_FILE = "story.txt"
SOURCE_RECORD = "source.json"     # written last by the split stage: marks data/quickstart/*.txt complete
# The story's sampling settings: every cell of this grid samples GRID_SAMPLES continuations of the prompt
# (same seeds in every cell), and `pick_sampling` takes the most conservative cell that does not loop.
STORY_GRID = {"temperature": [0.5, 0.7, 0.9, 1.0], "top_p": [0.9, 1.0]}
GRID_SAMPLES = 3
GRID_TOKENS = 120
# Limits from real text: over the first 120 words of 400 TinyStories validation stories, 90% have a 4-gram
# repetition rate <= 0.017, and 90% of 3-story pools have distinct-2 >= 0.847.
MAX_REPETITION = 0.02
MIN_DISTINCT_2 = 0.8

Notify = Callable[[str, str], None]  # notify(stage, message)
# download_progress(file name) -> context manager yielding a `download.Progress` callback (a progress bar)
ProgressScope = Callable[[str], contextlib.AbstractContextManager[Callable]]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while training: a checkpoint was saved and a rerun continues from it."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)


ADVANCED = "Advanced"  # the help panel of the options most users never need


@dataclass
class QuickstartOptions:
    """`tslm quickstart`'s options, each declared once: its description is its `--help` (`config.option`)."""

    text: Path | None = option(None, "Learn from this UTF-8 text file instead of downloading TinyStories' validation "
                               "file (documents separated by <|endoftext|> or blank lines).")
    # training wall-clock budget (the probe included)
    minutes: float = option(DEFAULT_MINUTES, "Wall-clock budget for training (the rest takes about a minute more).",
                            show_default=True)
    # data/ and runs/ go under it (default: $TSLM_DATA / $TSLM_RUNS or ./)
    workdir: Path | None = option(None, "Work directory: data/ and runs/ go under it (default: the current "
                                  "directory).", flags=("--dir",))
    vocab_size: int = option(DEFAULT_VOCAB_SIZE, "Tokenizer vocabulary size.", show_default=True)
    device: str = option("auto", TrainConfig.model_fields["device"].description, show_default=True)  # the one help
    force: bool = option(False, "Redo every stage (a complete download is kept).")
    # default: CPU_PRESET, or GPU_PRESET on CUDA
    preset: str | None = option(None, f"A fixed model preset instead of the auto size (default on a CPU: the size and "
                                f"learning rate that the measured rule picks for --minutes, see README; on a CUDA GPU: "
                                f"{GPU_PRESET}).", panel=ADVANCED)
    # download mirror (see `tslm download --endpoint`)
    endpoint: str | None = option(None, "Hugging Face mirror URL or local mirror directory (default: $HF_ENDPOINT, "
                                  "else https://huggingface.co).", panel=ADVANCED)
    prompt: str = option(DEFAULT_PROMPT, "Start of the story.", panel=ADVANCED, show_default=True)
    max_new_tokens: int = option(200, "Length limit of the story in tokens.", flags=("--max-tokens",), panel=ADVANCED,
                                 show_default=True)
    # None (with top_p None): chosen by `pick_sampling` from STORY_GRID
    temperature: float | None = option(None, "Sampling temperature of the story.", cli=False)
    top_p: float | None = option(None, "Top-p of the story's sampling.", cli=False)
    seed: int = option(0, "Sampling seed for the story.", panel=ADVANCED, show_default=True)
    # passed to the training loop: auto | rich | plain | quiet (`tslm quickstart --plain`)
    display: str = option("auto", "How training progress is shown.", cli=False)


@dataclass
class QuickstartResult:
    workdir: Path
    source: Path
    train_text: Path
    valid_text: Path
    tokenizer_dir: Path
    train_tokens: Path
    valid_tokens: Path
    run_dir: Path
    checkpoint: Path
    story_file: Path
    story: str
    preset: str
    device: str
    steps: int = 0
    max_steps: int = 0
    best_val_loss: float | None = None
    tokens_per_s: float = 0.0
    stages: dict[str, str] = field(default_factory=dict)      # stage -> "done" | "skipped" | "resumed"
    seconds: dict[str, float] = field(default_factory=dict)   # stage -> wall-clock seconds
    plan: StepPlan | None = None
    auto_size: dict | None = None     # what the size rule chose (None: the fixed preset)
    sampling: dict = field(default_factory=lambda: {"temperature": 0.8, "top_p": 0.95})  # the story's


# ----------------------------------------------------------------------------------------------
# Where things go
# ----------------------------------------------------------------------------------------------


def roots(workdir: Path | None) -> tuple[Path, Path]:
    """(data root, runs root): WORKDIR/data and WORKDIR/runs, or the usual defaults.

    >>> [p.as_posix() for p in roots(Path("/tmp/qs"))]
    ['/tmp/qs/data', '/tmp/qs/runs']
    """
    if workdir is None:
        return paths.DATA_ROOT, paths.RUNS_ROOT
    return Path(workdir) / "data", Path(workdir) / "runs"


# ----------------------------------------------------------------------------------------------
# 1-2. Text and the train/valid split
# ----------------------------------------------------------------------------------------------


def interruptible(fn):
    """SIGTERM/SIGINT while `fn` runs (the split, tokenizer and encode stages) raise `chunking.Interrupted`,
    so every temporary file is removed on the way out, as in `tslm bpe` and `tslm encode`. (Training
    handles Ctrl-C itself: it saves a checkpoint.)"""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with signals_raise():
            return fn(*args, **kwargs)
    return run


def fetch_source(opts: QuickstartOptions, data_root: Path, download_progress: ProgressScope | None = None
                 ) -> tuple[Path, str]:
    """The text to learn from: --text, or TinyStories' validation file (downloaded, resumable,
    verified; skipped when complete). Returns (path, "given" | "downloaded" | "skipped")."""
    if opts.text is not None:
        return check_input_file(opts.text, "--text file"), "given"

    (pf,) = dl.plan_dataset(SOURCE_DATASET, SOURCE_SPLIT, data_root, opts.endpoint)
    # --force does not download again: a complete, verified file is as good as a new one.
    with (download_progress(pf.dest.name) if download_progress else contextlib.nullcontext()) as progress:
        res = dl.download_planned(pf, progress=progress)
    return res.path, res.status


def separator_of(data: bytes) -> bytes:
    """What separates documents: <|endoftext|> when present, else blank lines, else newlines.

    >>> separator_of(b"a<|endoftext|>b"), separator_of(b"a\\n\\nb"), separator_of(b"a\\nb")
    (b'<|endoftext|>', b'\\n\\n', b'\\n')
    """
    for sep in (EOT.encode(), b"\n\n", b"\n"):
        if sep in data:
            return sep
    return b"\n"


def split_point(data: bytes, valid_fraction: float = VALID_FRACTION) -> int:
    """Byte offset where validation starts: before the last `valid_fraction` of the documents
    (at least one). `data[:cut]` ends with a separator, so no document is cut in two.

    >>> data = b"".join(b"story %d<|endoftext|>" % i for i in range(40))
    >>> cut = split_point(data)
    >>> data[cut:]
    b'story 38<|endoftext|>story 39<|endoftext|>'
    """
    sep = separator_of(data)
    pieces = data.split(sep)
    docs = [i for i, p in enumerate(pieces) if p.strip()]  # pieces with content (not the "\n" between)
    if len(docs) < 2:
        raise UserError(f"the text holds {len(docs)} document(s); at least 2 are needed to hold one out for "
                        "validation", f"pass a longer text (documents separated by {EOT} or blank lines)")
    k = max(1, round(len(docs) * valid_fraction))
    first_valid = docs[len(docs) - k]
    return sum(len(p) + len(sep) for p in pieces[:first_valid])


def read_text_prefix(path: Path, max_bytes: int = MAX_TEXT_BYTES) -> tuple[bytes, bool]:
    """Up to `max_bytes` of `path`, cut after the last document separator when the file is longer.
    Returns (bytes, truncated)."""
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) <= max_bytes:
        return data, False
    data = data[:max_bytes]
    sep = separator_of(data)
    cut = data.rfind(sep)
    return (data[: cut + len(sep)] if cut > 0 else data), True


def _check_utf8(data: bytes, path: Path) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})",
                        "convert it to UTF-8 first (e.g. iconv -t UTF-8)") from None


@interruptible
def split_text(source: Path, train_out: Path, valid_out: Path, *, force: bool = False) -> tuple[str, dict]:
    """Write train.txt/valid.txt from `source` unless they already hold its split. Returns (status, record)."""
    record_file = train_out.parent / SOURCE_RECORD
    check_source_outside(source, [train_out, valid_out, record_file], "the text to split")
    st = source.stat()
    want = {"source": str(source.resolve()), "size": st.st_size, "valid_fraction": VALID_FRACTION,
            "max_text_bytes": MAX_TEXT_BYTES}
    if not force and record_file.is_file() and train_out.is_file() and valid_out.is_file():
        try:
            rec = json.loads(record_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            rec = {}
        if isinstance(rec, dict) and {k: rec.get(k) for k in want} == want and rec.get("sha256") == sha256_file(source):
            return "skipped", rec
        raise UserError(f"{train_out.parent} was made from another text ({rec.get('source', 'unknown')})",
                        "pass `force` to redo every stage with this text, or use another `workdir`")
    data, truncated = read_text_prefix(source)
    _check_utf8(data, source)
    cut = split_point(data)
    # The record is removed first and written last: while it is missing the split counts as unfinished.
    record_file.unlink(missing_ok=True)
    atomic_write_bytes(train_out, data[:cut])
    atomic_write_bytes(valid_out, data[cut:])
    rec = {**want, "sha256": sha256_file(source), "used_bytes": len(data), "truncated": truncated,
           "train_bytes": cut, "valid_bytes": len(data) - cut}
    atomic_write_text(record_file, json.dumps(rec, indent=1) + "\n")
    return "done", rec


# ----------------------------------------------------------------------------------------------
# 3. Tokenizer
# ----------------------------------------------------------------------------------------------


def bpe_sample(train_text: Path, max_bytes: int = BPE_SAMPLE_BYTES) -> bytes:
    """The first `max_bytes` of the training text, ending at a document boundary."""
    data, _ = read_text_prefix(train_text, max_bytes)
    return data


@interruptible
def train_tokenizer(train_text: Path, out_dir: Path, vocab_size: int, *, force: bool = False,
                    progress=None) -> str:
    """BPE on the start of train.txt into `out_dir`; "skipped" when the same tokenizer is there."""

    specials = bpe.check_special_tokens([EOT])
    bpe.check_vocab_size(vocab_size, len(specials))
    sample = bpe_sample(train_text)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix("bpe_sample"), suffix=".txt", dir=out_dir.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(sample)
        fingerprint = bpe.training_fingerprint(vocab_size, specials, sha256_file(tmp))
        if not force and (out_dir / bpe.CONFIG_NAME).is_file():
            bpe.check_output_dir(out_dir, fingerprint, False)  # raises when it holds another tokenizer
            return "skipped"
        bpe.check_output_dir(out_dir, fingerprint, force)
        result = bpe.train_bpe_file(tmp, vocab_size, specials, progress=progress)
        extra = {"source": {"path": str(train_text), "bytes": len(sample), "note": "first bytes of the file"},
                 "trained_with": "tslm quickstart"}
        bpe.save_tokenizer(out_dir, result.vocab, result.merges, fingerprint, extra)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return "done"


# ----------------------------------------------------------------------------------------------
# 4. Encode
# ----------------------------------------------------------------------------------------------


def _token_file_matches(tokens_file: Path, tokenizer) -> bool:
    """True when `tokens_file` exists and was encoded with `tokenizer` (sidecar fingerprint)."""

    if not tokens_file.is_file():
        return False
    try:
        check_tokens(tokens_file, tokenizer.fingerprint, tokenizer.vocab_size)
    except UserError:
        return False
    return True


@interruptible
def encode_text(text_file: Path, tokens_file: Path, tokenizer_dir: Path, *, force: bool = False,
                progress=None) -> str:
    """Encode `text_file` into `tokens_file` (+ sidecar) unless it already holds this tokenizer's ids."""

    tokenizer = runs.load_tokenizer(tokenizer_dir)
    if not force and _token_file_matches(tokens_file, tokenizer):
        return "skipped"
    if tokens_file.exists() and not force:
        raise UserError(
            f"{tokens_file} does not match the tokenizer in {tokenizer_dir} (another tokenizer, or damaged)",
            "pass `force` to redo every stage, or use another `workdir`",
        )

    # (bytes, tokens) progress of this file, labelled with its name for the caller's bar
    size = text_file.stat().st_size
    cb = (lambda done, toks: progress(text_file.name, done, size, toks)) if progress else None
    encode_file(text_file, tokens_file, tokenizer, workers=default_workers(), force=True, progress=cb,
                tokenizer_dir=tokenizer_dir)
    return "done"


def count_tokens(tokens_file: Path) -> int:

    return int(np.load(tokens_file, mmap_mode="r").shape[0])


# ----------------------------------------------------------------------------------------------
# 5. Train for a bounded time
# ----------------------------------------------------------------------------------------------


def _run_state(run_dir: Path) -> tuple[dict | None, int]:
    """(saved config or None, step of the latest checkpoint or 0)."""

    cfg_file = run_dir / runs.CONFIG_FILE
    if not cfg_file.is_file():
        return None, 0
    try:
        cfg = runs.read_run_config(run_dir)
    except UserError:
        return None, 0
    ckpts = runs.step_checkpoints(run_dir)
    return cfg, (ckpts[-1][0] if ckpts else 0)


def fit_context(context_length: int, num_tokens: int) -> int:
    """The preset's context length, or the largest power of two that fits a small token file.

    >>> fit_context(256, 10_000), fit_context(256, 200), fit_context(256, 256)
    (256, 128, 128)
    """
    if num_tokens > context_length:
        return context_length
    ctx = 1 << (max(num_tokens - 1, 1).bit_length() - 1)
    if ctx < 8:
        raise UserError(f"the validation text is only {num_tokens} tokens long",
                        "pass a longer `text` (a few hundred short stories at least)")
    return ctx


@dataclass
class TrainOutcome:
    status: str          # done | skipped | resumed
    preset: str
    device: str
    step: int
    max_steps: int
    best_val_loss: float | None = None
    tokens_per_s: float = 0.0
    plan: StepPlan | None = None
    auto_size: dict | None = None     # what the size rule chose (None: a fixed preset)


def train_model(opts: QuickstartOptions, run_dir: Path, tokenizer_dir: Path, train_file: Path, valid_file: Path,
                notify: Notify) -> TrainOutcome:
    """Train runs/quickstart for about `opts.minutes`, resume it, or skip it when it is finished."""
    device = pick_device(opts.device)
    base_opts = dict(run_dir=run_dir, train_file=train_file, valid_file=valid_file, tokenizer_dir=tokenizer_dir,
                     display=opts.display)
    earlier = _continue_earlier_run(opts, run_dir, tokenizer_dir, base_opts, device, notify)
    if earlier is not None:
        return earlier
    budget_s = opts.minutes * 60.0
    deadline = time.perf_counter() + budget_s  # training ends by then, whatever the machine does meanwhile
    sized = _size_and_plan(opts, device, base_opts, budget_s, train_file, valid_file, notify)
    plan, choice = sized.plan, sized.choice
    why = {"time": f"fits in the {opts.minutes:g}-minute budget",
           "data": f"{MAX_EPOCHS:g} passes over the {sized.n_train:,} training tokens; more would only memorize them",
           "minimum": "the budget is smaller than the minimum run"}[plan.limited_by]
    notify("train", f"{sized.tps:,.0f} tokens/s -> {plan.steps:,} steps of {plan.tokens_per_step:,} tokens, about "
                    f"{plan.seconds / 60:.1f} min ({why})")
    warmup = choice.train_overrides(plan.steps)["warmup_steps"] if choice is not None else plan.warmup_steps
    train_over = {**sized.train_over, "max_steps": plan.steps, "warmup_steps": warmup, "eval_every": plan.eval_every,
                  "eval_batches": sized.eval_batches, "save_every": plan.eval_every,
                  "log_every": max(1, min(10, plan.steps // 20))}
    run = tl.prepare_run(sized.preset, None, sized.model_over, train_over, tl.TrainOptions(force=True, **base_opts))
    run.time_plan = tl.time_plan(budget_s, deadline, sized.spent, sized.tps, plan.steps, max_steps_cap=plan.data_steps)
    if choice is not None:
        run.auto_size = {**autosize.record_of(choice, run), "tokens": plan.steps * plan.tokens_per_step}
    result = _train(run)
    return TrainOutcome("done", run.preset, str(device), result.step, result.max_steps, result.best_val_loss,
                        result.tokens_per_s, plan, run.auto_size)


def _continue_earlier_run(opts: QuickstartOptions, run_dir: Path, tokenizer_dir: Path, base_opts: dict, device,
                          notify: Notify) -> TrainOutcome | None:
    """A finished runs/quickstart is skipped and an interrupted one resumed (unless `force`); None: train afresh."""
    tokenizer = runs.load_tokenizer(tokenizer_dir)
    saved, last_step = (None, 0) if opts.force else _run_state(run_dir)
    if saved is None:
        return None
    fp = (saved.get("tokenizer") or {}).get("fingerprint")
    if fp is not None and fp != tokenizer.fingerprint:
        raise UserError(f"{run_dir} was trained with another tokenizer",
                        "pass `force` to redo every stage, or use another `workdir`")
    auto_size = saved.get("auto_size") if isinstance(saved.get("auto_size"), dict) else None
    max_steps = int(saved.get("max_steps") or saved.get("train", {}).get("max_steps", 0))
    if last_step >= max_steps > 0:
        best = runs.summarize_run_metrics(run_dir)["best_val_loss"]
        return TrainOutcome("skipped", saved.get("preset", "?"), str(device), last_step, max_steps, best,
                            auto_size=auto_size)
    if last_step == 0:
        return None
    notify("train", f"resuming {run_dir} from step {last_step}")
    run = tl.prepare_run(None, None, None, {"device": opts.device}, tl.TrainOptions(resume="auto", **base_opts))
    result = _train(run)
    return TrainOutcome("resumed", run.preset, str(device), result.step, result.max_steps, result.best_val_loss,
                        result.tokens_per_s, auto_size=auto_size)


@dataclass
class _Sized:
    """The model quickstart trains and its plan (`_size_and_plan`)."""

    preset: str
    model_over: dict
    train_over: dict
    plan: StepPlan
    tps: float
    eval_batches: int
    spent: float
    n_train: int
    choice: autosize.Choice | None = None


def _size_and_plan(opts: QuickstartOptions, device, base_opts: dict, budget_s: float, train_file: Path,
                   valid_file: Path, notify: Notify) -> _Sized:
    """The preset (or, on a CPU, the size the rule picks for the budget), probed and planned.

    First the configs are resolved (this also checks the tokenizer and token files), then a few real steps
    of that model are timed, then the schedule's length is fixed from what is left of the budget. With the
    auto size the probed model is the rule's reference model; when the rule picks another size, that one is
    probed too (shorter) and planned from its own speed."""
    auto = opts.preset is None and device.type != "cuda"  # the size rule was measured on a CPU
    preset = opts.preset or (GPU_PRESET if device.type == "cuda" else CPU_PRESET)
    n_train, n_valid = count_tokens(train_file), count_tokens(valid_file)
    p = get_preset(preset)
    base_model = autosize.shape_for(autosize.REFERENCE_WIDTH).model_overrides() if auto else {}
    full_ctx = base_model.get("context_length", p.model.context_length)
    ctx = fit_context(full_ctx, min(n_train, n_valid))
    if ctx != full_ctx:
        notify("train", f"context length {ctx} instead of {full_ctx}: the text is short")
    model_over = {**base_model, "context_length": ctx} if ctx != full_ctx or auto else {}
    train_over: dict = {"dataset": DATASET, "device": opts.device}
    if auto:
        train_over.update(batch_size=autosize.BATCH_SIZE, grad_accum_steps=1)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        train_over["dtype"] = "bfloat16"
    # Building the model, a warm-up step and one timed step take about 2 s on a CPU whatever the budget:
    # the probe is never announced as shorter than that.
    probe_s = budget.probe_seconds(budget_s, 0.05, 20.0)
    what = f"the reference model (d_model {autosize.REFERENCE_WIDTH})" if auto else preset
    notify("train", f"measuring the speed of {what} on {device} (a probe of about {probe_s:.2g} s)")
    # The announced probe time covers both probes: the auto size keeps a third of it for its second one.
    plan, tps, eval_batches, spent = _probe_and_plan(preset, model_over, train_over, base_opts, budget_s,
                                                     probe_s * (2 / 3 if auto else 1.0), n_train, n_valid)
    sized = _Sized(preset, model_over, train_over, plan, tps, eval_batches, spent, n_train)
    if auto:
        _resize(sized, base_opts, budget_s, probe_s, ctx, p.train.eval_batches, n_valid, notify)
    return sized


def _resize(sized: _Sized, base_opts: dict, budget_s: float, probe_s: float, ctx: int, max_eval_batches: int,
            n_valid: int, notify: Notify) -> None:
    """The auto size: the rule's choice for the reference model's planned steps, probed again (or planned at
    its measured relative speed) when it differs from the reference model."""
    choice = autosize.choose(sized.plan.steps * autosize.TOKENS_PER_STEP,
                             f"{sized.plan.steps} steps of the reference model = ")
    notify("train", f"auto size: d_model {choice.shape.d_model}, {choice.shape.num_layers} layers, "
                    f"{choice.shape.num_heads} heads, lr {choice.lr:g}, batch {choice.batch_size} ({choice.why})")
    chosen_model, chosen_train = autosize.sized_overrides(choice, {"context_length": ctx}, {})
    sized.model_over = {**chosen_model, "context_length": ctx}
    sized.train_over.update({k: v for k, v in chosen_train.items() if k != "warmup_steps"})
    sized.choice = choice
    if choice.shape.d_model != autosize.REFERENCE_WIDTH:  # another model: time it too
        sized.plan, sized.tps, sized.eval_batches, more = _probe_and_plan(
            sized.preset, sized.model_over, sized.train_over, base_opts, budget_s - sized.spent,
            max(probe_s - sized.spent, 0.0), sized.n_train, n_valid)
        sized.spent += more
    elif choice.batch_size != autosize.BATCH_SIZE:  # the same model in other batches: its sweep speed
        sized.tps *= choice.speed
        sized.plan, sized.eval_batches = _plan(budget_s - sized.spent, sized.tps, ctx, choice.batch_size,
                                               max_eval_batches, sized.n_train, n_valid)


def _probe_and_plan(preset: str, model_over: dict, train_over: dict, base_opts: dict, budget_s: float, probe_s: float,
                    n_train: int, n_valid: int) -> tuple[StepPlan, float, int, float]:
    """Time `probe_s` of real steps of the model, then plan the steps that fit in what is left of `budget_s`.
    Returns (plan, tokens/s, eval batches, seconds spent)."""
    t0 = time.perf_counter()
    p = get_preset(preset)
    probe_run = tl.prepare_run(preset, None, model_over, {**train_over, "max_steps": max(p.train.warmup_steps, 1)},
                               tl.TrainOptions(force=True, **base_opts))
    mc, tc = probe_run.model_cfg, probe_run.train_cfg
    tps, _ = tl.measure_throughput(probe_run, max(probe_s - (time.perf_counter() - t0), 0.0))
    spent = time.perf_counter() - t0
    plan, eval_batches = _plan(budget_s - spent, tps, mc.context_length, tc.batch_size * tc.grad_accum_steps,
                               tc.eval_batches, n_train, n_valid)
    return plan, tps, eval_batches, spent


def _plan(budget_s: float, tps: float, context_length: int, batch_size: int, max_eval_batches: int,
          n_train: int, n_valid: int) -> tuple[StepPlan, int]:
    """The steps of `batch_size` sequences that fit in `budget` seconds at `tps`, and the validation
    batches per evaluation."""
    eval_batches = eval_batches_for(budget_s, tps, context_length, batch_size, max_eval_batches)
    eval_windows = min(eval_batches * batch_size, max(1, n_valid - context_length))
    plan = budget.plan_bounded_run(budget_s, tps, batch_size * context_length, n_train, eval_windows * context_length)
    plan.tokens_per_step = batch_size * context_length
    return plan, eval_batches


def _train(run):
    result = tl.train(run)
    if result.stopped == "interrupted":
        raise Interrupted(f"training stopped at step {result.step}/{result.max_steps} with a checkpoint in "
                          f"{run.run_dir}; rerun the same tslm quickstart command to continue")
    return result


# ----------------------------------------------------------------------------------------------
# 6. A story
# ----------------------------------------------------------------------------------------------


def pick_sampling(cells) -> tuple[dict, str]:
    """The sampling settings of the story: the most conservative cell (lowest temperature, then lowest
    top-p) whose samples read like real text by two counts, repetition rate <= MAX_REPETITION (no
    loops) and distinct-2 >= MIN_DISTINCT_2 (varied wording); when none passes both, the cell with the
    lowest repetition rate (then the highest distinct-2). Lower temperature means likelier text, so
    the coolest cell that still passes is taken; the hottest cell would always win on the counts alone.
    Returns (settings, why).

    >>> from types import SimpleNamespace as C
    >>> cells = [C(settings={"temperature": 0.5, "top_p": 1.0}, repetition=0.30, distinct_2=0.40),
    ...          C(settings={"temperature": 0.7, "top_p": 1.0}, repetition=0.01, distinct_2=0.85),
    ...          C(settings={"temperature": 1.0, "top_p": 1.0}, repetition=0.00, distinct_2=0.95)]
    >>> pick_sampling(cells)[0]
    {'temperature': 0.7, 'top_p': 1.0}
    >>> pick_sampling(cells[:1])[0]
    {'temperature': 0.5, 'top_p': 1.0}
    """
    def figures(c) -> tuple[float, float]:
        return (1.0 if c.repetition is None else c.repetition), (0.0 if c.distinct_2 is None else c.distinct_2)

    ordered = sorted(cells, key=lambda c: (c.settings.get("temperature", 1.0), c.settings.get("top_p", 1.0)))
    for c in ordered:
        rep, d2 = figures(c)
        if rep <= MAX_REPETITION and d2 >= MIN_DISTINCT_2:
            return dict(c.settings), (f"the lowest temperature of {len(cells)} settings with repetition {rep:.3f} <= "
                                      f"{MAX_REPETITION} and distinct-2 {d2:.2f} >= {MIN_DISTINCT_2}")
    best = min(ordered, key=lambda c: (figures(c)[0], -figures(c)[1]))
    rep, d2 = figures(best)
    return dict(best.settings), (f"no setting of {len(cells)} passed both limits; the least repetitive "
                                 f"(repetition {rep:.3f}, distinct-2 {d2:.2f})")


def tell_story(run_dir: Path, opts: QuickstartOptions, on_text: Callable[[str], None] | None = None,
               notify: Notify | None = None) -> tuple[str, Path, dict]:
    """Sample one story from the run's best checkpoint; returns (text incl. the prompt, checkpoint used,
    sampling settings). Without opts.temperature/top_p the settings come from `pick_sampling` over STORY_GRID."""

    device = pick_device(opts.device)
    ckpt = runs.checkpoint_for(run_dir)
    model, tokenizer, _ = runs.load_trained_model(run_dir, device=str(device))
    settings = {"temperature": 0.8 if opts.temperature is None else opts.temperature,
                "top_p": 0.95 if opts.top_p is None else opts.top_p}
    if opts.temperature is None and opts.top_p is None:
        cells = run_grid(model, tokenizer, opts.prompt, STORY_GRID, seed=opts.seed + 1, num_samples=GRID_SAMPLES,
                         max_new_tokens=min(GRID_TOKENS, opts.max_new_tokens))
        settings, why = pick_sampling(cells)
        if notify:
            notify("story", f"temperature {settings['temperature']:g}, top-p {settings['top_p']:g}: {why}")
    if on_text:
        on_text(opts.prompt)
    (sample,) = generate_samples(model, tokenizer, [opts.prompt], max_new_tokens=opts.max_new_tokens,
                                 temperature=settings["temperature"], top_p=settings["top_p"], seed=opts.seed,
                                 on_text=(lambda _k, chunk: on_text(chunk)) if on_text else None)
    return opts.prompt + sample.text, ckpt, settings


# ----------------------------------------------------------------------------------------------
# The whole pipeline
# ----------------------------------------------------------------------------------------------


def text_stage(opts: QuickstartOptions, data_root: Path, download_progress: ProgressScope | None,
               notify: Notify) -> tuple[Path, str]:
    """`fetch_source`, or the sample bundled with tslm when the network is unreachable; says which.
    Returns (path, "given" | "downloaded" | "skipped" | "bundled")."""
    try:
        source, status = fetch_source(opts, data_root, download_progress)
    except dl.Unreachable as e:  # no network: the sample that ships with the package instead
        source, _ = sample.extract_sample(paths.dataset_dir(SAMPLE_DATASET, data_root) / sample.FILE_NAME)
        notify("text", f"cannot reach {e.host} ({e.what.partition(': ')[2]}): learning from the TinyStories sample "
                       f"bundled with tslm ({source}, {source.stat().st_size:,} bytes); --text FILE uses your own text")
        return source, "bundled"
    how = {"given": "using", "downloaded": "downloaded", "skipped": "already downloaded:"}.get(status, status)
    notify("text", f"{how} {source} ({source.stat().st_size:,} bytes)")
    return source, status


def run_quickstart(opts: QuickstartOptions, notify: Notify | None = None, *, download_progress=None,
                   bpe_progress=None, encode_progress=None,
                   on_story_text: Callable[[str], None] | None = None) -> QuickstartResult:
    """Run every stage (skipping finished ones) and return where everything is."""
    notify = notify or (lambda stage, msg: None)
    if not (opts.minutes > 0 and math.isfinite(opts.minutes)):
        raise UserError(f"`minutes` must be positive, got {opts.minutes:g}")
    if opts.max_new_tokens < 1:
        raise UserError(f"`max_new_tokens` must be at least 1, got {opts.max_new_tokens}")
    data_root, runs_root = roots(opts.workdir)
    ds = paths.dataset_dir(DATASET, data_root)
    train_txt, valid_txt = paths.text_path(DATASET, "train", data_root), paths.text_path(DATASET, "valid", data_root)
    tok_dir = paths.tokenizer_dir(DATASET, data_root)
    train_npy = paths.tokens_path(DATASET, "train", data_root)
    valid_npy = paths.tokens_path(DATASET, "valid", data_root)
    run_dir = runs_root / RUN_NAME
    stages: dict[str, str] = {}
    seconds: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds[name] = time.perf_counter() - t
        return out

    source, stages["text"] = timed("text", text_stage, opts, data_root, download_progress, notify)
    # Every file below is written (or, with --force, rewritten) by quickstart: the text must not be one of them.
    check_source_outside(source, [train_txt, valid_txt, ds / SOURCE_RECORD, tok_dir, train_npy, valid_npy,
                                  paths.sidecar_path(train_npy), paths.sidecar_path(valid_npy), run_dir], "the text")
    ds.mkdir(parents=True, exist_ok=True)
    for d in (data_root, ds, tok_dir):  # temporaries a killed earlier run left (their owner is gone)
        remove_stale_temps(d)
    stages["split"], rec = timed("split", split_text, source, train_txt, valid_txt, force=opts.force)
    notify(
        "split",
        f"{'kept' if stages['split'] == 'skipped' else 'wrote'} {train_txt} ({rec.get('train_bytes', 0):,} bytes) "
        f"and {valid_txt} ({rec.get('valid_bytes', 0):,} bytes, the last {VALID_FRACTION:.0%} of the documents)"
        + (f"; only the first {MAX_TEXT_BYTES >> 20} MB of {source} are used" if rec.get("truncated") else ""),
    )
    stages["tokenizer"] = timed("tokenizer", train_tokenizer, train_txt, tok_dir, opts.vocab_size, force=opts.force,
                                progress=bpe_progress)
    notify(
        "tokenizer",
        f"{'kept' if stages['tokenizer'] == 'skipped' else 'trained'} {tok_dir} "
        f"({opts.vocab_size:,} ids, learned from the first {BPE_SAMPLE_BYTES >> 20} MB of {train_txt.name})",
    )
    t = time.perf_counter()
    enc = [encode_text(src, dst, tok_dir, force=opts.force, progress=encode_progress)
           for src, dst in ((train_txt, train_npy), (valid_txt, valid_npy))]
    seconds["encode"] = time.perf_counter() - t
    stages["encode"] = "skipped" if enc == ["skipped", "skipped"] else "done"
    notify(
        "encode",
        f"{'kept' if stages['encode'] == 'skipped' else 'wrote'} {train_npy} ({count_tokens(train_npy):,} tokens) "
        f"and {valid_npy} ({count_tokens(valid_npy):,} tokens)",
    )
    outcome = timed("train", train_model, opts, run_dir, tok_dir, train_npy, valid_npy, notify)
    stages["train"] = outcome.status
    story_file = run_dir / STORY_FILE
    story, ckpt, sampling = timed("story", tell_story, run_dir, opts, on_story_text, notify)
    atomic_write_text(story_file, story.rstrip() + "\n")
    stages["story"] = "done"
    return QuickstartResult(
        workdir=Path(opts.workdir) if opts.workdir is not None else Path("."), source=source,
        train_text=train_txt, valid_text=valid_txt, tokenizer_dir=tok_dir, train_tokens=train_npy,
        valid_tokens=valid_npy, run_dir=run_dir, checkpoint=ckpt, story_file=story_file, story=story,
        preset=outcome.preset, device=outcome.device, steps=outcome.step, max_steps=outcome.max_steps,
        best_val_loss=outcome.best_val_loss, tokens_per_s=outcome.tokens_per_s, stages=stages, seconds=seconds,
        plan=outcome.plan, auto_size=outcome.auto_size, sampling=sampling,
    )


def _preset_vocab(preset: str) -> int:

    p = PRESETS.get(preset)
    return p.model.vocab_size if p is not None and p.tokenizer == "bpe" else 4096


def model_label(r: QuickstartResult) -> str:
    """How the summary names the model: the preset, or the auto size's shape."""
    a = r.auto_size
    if not a:
        return r.preset
    return f"auto size (d_model {a.get('d_model')}, {a.get('num_layers')} layers, lr {a.get('lr'):g})"


def size_flags(auto: dict | None) -> str:
    """The `tslm train` flags that rebuild an auto-sized model (empty for a fixed preset).

    >>> size_flags({"d_model": 128, "num_layers": 4, "num_heads": 4, "lr": 0.004, "batch_size": 8, "schedule": "wsd",
    ...             "decay_fraction": 0.4})
    ' --d-model 128 --num-layers 4 --num-heads 4 --lr 0.004 --min-lr 0.0004 --batch-size 8 --schedule wsd --decay-fraction 0.4'
    """  # noqa: E501 (a doctest's expected one-line output)
    if not auto:
        return ""
    lr = float(auto["lr"])
    return (
        f" --d-model {auto['d_model']} --num-layers {auto['num_layers']} --num-heads {auto['num_heads']} "
        f"--lr {lr:g} --min-lr {lr * autosize.MIN_LR_RATIO:g} "
        f"--batch-size {auto.get('batch_size', autosize.BATCH_SIZE)}"
        + (f" --schedule {auto['schedule']}" if auto.get("schedule") else "")
        + (f" --decay-fraction {auto['decay_fraction']:g}" if auto.get("decay_fraction") is not None else "")
    )


def next_commands(r: QuickstartResult) -> list[tuple[str, str]]:
    """(what, command) pairs to continue from a finished quickstart, with explicit paths."""
    cd = "" if r.workdir.resolve() == Path.cwd().resolve() else f"cd {r.workdir} && "
    return [
        ("another story", f'tslm generate "{DEFAULT_PROMPT}" --run {r.run_dir} --temp {r.sampling["temperature"]:g} '
                          f'--top-p {r.sampling["top_p"]:g}'),
        ("loss and perplexity on the held-out text", f"tslm eval {r.run_dir} --data {r.valid_tokens}"),
        ("plot the loss curves", f"tslm plot {r.run_dir} --ascii"),
        ("a longer run on the same data",
         f"{cd}tslm train --preset {r.preset}{size_flags(r.auto_size)} --dataset {DATASET} "
         f"--max-steps {max(2 * r.max_steps, 1000)} --run-name {DATASET}-long"),
        ("the full TinyStories (2.2 GB; the tokenizer alone takes a while)",
         f"{cd}tslm download tinystories && tslm bpe --vocab-size {_preset_vocab(r.preset)} && tslm encode && "
         f"tslm train --preset {r.preset}"),
    ]


plan_steps = budget.plan_bounded_run  # its name before train/budget.py held it
