"""The training loop: one process or DDP, gradient accumulation, exact resume, guard rails.

    run = prepare_run(preset="debug", options=TrainOptions(run_name="smoke"))   # configs, data, run dir
    result = train(run)                                                         # the loop

`train` builds the state (`build_state`), writes the run directory, then `fit` runs one optimizer step
at a time (`step` counts from 1 to `max_steps`), reading like this:

    lr = cosine_lr(step, lr, min_lr, warmup_steps, max_steps)    # the schedule ends exactly at max_steps
    loss, grad_norm = train_step(batches)                        # micro-steps -> clip
        for each of grad_accum_steps micro-batches:              # DDP syncs gradients on the last one only
            loss = cross_entropy(model(x), y) / grad_accum_steps; loss.backward()
        grad_norm = clip_grad_norm_(params, grad_clip)            # global norm, before clipping
    if loss or grad_norm is not finite: stop (or skip up to --skip-nonfinite steps), weights untouched
    else: optimizer.step()
    log -> evaluate (and keep the best weights) -> save -> stop on a signal

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
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tinystories_cli import __version__, runs
from tinystories_cli.account import train_flops_per_step
from tinystories_cli.checkpoint import load_model_state, load_optimizer_state, read_checkpoint, save_checkpoint
from tinystories_cli.config import ModelConfig
from tinystories_cli.data import BatchSampler, fixed_windows
from tinystories_cli.device import (Dist, autocast_factory, broadcast_str, dist_from_env, init_distributed,
                                    measure_peak_tflops, pick_device, sync)
from tinystories_cli.errors import UserError
from tinystories_cli.evaluate import fixed_window_loss
from tinystories_cli.fileio import atomic_write_text
from tinystories_cli.model import TransformerLM, cross_entropy
from tinystories_cli.optim import AdamW, clip_grad_norm_, cosine_lr, make_param_groups
from tinystories_cli.run_readme import write_run_readme
from tinystories_cli.tokens import open_tokens
from tinystories_cli.train.display import Display, Signals, format_duration, print_header
from tinystories_cli.train.prepare import Run, TrainOptions, clear_run_dir, copy_tokenizer, load_init_weights


class NonFiniteError(UserError):
    """The loss or gradient norm became NaN/inf."""


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


@dataclass
class State:
    """What the loop reads and changes: built by `build_state`, advanced by `fit`."""

    dist: Dist
    device: torch.device
    model: torch.nn.Module        # what runs forward (DDP-wrapped under torchrun)
    raw_model: TransformerLM      # what is saved and evaluated
    optimizer: AdamW
    sampler: BatchSampler
    valid_tokens: np.ndarray
    val_starts: np.ndarray
    autocast: Callable
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    compiled: bool
    tokens_per_step: int
    grad_clip: float              # math.inf when clipping is off
    notes: list[str] = field(default_factory=list)
    start_step: int = 0
    best_val: float | None = None
    skipped: int = 0
    elapsed_before: float = 0.0
    rng_state: dict[str, torch.Tensor] | None = None
    last_good: Path | None = None


# --------------------------------------------------------------------------------------------
# train = build the state -> write the run directory -> fit -> describe the run
# --------------------------------------------------------------------------------------------


def train(run: Run, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train `run` from its start (or checkpoint) to `run.end_step`; returns losses and where it stopped.

    `on_step(step, record)` is called after every step (tests use it to inject faults).
    """
    state = build_state(run)
    summary = run_summary(run, state)
    main = state.dist.is_main
    if main:
        write_run_dir(run, state, summary)
    display = Display(run.options.display, state.start_step, run.end_step, enabled=main)
    peak, peak_note = peak_tflops(run, state.device)
    if main:
        print_header(display, run, summary, peak_note, state.start_step, state.notes)
    log = MetricsLog(run, summary) if main else None
    try:
        result = fit(run, state, display, log, peak, on_step)
    finally:
        display.close()
        if log is not None:
            log.close()
    if main:
        write_run_readme(run.run_dir)  # the run directory describes itself (what, on what, results, how to use it)
    if state.dist.enabled:
        torch.distributed.barrier()
    return result


