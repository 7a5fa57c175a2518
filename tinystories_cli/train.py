"""The training loop: one process or DDP, gradient accumulation, exact resume, guard rails.

    run = prepare_run(preset="debug", options=TrainOptions(run_name="smoke"))   # configs, data, run dir
    result = train(run)                                                         # the loop

One optimizer step (`step` counts from 1 to `max_steps`):

    lr = cosine_lr(step, lr, min_lr, warmup_steps, max_steps)    # the schedule ends exactly at max_steps
    for each of grad_accum_steps micro-batches:                  # DDP syncs gradients on the last one only
        loss = cross_entropy(model(x), y) / grad_accum_steps; loss.backward()
    grad_norm = clip_grad_norm_(params, grad_clip)                # global norm, before clipping
    if loss or grad_norm is not finite: stop (or skip up to --skip-nonfinite steps), weights untouched
    optimizer.step()

Tokens per step = batch_size x grad_accum_steps x world_size x context_length.

Determinism: weights are initialized from `seed`; batch k of the run is a pure function of
(seed, k) (see `data.BatchSampler`); a checkpoint stores model, optimizer, step, sampler state and
the torch RNG state (dropout), so on CPU `N steps + resume N steps` reproduces `2N steps` bit for bit.

Under `torchrun --nproc_per_node N -m tinystories_cli train ...` each rank trains on its own slice
of the global batch (NCCL on GPUs, gloo on CPUs) and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from tinystories_cli import __version__, paths, runs
from tinystories_cli.checkpoint import read_checkpoint, save_checkpoint, load_model_state, load_optimizer_state
from tinystories_cli.config import ModelConfig, TrainConfig, build_config, load_config_file, resolve_configs
from tinystories_cli.data import BatchSampler, fixed_windows
from tinystories_cli.errors import UserError
from tinystories_cli.evaluate import fixed_window_loss
from tinystories_cli.device import (Dist, autocast_factory, broadcast_str, dist_from_env, init_distributed,
                                   measure_peak_tflops, pick_device)
from tinystories_cli.fileio import atomic_write_text
from tinystories_cli.tokens import check_tokens, open_tokens

# Train settings that may change when a run is resumed (they do not change what is computed).
RESUME_MUTABLE = {"eval_every", "log_every", "save_every", "keep_last", "device", "dtype", "compile", "eval_batches"}


class NonFiniteError(UserError):
    """The loss or gradient norm became NaN/inf."""


@dataclass
class TrainOptions:
    """Run-level choices that are not hyperparameters (they never change what a step computes)."""

    run_name: str | None = None
    resume: str | None = None  # None, "auto", or a run name / run dir / checkpoint file
    force: bool = False
    stop_at: int | None = None
    skip_nonfinite: int = 0
    peak_tflops: float | None = None
    wandb: bool = False
    train_file: Path | None = None
    valid_file: Path | None = None
    tokenizer_dir: Path | None = None
    display: str = "auto"  # auto (rich on a terminal, else plain lines) | rich | plain | quiet


@dataclass
class Run:
    """Everything `train` needs, resolved and checked (built by `prepare_run`)."""

    preset: str
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    options: TrainOptions
    run_dir: Path
    tokenizer_dir: Path
    train_file: Path
    valid_file: Path
    resume_from: Path | None
    max_steps: int
    end_step: int
    fresh: bool
    tokenizer_fingerprint: str | None = None


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    max_steps: int
    train_losses: dict[int, float] = field(default_factory=dict)  # step -> loss of every step
    val_losses: dict[int, float] = field(default_factory=dict)
    best_val_loss: float | None = None
    stopped: str = "finished"  # finished | stop_at | interrupted
    tokens_per_s: float = 0.0
    elapsed_s: float = 0.0


# --------------------------------------------------------------------------------------------
# Distributed setup
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Preparing a run: configs, tokenizer, data, run directory
# --------------------------------------------------------------------------------------------


def _explicit(keys: dict | None, name: str) -> bool:
    return bool(keys) and keys.get(name) is not None


def _config_diffs(a: dict, b: dict, keys) -> list[str]:
    return [k for k in keys if a.get(k) != b.get(k)]


def new_run_name(preset: str) -> str:
    return f"{preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def prepare_run(
    preset: str | None = None,
    config_file: str | Path | None = None,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    options: TrainOptions | None = None,
) -> Run:
    """Resolve configs (preset < file < flags, or the saved config when resuming), find the tokenizer and
    token files, check them, and pick the run directory. Raises UserError for every bad input."""
    opts = options or TrainOptions()
    file_data = load_config_file(config_file) if config_file else {}
    file_model, file_train = file_data.get("model") or {}, file_data.get("train") or {}
    root = runs.runs_root()

    # Which run, and is there something to resume?
    run_dir: Path | None = None
    resume_from: Path | None = None
    if opts.resume is not None:
        if opts.resume == "auto":
            candidate = root / opts.run_name if opts.run_name else root / runs.LATEST_LINK
            if candidate.exists():
                resume_from = runs.latest_checkpoint(candidate.resolve())
            if resume_from is not None or opts.run_name:
                # runs/latest without a checkpoint is not reused: a fresh run gets its own name
                run_dir = candidate.resolve() if candidate.exists() else candidate
        else:
            target = runs.resolve_run(opts.resume)
            run_dir = runs.run_dir_of(target)
            resume_from = target if target.is_file() else runs.latest_checkpoint(run_dir)
            if resume_from is None:
                raise UserError(f"run {run_dir} has no checkpoint to resume from",
                                "start it again with --force, or use --resume auto")

    if resume_from is not None:
        _check_resumable(resume_from, run_dir)
    saved = runs.read_run_config(run_dir) if resume_from is not None else None
    if saved is not None:
        name = saved.get("preset")
        if preset and preset != name:
            raise UserError(f"--preset {preset} differs from the preset of the run being resumed ({name})",
                            "drop --preset when resuming, or use a new --run-name")
        model_cfg = ModelConfig.model_validate(saved["model"])
        given_model = {**file_model, **(model_overrides or {})}
        changed = [k for k, v in given_model.items() if v is not None and getattr(model_cfg, k, None) != v]
        if changed:
            raise UserError(f"model settings {changed} differ from the run being resumed ({run_dir})",
                            "drop them, or start a new run with another --run-name")
        saved_train = TrainConfig.model_validate(saved["train"])
        train_cfg = build_config(TrainConfig, saved_train, file_train, train_overrides, where="train config")
        changed = [k for k in _config_diffs(saved_train.model_dump(), train_cfg.model_dump(), TrainConfig.model_fields)
                   if k not in RESUME_MUTABLE]
        if changed:
            raise UserError(f"train settings {changed} differ from the run being resumed ({run_dir}); resuming "
                            "must not change what a step computes", "drop them, or start a new run")
        tokenizer_dir = runs.tokenizer_dir_of(run_dir)
        preset_name = name
    else:
        p, model_cfg, train_cfg = resolve_configs(preset, config_file, model_overrides, train_overrides)
        preset_name = p.name
        tokenizer_dir = opts.tokenizer_dir or paths.tokenizer_dir(train_cfg.dataset)
        if run_dir is None:
            run_dir = root / (opts.run_name or new_run_name(preset_name))
        if (run_dir / runs.CONFIG_FILE).exists() or runs.step_checkpoints(run_dir):
            # --resume auto on a run that never reached its first checkpoint starts it over.
            if not opts.force and opts.resume != "auto":
                raise UserError(f"{run_dir} already holds a run",
                                "pass --resume to continue it, --force to start it over, or choose another --run-name")

    # Tokenizer: the model's vocab comes from it unless set explicitly (then it must be large enough).
    if not tokenizer_dir.is_dir():
        raise UserError(f"tokenizer not found: {tokenizer_dir}",
                        f"train one with `tslm bpe {paths.text_path(train_cfg.dataset, 'train')}`, or pass --tokenizer")
    tokenizer = runs.load_tokenizer(tokenizer_dir)
    tok_vocab = int(tokenizer.vocab_size)
    if saved is None:
        if _explicit(model_overrides, "vocab_size") or _explicit(file_model, "vocab_size"):
            if model_cfg.vocab_size < tok_vocab:
                raise UserError(f"vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's {tok_vocab}",
                                f"drop --vocab-size (it defaults to the tokenizer's) or set it >= {tok_vocab}")
        elif model_cfg.vocab_size != tok_vocab:
            model_cfg = model_cfg.model_copy(update={"vocab_size": tok_vocab})
    fingerprint = getattr(tokenizer, "fingerprint", None)

    # Token files: present, made with this tokenizer, ids inside the vocabulary, long enough.
    train_file = Path(opts.train_file or paths.tokens_path(train_cfg.dataset, "train"))
    valid_file = Path(opts.valid_file or paths.tokens_path(train_cfg.dataset, "valid"))
    for f, split in ((train_file, "train"), (valid_file, "valid")):
        tokens, _ = open_tokens(f, split, train_cfg.dataset, split)
        check_tokens(f, fingerprint, model_cfg.vocab_size)
        if len(tokens) <= model_cfg.context_length:
            raise UserError(f"{f} holds {len(tokens)} tokens, fewer than context length + 1 "
                            f"({model_cfg.context_length + 1})", "encode more text or lower --ctx")

    # Budget: --train-tokens (if set) decides max_steps; the schedule ends exactly there.
    dist = dist_from_env()
    tokens_per_step = train_cfg.batch_size * train_cfg.grad_accum_steps * dist.world_size * model_cfg.context_length
    max_steps = train_cfg.max_steps
    if train_cfg.train_tokens is not None:
        max_steps = max(1, math.ceil(train_cfg.train_tokens / tokens_per_step))
    if train_cfg.warmup_steps > max_steps:
        raise UserError(f"warmup_steps ({train_cfg.warmup_steps}) exceeds the number of steps ({max_steps})",
                        "lower --warmup-steps or raise --max-steps/--train-tokens")
    end_step = max_steps
    if opts.stop_at is not None:
        if not 1 <= opts.stop_at <= max_steps:
            raise UserError(f"--stop-at {opts.stop_at} is outside 1..{max_steps}", "pick a step within the schedule")
        end_step = opts.stop_at
    if opts.skip_nonfinite < 0:
        raise UserError(f"--skip-nonfinite must be >= 0, got {opts.skip_nonfinite}")
    if train_cfg.dtype == "float16":
        raise UserError("--dtype float16 needs loss scaling, which tslm train does not do",
                        "use --dtype bfloat16 (same memory, no scaling needed) or float32")
    if train_cfg.max_steps != max_steps:
        train_cfg = train_cfg.model_copy(update={"max_steps": max_steps})
    return Run(preset_name, model_cfg, train_cfg, opts, run_dir, tokenizer_dir, train_file, valid_file,
               resume_from, max_steps, end_step, fresh=resume_from is None, tokenizer_fingerprint=fingerprint)


def _check_resumable(ckpt: Path, run_dir: Path) -> None:
    """Refuse a damaged checkpoint before anything is written, naming an older one to resume from."""
    try:
        read_checkpoint(ckpt)
    except UserError as e:
        older = [p for _, p in runs.step_checkpoints(run_dir) if p != ckpt and p.name < ckpt.name]
        fix = (f"resume from the previous one: `tslm train --resume {older[-1]}`" if older
               else "start the run again with --force")
        raise UserError(e.what, fix) from None


def _clear_run_dir(run_dir: Path) -> None:
    """--force: remove what a previous run left (only tslm's own files)."""
    for name in (runs.CHECKPOINT_DIR, runs.TOKENIZER_DIR):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for path in [run_dir / runs.CONFIG_FILE, run_dir / runs.METRICS_FILE, run_dir / "README.md",
                 *run_dir.glob("eval_*.json")]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _copy_tokenizer(src: Path, dst: Path) -> None:
    if src.resolve() == dst.resolve():
        return
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            atomic_write_text(dst / f.name, f.read_text(encoding="utf-8")) if f.suffix in (".json", ".txt") \
                else shutil.copyfile(f, dst / f.name)


# --------------------------------------------------------------------------------------------
# Numbers for the display
# --------------------------------------------------------------------------------------------


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), as `tslm account` counts them."""
    from tinystories_cli.account import train_flops_per_step

    return train_flops_per_step(cfg, batch_size=1, seq_len=cfg.context_length) / cfg.context_length


def format_duration(seconds: float) -> str:
    """Hours and minutes, or minutes and seconds.

    >>> format_duration(3725), format_duration(65.2)
    ('1h02m', '1m05s')
    """
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# --------------------------------------------------------------------------------------------
# Evaluation on fixed windows
# --------------------------------------------------------------------------------------------




# --------------------------------------------------------------------------------------------
# The display: rich live line on a terminal, plain log lines otherwise
# --------------------------------------------------------------------------------------------


class Display:
    def __init__(self, mode: str, start_step: int, end_step: int, enabled: bool):
        from tinystories_cli.console import console

        self.console = console
        if not enabled:
            mode = "quiet"
        elif mode == "auto":
            mode = "rich" if console.is_terminal else "plain"
        self.mode = mode
        self.progress = None
        self.task = None
        if mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.progress = Progress(TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(bar_width=24),
                                     TextColumn("{task.fields[stats]}"), console=console, transient=False)
            self.task = self.progress.add_task("train", total=end_step, completed=start_step, stats="starting...")
            self.progress.start()

    def log(self, step: int, end: int, text: str) -> None:
        if self.mode == "rich":
            self.progress.update(self.task, completed=step, stats=text)
        elif self.mode == "plain":
            print(f"step {step}/{end} | {text}", flush=True)

    def note(self, text: str) -> None:
        if self.mode == "rich":
            self.progress.console.print(text, soft_wrap=True, markup=False)
        elif self.mode == "plain":
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


class _Signals:
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
        import threading

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


def _rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    out = {"rng.torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["rng.torch_cuda"] = torch.cuda.get_rng_state(device)
    return out


def _restore_rng(extra: dict[str, torch.Tensor], device: torch.device) -> None:
    if "rng.torch_cpu" in extra:
        torch.set_rng_state(extra["rng.torch_cpu"])
    if device.type == "cuda" and "rng.torch_cuda" in extra:
        torch.cuda.set_rng_state(extra["rng.torch_cuda"], device)


def train(run: Run, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train `run` from its start (or checkpoint) to `run.end_step`; returns losses and where it stopped.

    `on_step(step, record)` is called after every step (tests use it to inject faults).
    """
    from tinystories_cli.model import TransformerLM, cross_entropy
    from tinystories_cli.optim import AdamW, clip_grad_norm_, cosine_lr, make_param_groups

    cfg, tc, opts = run.model_cfg, run.train_cfg, run.options
    dist = dist_from_env()
    device = pick_device(tc.device, dist)
    init_distributed(dist, device)
    main = dist.is_main
    if dist.enabled:
        # Every rank has checked its inputs (prepare_run) before rank 0 writes anything, and all
        # ranks use rank 0's run directory (a timestamped name could differ by a second).
        run.run_dir = Path(broadcast_str(str(run.run_dir), device))
        torch.distributed.barrier()
    notes: list[str] = []

    # Model, optimizer, data. Seeding before construction makes the initial weights a function of `seed`.
    torch.manual_seed(tc.seed)
    model = TransformerLM(cfg).to(device)
    raw_model = model
    optimizer = AdamW(make_param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                      eps=tc.eps, weight_decay=tc.weight_decay)
    train_tokens, _ = open_tokens(run.train_file, "train", tc.dataset, "train")
    valid_tokens, _ = open_tokens(run.valid_file, "valid", tc.dataset, "valid")
    sampler = BatchSampler(train_tokens, tc.batch_size, cfg.context_length, seed=tc.seed,
                           rank=dist.rank, world_size=dist.world_size)
    # The global count (all ranks together), so a DDP run evaluates the same windows as one process.
    val_starts = fixed_windows(len(valid_tokens), cfg.context_length, tc.eval_batches * tc.batch_size * dist.world_size)

    start_step, best_val, skipped, elapsed_before, rng_state = 0, None, 0, 0.0, None
    ckpt_dir = run.run_dir / runs.CHECKPOINT_DIR
    last_good: Path | None = None
    if run.resume_from is not None:
        ckpt = read_checkpoint(run.resume_from)
        load_model_state(ckpt, raw_model)
        load_optimizer_state(ckpt, optimizer)
        meta = ckpt.metadata
        start_step = ckpt.iteration
        sampler.load_state_dict(meta["sampler"])
        best_val = meta.get("best_val_loss")
        skipped = int(meta.get("skipped_nonfinite", 0))
        elapsed_before = float(meta.get("elapsed_s", 0.0))
        rng_state = ckpt.extra
        last_good = run.resume_from
        if start_step >= run.end_step:
            raise UserError(f"{run.resume_from} is already at step {start_step} (the run ends at {run.end_step})",
                            "raise --stop-at, or the run is finished: evaluate it with `tslm eval`")

    if dist.rank > 0:
        # Same initial weights on every rank (seeded above), but each rank its own dropout stream;
        # rank 0 keeps the single-process stream.
        torch.manual_seed(tc.seed + 7919 * dist.rank + 104729 * start_step)
    if dist.enabled:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast, note = autocast_factory(device, tc.dtype)
    if note:
        notes.append(note)
    loss_fn = _loss_fn(model, autocast, cross_entropy)
    compile_ = tc.compile
    if compile_ and (device.type == "mps" or not hasattr(torch, "compile")):
        notes.append("--compile is not supported here: running eagerly")
        compile_ = False
    if compile_:
        # Without DDP, compile the whole loss (model + cross-entropy as one graph: the logits and
        # their gradient never leave the fused kernels; ~15% faster on CPU than compiling the model
        # alone). The model itself stays unwrapped, so checkpoint names are unchanged. DDP needs
        # its module compiled (its gradient hooks must run), so there the model is compiled.
        loss_fn = _loss_fn(torch.compile(model), autocast, cross_entropy) if dist.enabled else torch.compile(loss_fn)

    # Run directory: config, tokenizer copy, metrics (rank 0 only).
    n_params = raw_model.num_parameters()
    tokens_per_step = tc.batch_size * tc.grad_accum_steps * dist.world_size * cfg.context_length
    summary = {
        "preset": run.preset, "model": cfg.model_dump(), "train": tc.model_dump(),
        "parameters": n_params, "tokens_per_step": tokens_per_step, "max_steps": run.max_steps,
        "planned_tokens": tokens_per_step * run.max_steps, "world_size": dist.world_size,
        "tokenizer": {"fingerprint": run.tokenizer_fingerprint, "source": str(run.tokenizer_dir)},
        "data": {"train": str(run.train_file), "valid": str(run.valid_file)},
        "device": str(device), "tslm_version": __version__, "torch_version": torch.__version__,
    }
    metrics_file = run.run_dir / runs.METRICS_FILE
    if main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        if run.fresh:
            _clear_run_dir(run.run_dir)
            summary["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            atomic_write_text(run.run_dir / runs.CONFIG_FILE, json.dumps(summary, indent=2) + "\n")
            _copy_tokenizer(run.tokenizer_dir, runs.tokenizer_dir_of(run.run_dir))
        else:
            runs.truncate_metrics(metrics_file, start_step)
        runs.update_latest_link(run.run_dir)

    display = Display(opts.display, start_step, run.end_step, enabled=main)
    peak = opts.peak_tflops
    if peak is None:
        peak = measure_peak_tflops(device, torch.bfloat16 if tc.dtype == "bfloat16" and device.type == "cuda"
                                   else torch.float32)
        peak_note = f"{peak:.2f} TFLOP/s (measured matmul; set --peak-tflops for the hardware peak)"
    else:
        peak_note = f"{peak:g} TFLOP/s"
    fpt = flops_per_token(cfg)
    if main:
        _print_header(display, run, summary, peak_note, start_step, notes)
    wandb_run = _init_wandb(opts, run, summary) if main else None

    result = TrainResult(run.run_dir, start_step, run.max_steps, best_val_loss=best_val)
    metrics_fh = open(metrics_file, "a", encoding="utf-8") if main else None
    t_start = time.perf_counter()
    t_log, tokens_log = t_start, 0
    step = start_step
    compiled_checked = not compile_
    model.train()
    if rng_state is not None and dist.is_main:  # last thing before the loop: nothing else may draw from it
        _restore_rng(rng_state, device)
    try:
        with _Signals() as signals:
            while step < run.end_step:
                step += 1
                lr = cosine_lr(step, tc.lr, tc.min_lr, tc.warmup_steps, run.max_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batches = [sampler.next(device) for _ in range(tc.grad_accum_steps)]
                try:
                    loss_sum = _forward_backward(loss_fn, model, batches, dist)
                except Exception as e:  # torch.compile can fail at the first call (no compiler, old GPU, ...)
                    if compiled_checked or isinstance(e, UserError):
                        raise
                    loss_fn = _loss_fn(model, autocast, cross_entropy)
                    optimizer.zero_grad(set_to_none=True)
                    display.note(f"note: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                                 "continuing without --compile")
                    loss_sum = _forward_backward(loss_fn, model, batches, dist)
                compiled_checked = True
                grad_norm = clip_grad_norm_(raw_model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
                # One small all-reduce per step: the mean loss and whether any rank got a stop signal.
                flags = torch.stack([loss_sum.detach().float(), torch.tensor(float(signals.stop), device=device)])
                if dist.enabled:
                    torch.distributed.all_reduce(flags)
                    flags[0] /= dist.world_size
                loss_value, stop_requested = flags[0].item(), flags[1].item() > 0
                norm_value = grad_norm.item()
                if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                    skipped += 1
                    optimizer.zero_grad(set_to_none=True)
                    what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                    if skipped > opts.skip_nonfinite:
                        raise NonFiniteError(
                            f"non-finite {what} ({loss_value if what == 'loss' else norm_value}) at step {step}; "
                            f"last good checkpoint: {last_good or 'none yet'}",
                            "lower --lr, keep --grad-clip at 1.0 or lower it, use --dtype float32, or pass "
                            "--skip-nonfinite N to skip up to N bad steps; resume with --resume")
                    display.note(f"warning: non-finite {what} at step {step}: step skipped "
                                 f"({skipped}/{opts.skip_nonfinite})")
                else:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                result.train_losses[step] = loss_value
                result.step = step
                tokens_log += tokens_per_step
                elapsed = elapsed_before + time.perf_counter() - t_start
                record: dict[str, Any] = {"step": step, "tokens": step * tokens_per_step, "elapsed_s": round(elapsed, 3)}

                if step % tc.log_every == 0 or step == run.end_step or step == start_step + 1:
                    now = time.perf_counter()
                    tps = tokens_log / max(now - t_log, 1e-9)
                    t_log, tokens_log = now, 0
                    mfu = fpt * tps / (peak * 1e12) if peak > 0 else 0.0
                    done = step - start_step
                    eta = (now - t_start) / done * (run.end_step - step)
                    record.update(train_loss=loss_value, lr=lr, grad_norm=norm_value, tokens_per_s=round(tps, 1),
                                  mfu=round(mfu, 5))
                    display.log(step, run.end_step, f"loss {loss_value:.4f} | lr {lr:.2e} | grad {norm_value:.3f} | "
                                f"{tps / 1e3:.1f}K tok/s | MFU {100 * mfu:.1f}% | ETA {format_duration(eta)}")
                if step % tc.eval_every == 0 or step == run.max_steps:
                    val = fixed_window_loss(raw_model, valid_tokens, val_starts, cfg.context_length, tc.batch_size,
                                            device, autocast, dist)
                    record.update(val_loss=val, val_ppl=math.exp(min(val, 50)))
                    result.val_losses[step] = val
                    display.note(f"step {step}: val loss {val:.4f}  ppl {math.exp(min(val, 50)):.2f}")
                    if math.isfinite(val) and (best_val is None or val < best_val):
                        best_val = val
                        record["best"] = True
                        if main:
                            save_checkpoint(raw_model, None, step, ckpt_dir / runs.BEST_CHECKPOINT,
                                            metadata={"model_config": cfg.model_dump(), "val_loss": val,
                                                      "preset": run.preset})
                stopping = stop_requested or step == run.end_step
                if step % tc.save_every == 0 or stopping:
                    if main:
                        last_good = _save_step(raw_model, optimizer, step, ckpt_dir, run, sampler, best_val, skipped,
                                               elapsed, device, tc.keep_last)
                    if dist.enabled:
                        torch.distributed.barrier()
                if main and len(record) > 3:
                    metrics_fh.write(json.dumps(record) + "\n")
                    metrics_fh.flush()
                    if wandb_run is not None:
                        wandb_run.log(record, step=step)
                if on_step is not None:
                    on_step(step, record)
                if stop_requested:
                    result.stopped = "interrupted"
                    display.note(f"{signals.signame or 'signal'}: saved a checkpoint at step {step}; continue with "
                                 f"`tslm train --resume --run-name {run.run_dir.name}`")
                    break
    finally:
        display.close()
        if metrics_fh is not None:
            metrics_fh.close()
        if wandb_run is not None:
            wandb_run.finish()
    if result.stopped == "finished" and run.end_step < run.max_steps:
        result.stopped = "stop_at"
    result.best_val_loss = best_val
    result.elapsed_s = time.perf_counter() - t_start
    done_steps = step - start_step
    result.tokens_per_s = done_steps * tokens_per_step / max(result.elapsed_s, 1e-9)
    if main:
        # The run directory describes itself (what, on what, results, how to use it).
        from tinystories_cli.run_readme import write_run_readme

        write_run_readme(run.run_dir)
    if dist.enabled:
        torch.distributed.barrier()
    return result


def _loss_fn(model, autocast, cross_entropy) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """loss(x, y): the mean cross-entropy of `model` on one micro-batch (logits in float32)."""
    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast():
            logits = model(x)  # (B, T, V)
        return cross_entropy(logits.float(), y)
    return loss


def _forward_backward(loss_fn, model, batches, dist: Dist) -> torch.Tensor:
    """Accumulate gradients over the micro-batches; returns the step's mean loss (a 0-dim tensor)."""
    n = len(batches)
    total = torch.zeros((), device=batches[0][0].device)
    for i, (x, y) in enumerate(batches):
        # DDP: all-reduce gradients only after the last micro-batch.
        sync = contextlib.nullcontext() if (not dist.enabled or i == n - 1) else model.no_sync()
        with sync:
            loss = loss_fn(x, y) / n
            loss.backward()
        total += loss.detach()
    return total


def _save_step(raw_model, optimizer, step, ckpt_dir: Path, run: Run, sampler, best_val, skipped, elapsed, device,
               keep_last: int) -> Path:
    """Write checkpoints/step_N.safetensors atomically, then keep only the newest `keep_last`."""
    path = ckpt_dir / runs.step_checkpoint_name(step)
    meta = {"model_config": run.model_cfg.model_dump(), "train_config": run.train_cfg.model_dump(),
            "preset": run.preset, "sampler": sampler.state_dict(), "best_val_loss": best_val,
            "skipped_nonfinite": skipped, "elapsed_s": elapsed, "max_steps": run.max_steps}
    save_checkpoint(raw_model, optimizer, step, path, metadata=meta, extra_tensors=_rng_tensors(device))
    for _, old in runs.step_checkpoints(run.run_dir)[:-keep_last]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    return path




def _print_header(display: Display, run: Run, summary: dict, peak_note: str, start_step: int, notes: list[str]) -> None:
    from tinystories_cli.console import human_count

    cfg, tc = run.model_cfg, run.train_cfg
    lines = [
        f"run {run.run_dir}  ({'new' if run.fresh else f'resuming from step {start_step}: {run.resume_from}'}; "
        f"resolved config in {run.run_dir / runs.CONFIG_FILE})",
        f"preset {run.preset}  model: vocab {cfg.vocab_size}, ctx {cfg.context_length}, {cfg.num_layers} x "
        f"d{cfg.d_model}, {cfg.num_heads} heads, d_ff {cfg.d_ff}, {cfg.norm_position}-{cfg.norm}, {cfg.pos_emb}, "
        f"{cfg.ffn}, {'tied' if cfg.tie_embeddings else 'untied'}, init {cfg.init}",
        f"train: lr {tc.lr:g} -> {tc.min_lr:g}, warmup {tc.warmup_steps}, wd {tc.weight_decay:g}, betas "
        f"({tc.beta1:g}, {tc.beta2:g}), clip {tc.grad_clip:g}, batch {tc.batch_size} x accum {tc.grad_accum_steps} "
        f"x {summary['world_size']} proc, seed {tc.seed}, device {summary['device']}, dtype {tc.dtype}"
        f"{', compile' if tc.compile else ''}",
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


def _init_wandb(opts: TrainOptions, run: Run, summary: dict):
    if not opts.wandb:
        return None
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package", "pip install wandb, or drop --wandb") from None
    return wandb.init(project="tslm", name=run.run_dir.name, config=summary, resume="allow")