def build_state(run: Run) -> State:
    """Device and process group, model, optimizer, data and the checkpoint to continue from."""
    cfg, tc = run.model_cfg, run.train_cfg
    dist = dist_from_env()
    device = pick_device(tc.device, dist)
    init_distributed(dist, device)
    if dist.enabled:
        # Every rank has checked its inputs (prepare_run) before rank 0 writes anything, and all
        # ranks use rank 0's run directory (a timestamped name could differ by a second).
        run.run_dir = Path(broadcast_str(str(run.run_dir), device))
        torch.distributed.barrier()
    # Seeding before construction makes the initial weights a function of `seed`.
    torch.manual_seed(tc.seed)
    model = TransformerLM(cfg).to(device)
    if run.init_from is not None:  # fine-tuning: the source's weights, a fresh optimizer and schedule
        load_init_weights(model, run.init_from)
    optimizer = AdamW(make_param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                      eps=tc.eps, weight_decay=tc.weight_decay)
    train_tokens, _ = open_tokens(run.train_file, "train", tc.dataset, "train")
    valid_tokens, _ = open_tokens(run.valid_file, "valid", tc.dataset, "valid")
    sampler = BatchSampler(train_tokens, tc.batch_size, cfg.context_length, seed=tc.seed,
                           rank=dist.rank, world_size=dist.world_size)
    # The global count (all ranks together), so a DDP run evaluates the same windows as one process.
    val_starts = fixed_windows(len(valid_tokens), cfg.context_length, tc.eval_batches * tc.batch_size * dist.world_size)
    autocast, note = autocast_factory(device, tc.dtype)
    state = State(dist, device, model, model, optimizer, sampler, valid_tokens, val_starts, autocast,
                  loss_fn=make_loss_fn(model, autocast), compiled=False,
                  tokens_per_step=tc.batch_size * tc.grad_accum_steps * dist.world_size * cfg.context_length,
                  grad_clip=tc.grad_clip if tc.grad_clip > 0 else math.inf,
                  notes=[note] if note else [])
    if run.resume_from is not None:
        restore(state, run)
    if dist.rank > 0:
        # Same initial weights on every rank (seeded above), but each rank its own dropout stream;
        # rank 0 keeps the single-process stream.
        torch.manual_seed(tc.seed + 7919 * dist.rank + 104729 * state.start_step)
    if dist.enabled:
        state.model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        state.loss_fn = make_loss_fn(state.model, autocast)
    if tc.compile:
        compile_loss(state)
    return state


def restore(state: State, run: Run) -> None:
    """Continue from `run.resume_from`: weights, optimizer, data position, bookkeeping (RNG: see `fit`)."""
    ckpt = read_checkpoint(run.resume_from)
    load_model_state(ckpt, state.raw_model)
    load_optimizer_state(ckpt, state.optimizer)
    meta = ckpt.metadata
    state.start_step = ckpt.iteration
    state.sampler.load_state_dict(meta["sampler"])
    state.best_val = meta.get("best_val_loss")
    state.skipped = int(meta.get("skipped_nonfinite", 0))
    state.elapsed_before = float(meta.get("elapsed_s", 0.0))
    state.rng_state = ckpt.extra
    state.last_good = run.resume_from
    if state.start_step >= run.end_step:
        raise UserError(f"{run.resume_from} is already at step {state.start_step} (the run ends at {run.end_step})",
                        "raise --stop-at, or the run is finished: evaluate it with `tslm eval`")


def make_loss_fn(model, autocast) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """loss(x, y): the mean cross-entropy of `model` on one micro-batch (logits in float32)."""
    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast():
            logits = model(x)  # (B, T, V)
        return cross_entropy(logits.float(), y)
    return loss


def compile_loss(state: State) -> None:
    """torch.compile the loss where it is supported; a failure at the first step falls back (`first_step`).

    Without DDP the whole loss is compiled (model + cross-entropy as one graph: the logits and their
    gradient never leave the fused kernels; ~15% faster on CPU than compiling the model alone). The model
    itself stays unwrapped, so checkpoint names are unchanged. DDP needs its module compiled (its gradient
    hooks must run), so there the model is compiled.
    """
    if state.device.type == "mps" or not hasattr(torch, "compile"):
        state.notes.append("--compile is not supported here: running eagerly")
        return
    if state.dist.enabled:
        state.loss_fn = make_loss_fn(torch.compile(state.model), state.autocast)
    else:
        state.loss_fn = torch.compile(state.loss_fn)
    state.compiled = True


def run_summary(run: Run, state: State) -> dict[str, Any]:
    """What config.json records about the run."""
    return {
        "preset": run.preset, "model": run.model_cfg.model_dump(), "train": run.train_cfg.model_dump(),
        "parameters": state.raw_model.num_parameters(), "tokens_per_step": state.tokens_per_step,
        "max_steps": run.max_steps, "planned_tokens": state.tokens_per_step * run.max_steps,
        "world_size": state.dist.world_size,
        "tokenizer": {"fingerprint": run.tokenizer_fingerprint, "source": str(run.tokenizer_dir)},
        "data": {"train": str(run.train_file), "valid": str(run.valid_file)},
        "device": str(state.device), "tslm_version": __version__, "torch_version": torch.__version__,
        **({"init_from": run.init_from.record()} if run.init_from is not None else {}),
    }


def write_run_dir(run: Run, state: State, summary: dict) -> None:
    """A fresh run: config.json and the tokenizer copy. A resumed one: metrics trimmed to its checkpoint."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if run.fresh:
        clear_run_dir(run.run_dir)
        summary["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        atomic_write_text(run.run_dir / runs.CONFIG_FILE, json.dumps(summary, indent=2) + "\n")
        copy_tokenizer(run.tokenizer_dir, runs.tokenizer_dir_of(run.run_dir))
    else:
        runs.truncate_metrics(run.run_dir / runs.METRICS_FILE, state.start_step)
    runs.update_latest_link(run.run_dir)


def peak_tflops(run: Run, device: torch.device) -> tuple[float, str]:
    """The peak MFU is measured against: --peak-tflops, else a measured matmul."""
    peak = run.options.peak_tflops
    if peak is not None:
        return peak, f"{peak:g} TFLOP/s"
    dtype = torch.bfloat16 if run.train_cfg.dtype == "bfloat16" and device.type == "cuda" else torch.float32
    peak = measure_peak_tflops(device, dtype)
    return peak, f"{peak:.2f} TFLOP/s (measured matmul; set --peak-tflops for the hardware peak)"


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), as `tslm account` counts them."""
    return train_flops_per_step(cfg, batch_size=1, seq_len=cfg.context_length) / cfg.context_length


# --------------------------------------------------------------------------------------------
# fit: one optimizer step at a time
# --------------------------------------------------------------------------------------------


def fit(run: Run, state: State, display: Display, log: MetricsLog | None, peak: float,
        on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Steps `state.start_step + 1 .. run.end_step`: lr -> train_step -> guarded update -> log/eval/save."""
    tc = run.train_cfg
    result = TrainResult(run.run_dir, state.start_step, run.max_steps, best_val_loss=state.best_val)
    meter = Throughput(state.start_step, run.end_step, flops_per_token(run.model_cfg), peak)
    state.model.train()
    if state.rng_state is not None and state.dist.is_main:  # last thing before the loop: nothing else may draw from it
        restore_rng(state.rng_state, state.device)
    with Signals() as signals:
        for step in range(state.start_step + 1, run.end_step + 1):
            lr = cosine_lr(step, tc.lr, tc.min_lr, tc.warmup_steps, run.max_steps)
            for group in state.optimizer.param_groups:
                group["lr"] = lr
            batches = [state.sampler.next(state.device) for _ in range(tc.grad_accum_steps)]
            loss, grad_norm = first_step(state, batches, display) if step == state.start_step + 1 \
                else train_step(state, batches)
            loss_value, norm_value, stop_requested = host_values(state, loss, grad_norm, signals.stop)
            guarded_update(state, run.options, step, loss_value, norm_value, display)
            result.train_losses[step], result.step = loss_value, step
            record = meter.record(step, state, state.elapsed_before)
            if step % tc.log_every == 0 or step == run.end_step or step == state.start_step + 1:
                record.update(train_loss=loss_value, lr=lr, grad_norm=norm_value, **meter.rates(step))
                display.log(step, run.end_step, meter.line(loss_value, lr, norm_value, record))
            if step % tc.eval_every == 0 or step == run.max_steps:
                evaluate_and_keep_best(run, state, step, record, result, display)
            if step % tc.save_every == 0 or stop_requested or step == run.end_step:
                save_step(run, state, step, record["elapsed_s"])
            if log is not None:
                log.write(record)
            if on_step is not None:
                on_step(step, record)
            if stop_requested:
                result.stopped = "interrupted"
                display.note(f"{signals.signame or 'signal'}: saved a checkpoint at step {step}; continue with "
                             f"`tslm train --resume --run-name {run.run_dir.name}`")
                break
    if result.stopped == "finished" and run.end_step < run.max_steps:
        result.stopped = "stop_at"
    result.best_val_loss = state.best_val
    result.elapsed_s, result.tokens_per_s = meter.totals(result.step, state.tokens_per_step)
    return result


def train_step(state: State, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-steps -> clip: the step's mean loss and the global gradient norm before clipping (0-dim tensors)."""
    n = len(batches)
    total = torch.zeros((), device=batches[0][0].device)
    for i, (x, y) in enumerate(batches):
        # DDP: all-reduce gradients only after the last micro-batch.
        sync = contextlib.nullcontext() if (not state.dist.enabled or i == n - 1) else state.model.no_sync()
        with sync:
            loss = state.loss_fn(x, y) / n
            loss.backward()
        total += loss.detach()
    grad_norm = clip_grad_norm_(state.raw_model.parameters(), state.grad_clip)
    return total, grad_norm


def first_step(state: State, batches, display: Display) -> tuple[torch.Tensor, torch.Tensor]:
    """`train_step`, where a failing torch.compile (no compiler, old GPU, ...) falls back to eager once."""
    if not state.compiled:
        return train_step(state, batches)
    try:
        return train_step(state, batches)
    except UserError:
        raise
    except Exception as e:  # compiling happens at the first call, forward or backward
        state.loss_fn = make_loss_fn(state.model, state.autocast)
        state.compiled = False
        state.optimizer.zero_grad(set_to_none=True)
        display.note(f"note: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                     "continuing without --compile")
        return train_step(state, batches)


def host_values(state: State, loss: torch.Tensor, grad_norm: torch.Tensor, stop: bool) -> tuple[float, float, bool]:
    """(mean loss over ranks, grad norm, whether any rank got a stop signal): one small all-reduce."""
    flags = torch.stack([loss.float(), torch.tensor(float(stop), device=state.device)])
    if state.dist.enabled:
        torch.distributed.all_reduce(flags)
        flags[0] /= state.dist.world_size
    return flags[0].item(), grad_norm.item(), flags[1].item() > 0


def guarded_update(state: State, opts: TrainOptions, step: int, loss: float, grad_norm: float, display: Display) -> None:
    """optimizer.step() when loss and gradient are finite; otherwise skip (up to --skip-nonfinite) or stop."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        return
    state.skipped += 1
    state.optimizer.zero_grad(set_to_none=True)
    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
    if state.skipped > opts.skip_nonfinite:
        raise NonFiniteError(
            f"non-finite {what} ({value}) at step {step}; last good checkpoint: {state.last_good or 'none yet'}",
            "lower --lr, keep --grad-clip at 1.0 or lower it, use --dtype float32, or pass "
            "--skip-nonfinite N to skip up to N bad steps; resume with --resume")
    display.note(f"warning: non-finite {what} at step {step}: step skipped ({state.skipped}/{opts.skip_nonfinite})")


def evaluate_and_keep_best(run: Run, state: State, step: int, record: dict, result: TrainResult,
                           display: Display) -> None:
    """Validation loss on the fixed windows; a new best is saved as best.safetensors (weights only)."""
    cfg = run.model_cfg
    val = fixed_window_loss(state.raw_model, state.valid_tokens, state.val_starts, cfg.context_length,
                            run.train_cfg.batch_size, state.device, state.autocast, state.dist)
    ppl = math.exp(min(val, 50))
    record.update(val_loss=val, val_ppl=ppl)
    result.val_losses[step] = val
    display.note(f"step {step}: val loss {val:.4f}  ppl {ppl:.2f}")
    if math.isfinite(val) and (state.best_val is None or val < state.best_val):
        state.best_val = val
        record["best"] = True
        if state.dist.is_main:
            save_checkpoint(state.raw_model, None, step, run.run_dir / runs.CHECKPOINT_DIR / runs.BEST_CHECKPOINT,
                            metadata={"model_config": cfg.model_dump(), "val_loss": val, "preset": run.preset})


def save_step(run: Run, state: State, step: int, elapsed: float) -> None:
    """Rank 0 writes checkpoints/step_N.safetensors atomically, then keeps only the newest `keep_last`."""
    if state.dist.is_main:
        path = run.run_dir / runs.CHECKPOINT_DIR / runs.step_checkpoint_name(step)
        meta = {"model_config": run.model_cfg.model_dump(), "train_config": run.train_cfg.model_dump(),
                "preset": run.preset, "sampler": state.sampler.state_dict(), "best_val_loss": state.best_val,
                "skipped_nonfinite": state.skipped, "elapsed_s": elapsed, "max_steps": run.max_steps}
        save_checkpoint(state.raw_model, state.optimizer, step, path, metadata=meta,
                        extra_tensors=rng_tensors(state.device))
        for _, old in runs.step_checkpoints(run.run_dir)[:-run.train_cfg.keep_last]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        state.last_good = path
    if state.dist.enabled:
        torch.distributed.barrier()


def measure_throughput(run: Run, max_seconds: float, max_steps: int = 10) -> tuple[float, float]:
    """Training tokens/s of `run` on its device: one warm-up step, then real steps (`train_step` and the
    optimizer, on the run's data) until `max_seconds` (at least one). Returns (tokens/s, seconds spent).
    Nothing is written; the run itself starts afresh from its seed."""
    t_start = time.perf_counter()
    state = build_state(run)
    state.model.train()

    def step() -> None:
        train_step(state, [state.sampler.next(state.device) for _ in range(run.train_cfg.grad_accum_steps)])
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)

    step()  # first step: allocations, kernel selection (and compiling, with --compile)
    sync(state.device)
    t0, n = time.perf_counter(), 0
    while n < 1 or (time.perf_counter() - t0 < max_seconds and n < max_steps):
        step()
        sync(state.device)
        n += 1
    return n * state.tokens_per_step / (time.perf_counter() - t0), time.perf_counter() - t_start


# --------------------------------------------------------------------------------------------
# Bookkeeping: throughput, metrics.jsonl (+ wandb), RNG state
# --------------------------------------------------------------------------------------------


class Throughput:
    """Wall-clock, tokens/s and MFU between log steps, and the ETA."""

    def __init__(self, start_step: int, end_step: int, flops_per_token: float, peak_tflops: float):
        self.start_step, self.end_step = start_step, end_step
        self.fpt, self.peak = flops_per_token, peak_tflops
        self.t_start = self.t_log = time.perf_counter()
        self.tokens_log = 0

    def record(self, step: int, state: State, elapsed_before: float) -> dict[str, Any]:
        """The step's metrics record (step, tokens, elapsed_s); counts the step's tokens."""
        self.tokens_log += state.tokens_per_step
        elapsed = elapsed_before + time.perf_counter() - self.t_start
        return {"step": step, "tokens": step * state.tokens_per_step, "elapsed_s": round(elapsed, 3)}

    def rates(self, step: int) -> dict[str, float]:
        """tokens/s and MFU since the previous log step (and resets the window)."""
        now = time.perf_counter()
        tps = self.tokens_log / max(now - self.t_log, 1e-9)
        self.t_log, self.tokens_log = now, 0
        self.eta = (now - self.t_start) / (step - self.start_step) * (self.end_step - step)
        mfu = self.fpt * tps / (self.peak * 1e12) if self.peak > 0 else 0.0
        return {"tokens_per_s": round(tps, 1), "mfu": round(mfu, 5)}

    def line(self, loss: float, lr: float, grad_norm: float, record: dict) -> str:
        return (f"loss {loss:.4f} | lr {lr:.2e} | grad {grad_norm:.3f} | {record['tokens_per_s'] / 1e3:.1f}K tok/s | "
                f"MFU {100 * record['mfu']:.1f}% | ETA {format_duration(self.eta)}")

    def totals(self, step: int, tokens_per_step: int) -> tuple[float, float]:
        """(seconds this process trained, its tokens/s)."""
        elapsed = time.perf_counter() - self.t_start
        return elapsed, (step - self.start_step) * tokens_per_step / max(elapsed, 1e-9)


class MetricsLog:
    """Rank 0's metrics.jsonl (one JSON object per logged, evaluated or saved step) and optional wandb."""

    def __init__(self, run: Run, summary: dict):
        self.fh = open(run.run_dir / runs.METRICS_FILE, "a", encoding="utf-8")
        self.wandb = init_wandb(run.options, run, summary)

    def write(self, record: dict) -> None:
        if len(record) <= 3:  # step, tokens, elapsed_s only: nothing was logged at this step
            return
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def close(self) -> None:
        self.fh.close()
        if self.wandb is not None:
            self.wandb.finish()


def init_wandb(opts: TrainOptions, run: Run, summary: dict):
    if not opts.wandb:
        return None
    try:
        import wandb  # optional: only with --wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package", "pip install wandb, or drop --wandb") from None
    return wandb.init(project="tslm", name=run.run_dir.name, config=summary, resume="allow")


def rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    out = {"rng.torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["rng.torch_cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng(extra: dict[str, torch.Tensor], device: torch.device) -> None:
    if "rng.torch_cpu" in extra:
        torch.set_rng_state(extra["rng.torch_cpu"])
    if device.type == "cuda" and "rng.torch_cuda" in extra:
        torch.cuda.set_rng_state(extra["rng.torch_cuda"], device)
