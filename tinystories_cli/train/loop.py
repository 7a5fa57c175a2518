"""The training loop's pieces: one process or DDP, gradient accumulation, exact resume, guard rails.

    run = prepare_run(preset="debug", options=TrainOptions(run_name="smoke"))   # configs, data, run dir
    result = train(run)                                                         # the loop (train/trainer.py)

`train` builds the state (`build_state`), writes the run directory, then `Trainer.fit` runs one optimizer
step at a time (`step` counts from 1 to `max_steps`), reading like this:

    lr = scheduled_lr(step)       # cosine_lr or wsd_lr (--schedule): it ends exactly at max_steps
    loss, grad_norm = train_step(batches)                        # micro-steps -> clip
        for each of grad_accum_steps micro-batches:              # DDP syncs gradients on the last one only
            loss = cross_entropy(model(x), y) / grad_accum_steps; loss.backward()
        grad_norm = clip_grad_norm_(params, grad_clip)            # global norm, before clipping
    optimizer.step(found_inf=not finite(loss, grad_norm))         # skipped on the device, weights untouched
    at sync points (log/eval/save steps): losses to the host; a skipped step stops the run (or is
    counted, up to --skip-nonfinite); a signal stops it after a checkpoint (exit 130/143 from the CLI);
    a run with a deadline whose steps turned slower shortens its schedule to end in time
    log -> evaluate (and keep the best weights) -> save -> stop on a signal

No host sync between sync points: losses and norms stay on the device (`StepStats`), the update is
skipped with a device-side flag, and on CUDA the next step's batches are read ahead (`Feeder`).

Tokens per step = batch_size x grad_accum_steps x world_size x context_length.

Determinism: weights are initialized from `seed`; batch k of the run is a pure function of
(seed, k) (see `data.BatchSampler`); a checkpoint stores model, optimizer, step, sampler state and
the torch RNG state (dropout), so on CPU `N steps + resume N steps` reproduces `2N steps` bit for bit.

Under `torchrun --nproc_per_node N -m tinystories_cli train ...` each rank trains on its own slice
of the global batch (NCCL on GPUs, gloo on CPUs), with the model replicated (`--parallel ddp`) or
sharded (`--parallel fsdp`, see `train/parallel.py`), and only rank 0 writes files. Checkpoints are the
same single file either way, so a run resumes on any world size with the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinystories_cli import __version__, runs
from tinystories_cli.account import train_flops_per_step
from tinystories_cli.checkpoint import (
    load_model_state,
    load_optimizer_state,
    read_checkpoint,
    save_states,
    state_tensors,
)
from tinystories_cli.config import ModelConfig
from tinystories_cli.data import BatchSampler, fixed_windows
from tinystories_cli.device import (
    Dist,
    autocast_factory,
    broadcast_str,
    choose_compile,
    choose_dtype,
    dist_from_env,
    init_distributed,
    keep_freed_cpu_memory,
    measure_peak_tflops,
    pick_device,
    sync,
    use_fast_fp32_matmul,
)
from tinystories_cli.errors import UserError
from tinystories_cli.evaluate import fixed_window_loss
from tinystories_cli.fileio import atomic_write_text
from tinystories_cli.model import TransformerLM, cross_entropy
from tinystories_cli.optim import build_optimizer, clip_grad_norm_
from tinystories_cli.tokens import open_tokens
from tinystories_cli.train import loggers
from tinystories_cli.train.budget import (  # noqa: F401
    LENGTHEN_MARGIN,
    MIN_PACE_STEPS,
    PACE_SHARE,
    REPLAN_NOTE_SHARE,
    REPLAN_SLACK,
    Pace,
    TimePlan,
    eval_cost_in_steps,
    expected_seconds,
    probe_seconds,
    replan_is_material,
    replanned_length,
    steps_in_budget,
    steps_that_fit,
    time_plan,
    tokens_per_step,
)
from tinystories_cli.train.display import Display, format_duration
from tinystories_cli.train.parallel import (
    LossScaler,
    apply_activation_checkpointing,
    full_state,
    shard_model,
    shard_optimizer_state,
    tied_aliases,
)
from tinystories_cli.train.prepare import Run, TrainOptions, copy_tokenizer, load_init_weights
from tinystories_cli.train.runstate import RunState
from tinystories_cli.train.schedule import RNG, scheduled_lr  # noqa: F401  (scheduled_lr: its old home)


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
    stopped: str = "finished"  # finished | stop_at | interrupted | time_budget (its deadline came first)
    signal: str | None = None  # SIGINT or SIGTERM when interrupted
    tokens_per_s: float = 0.0
    elapsed_s: float = 0.0


@dataclass
class State:
    """What the loop reads and changes: built by `build_state`, advanced by `fit`."""

    dist: Dist
    device: torch.device
    model: torch.nn.Module        # what runs forward (DDP-wrapped under torchrun)
    raw_model: TransformerLM      # what is saved and evaluated
    optimizer: torch.optim.Optimizer  # AdamW, or MuonWithAdamW (`optim.build_optimizer`)
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
    rng: RNG | None = None        # the torch random streams (dropout); set at the loop's start on a resume
    last_good: Path | None = None
    dtype: str = "float32"        # what --dtype chose on this device
    parallel: str = "none"        # none | ddp | fsdp
    scaler: LossScaler | None = None  # float16 only
    valid_tokens_per_byte: float | None = None  # of the validation text (its sidecar), for bits per byte
    scaler_skipped: int = 0       # steps the loss scaler skipped (overflowing float16 gradients)

    def __post_init__(self):
        if self.rng is None:
            self.rng = RNG(self.device)

    def counters(self) -> dict:
        """The loop's own bookkeeping a checkpoint keeps (`RunState`'s names)."""
        return {"best_val_loss": self.best_val, "skipped_nonfinite": self.skipped,
                "scaler_skipped": self.scaler_skipped, "elapsed_s": self.elapsed_before}

    def load_counters(self, saved: RunState) -> None:
        self.best_val, self.skipped = saved.best_val_loss, saved.skipped_nonfinite
        self.scaler_skipped, self.elapsed_before = saved.scaler_skipped, saved.elapsed_s


# --------------------------------------------------------------------------------------------
# The state: build it, restore it, describe it, write the run directory
# --------------------------------------------------------------------------------------------


def build_state(run: Run, probe: bool = False) -> State:
    """Device and process group, model (sharded or replicated), optimizer, data and the checkpoint to continue from."""
    cfg, tc = run.model_cfg, run.train_cfg
    dist = dist_from_env()
    device = pick_device(tc.device, dist)
    init_distributed(dist, device)
    if dist.enabled:
        # Every rank has checked its inputs (prepare_run) before rank 0 writes anything, and all
        # ranks use rank 0's run directory (a timestamped name could differ by a second).
        run.run_dir = Path(broadcast_str(str(run.run_dir), device))
        torch.distributed.barrier()
    dtype = choose_dtype(tc.dtype, device)
    use_fast_fp32_matmul(device)
    if tc.keep_freed_memory:
        keep_freed_cpu_memory(device)
    parallel = tc.parallel if dist.enabled else "none"
    # Seeding before construction makes the initial weights a function of `seed`.
    torch.manual_seed(tc.seed)
    model = TransformerLM(cfg).to(device)
    ckpt = read_checkpoint(run.resume_from) if run.resume_from is not None else None
    if ckpt is not None:
        load_model_state(ckpt, model)  # before sharding: each rank keeps its slice of the loaded weights
    elif run.init_from is not None:  # fine-tuning: the source's weights, a fresh optimizer and schedule
        load_init_weights(model, run.init_from)
    if tc.activation_checkpointing:
        apply_activation_checkpointing(model)
    if parallel == "fsdp":
        shard_model(model, dtype)
    optimizer = build_optimizer(model, tc, sharded=parallel == "fsdp")  # AdamW, or Muon + AdamW
    sampler, valid_tokens, valid_meta, val_starts = open_data(run, dist, parallel)
    autocast, note = autocast_factory(device, dtype)
    steps_tokens = tokens_per_step(tc.batch_size, tc.grad_accum_steps, dist.world_size, cfg.context_length)
    state = State(dist, device, model, model, optimizer, sampler, valid_tokens, val_starts, autocast,
                  loss_fn=make_loss_fn(model, autocast), compiled=False, tokens_per_step=steps_tokens,
                  grad_clip=tc.grad_clip if tc.grad_clip > 0 else math.inf, notes=[note] if note else [],
                  dtype=dtype, parallel=parallel, scaler=LossScaler(device) if dtype == "float16" else None,
                  valid_tokens_per_byte=tokens_per_byte(valid_meta))
    if ckpt is not None:
        restore(state, run, ckpt)
    if dist.rank > 0:
        # Same initial weights on every rank (seeded above), but each rank its own dropout stream;
        # rank 0 keeps the single-process stream.
        torch.manual_seed(tc.seed + 7919 * dist.rank + 104729 * state.start_step)
    if parallel == "ddp":
        state.model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        state.loss_fn = make_loss_fn(state.model, autocast)
    # `auto` compiles on a CPU only where it pays back, judged by the run's expected training time; a probe
    # (`measure_throughput`) times the eager steps the deadline plan starts from.
    expected = None if probe else expected_train_seconds(run, state, device)
    if choose_compile(tc.compile, device, expected):
        compile_loss(state)
    return state


def open_data(run: Run, dist: Dist, parallel: str) -> tuple[BatchSampler, np.ndarray, dict, np.ndarray]:
    """The run's batch sampler, its validation tokens (and their sidecar) and the fixed validation windows."""
    cfg, tc = run.model_cfg, run.train_cfg
    train_tokens, _ = open_tokens(run.train_file, "train", tc.dataset, "train")
    valid_tokens, valid_meta = open_tokens(run.valid_file, "valid", tc.dataset, "valid")
    sampler = BatchSampler(train_tokens, tc.batch_size, cfg.context_length, seed=tc.seed,
                           rank=dist.rank, world_size=dist.world_size, grad_accum=tc.grad_accum_steps)
    # The global count (all ranks together), so a DDP run evaluates the same windows as one process.
    count = tc.eval_batches * tc.batch_size * dist.world_size
    val_starts = fixed_windows(len(valid_tokens), cfg.context_length, count)
    if parallel == "fsdp":  # every rank must run the same number of forwards (each one all-gathers)
        val_starts = val_starts[:max(dist.world_size, len(val_starts) - len(val_starts) % dist.world_size)]
    return sampler, valid_tokens, valid_meta, val_starts


def expected_train_seconds(run: Run, state: State, device: torch.device) -> float | None:
    """How long the steps ahead should take on a CPU (`budget.expected_seconds`); None elsewhere."""
    if device.type != "cpu":
        return None
    flops = (run.end_step - state.start_step) * state.tokens_per_step * flops_per_token(run.model_cfg)
    dtype = torch.bfloat16 if state.dtype == "bfloat16" else torch.float32
    deadline = run.time_plan.deadline if run.time_plan is not None else None
    return expected_seconds(deadline, flops, lambda: measure_peak_tflops(device, dtype))


def restore(state: State, run: Run, ckpt) -> None:
    """Continue from `run.resume_from`: each component loads its part of the checkpoint, the inverse of
    `checkpoint_state` (weights: `build_state`, before sharding; the RNG is applied when the loop starts)."""
    load_optimizer_state(ckpt, state.optimizer)
    if state.parallel == "fsdp":
        shard_optimizer_state(state.optimizer)
    saved = RunState.model_validate(ckpt.metadata)  # (checked by `prepare.check_resumable` already)
    state.start_step = ckpt.iteration
    state.sampler.load_state_dict(saved.sampler.for_sampler())
    state.load_counters(saved)
    if state.scaler is not None:
        state.scaler.load_state_dict(ckpt.extra)
    state.rng.load_state_dict(ckpt.extra)
    state.last_good = run.resume_from
    run.schedule.load_state_dict({"max_steps": saved.max_steps}, state.start_step, run.resume_from)


def checkpoint_state(run: Run, state: State, elapsed: float, sampler: dict) -> tuple[RunState, dict[str, torch.Tensor]]:
    """A step checkpoint's run state and extra tensors, gathered from the run's components: the configs, the
    loop's counters, the schedule, the data sampler (`sampler`: its state at the step), the RNG and the loss
    scaler (`restore` is the inverse; model and optimizer travel as `save_states`' tensors)."""
    tc = run.train_cfg
    saved = RunState(model_config=run.model_cfg.model_dump(), train_config=tc.model_dump(), preset=run.preset,
                     **{**state.counters(), "elapsed_s": elapsed}, **run.schedule.state_dict(),
                     world_size=state.dist.world_size, batch_size=tc.batch_size, grad_accum_steps=tc.grad_accum_steps,
                     tokenizer_fingerprint=run.tokenizer_fingerprint, sampler=sampler)
    extra = state.rng.state_dict()
    if state.scaler is not None:
        extra.update(state.scaler.state_dict())
    return saved, extra


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
        state.notes.append("`compile` is not supported here: running eagerly")
        return
    if state.parallel != "none":
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
        "world_size": state.dist.world_size, "global_batch": state.tokens_per_step // run.model_cfg.context_length,
        "chosen": {"dtype": state.dtype, "compile": state.compiled, "parallel": state.parallel,
                   "float32_matmul_precision": torch.get_float32_matmul_precision(),
                   "activation_checkpointing": run.train_cfg.activation_checkpointing},
        "tokenizer": {"fingerprint": run.tokenizer_fingerprint, "source": str(run.tokenizer_dir)},
        "data": {"train": str(run.train_file), "valid": str(run.valid_file)},
        "device": str(state.device), "tslm_version": __version__, "torch_version": torch.__version__,
        **({"time_budget": run.time_plan.record()} if run.time_plan is not None else {}),
        **({"init_from": run.init_from.record()} if run.init_from is not None else {}),
        **({"auto_size": run.auto_size} if run.auto_size is not None else {}),
    }


def write_run_dir(run: Run, state: State, summary: dict) -> None:
    """A fresh run: config.json and the tokenizer copy. A resumed one: metrics trimmed to its checkpoint."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    runs.remove_stale_temps(run.run_dir)  # what a killed save left: we own the directory now
    if run.fresh:
        runs.clear_run(run.run_dir)
        summary["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        atomic_write_text(run.run_dir / runs.CONFIG_FILE, json.dumps(summary, indent=2) + "\n")
        copy_tokenizer(run.tokenizer_dir, runs.tokenizer_dir_of(run.run_dir))
    else:
        runs.truncate_metrics(run.run_dir / runs.METRICS_FILE, state.start_step)
        moved = runs.abandon_later_checkpoints(run.run_dir, state.start_step, best_checkpoint_step(run.run_dir))
        if moved is not None:
            state.notes.append(f"resuming from step {state.start_step}: the later checkpoints of the run were "
                               f"moved to {moved}")
    runs.update_latest_link(run.run_dir)


def best_checkpoint_step(run_dir: Path) -> int | None:
    """The step of the run's best.safetensors (None when it has none or it is unreadable)."""
    best = runs.best_checkpoint(run_dir)
    if best is None:
        return None
    try:
        return read_checkpoint(best).iteration
    except UserError:
        return None


def peak_tflops(run: Run, device: torch.device) -> tuple[float, str]:
    """The peak MFU is measured against: --peak-tflops, else a measured matmul."""
    peak = run.options.peak_tflops
    if peak is not None:
        return peak, f"{peak:g} TFLOP/s"
    chosen = choose_dtype(run.train_cfg.dtype, device)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(chosen, torch.float32) \
        if device.type == "cuda" else torch.float32
    peak = measure_peak_tflops(device, dtype)
    return peak, f"{peak:.2f} TFLOP/s (measured matmul; set --peak-tflops for the hardware peak)"


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), as `tslm account` counts them."""
    return train_flops_per_step(cfg, batch_size=1, seq_len=cfg.context_length) / cfg.context_length


# --------------------------------------------------------------------------------------------
# One optimizer step, and what happens around it (`Trainer.fit` calls these)
# --------------------------------------------------------------------------------------------


def is_sync_point(step: int, start_step: int, end_step: int, max_steps: int, tc) -> bool:
    """Steps where values come to the host: logging, evaluation, saving, the first and the last step."""
    return (step % tc.log_every == 0 or step % tc.eval_every == 0 or step % tc.save_every == 0
            or step in (start_step + 1, end_step, max_steps))


def train_step(state: State, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-steps -> clip: the step's mean loss and the global gradient norm before clipping (0-dim tensors)."""
    n = len(batches)
    total = torch.zeros((), device=batches[0][0].device)
    for i, (x, y) in enumerate(batches):
        # DDP and FSDP: reduce gradients only after the last micro-batch.
        sync = contextlib.nullcontext()
        if state.parallel == "ddp" and i < n - 1:
            sync = state.model.no_sync()
        elif state.parallel == "fsdp":
            state.raw_model.set_requires_gradient_sync(i == n - 1)
        with sync:
            loss = state.loss_fn(x, y) / n
            (loss if state.scaler is None else state.scaler.scale_loss(loss)).backward()
        total += loss.detach()
    if state.scaler is not None:
        state.scaler.unscale_(state.raw_model.parameters())
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


def guarded_update(state: State, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
    """optimizer.step(), skipped on the device when the loss or the gradient norm is not finite.

    The gradient norm is global (the same on every rank), so all ranks skip together; the loss joins
    the check in one process (under DDP/FSDP a rank's NaN loss makes every rank's gradients NaN).
    The host learns about a skip at the next sync point (`check_nonfinite`)."""
    bad = ~torch.isfinite(grad_norm)
    if not state.dist.enabled:
        bad = bad | ~torch.isfinite(loss)
    state.optimizer.step(found_inf=bad)
    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler is not None:
        state.scaler.update(bad)


def check_nonfinite(state: State, opts: TrainOptions, losses: dict[int, float], stats: StepStats,
                    display: Display) -> None:
    """After a flush: count the steps skipped since the last sync point; stop past --skip-nonfinite."""
    for step, what, value in stats.bad_steps:
        if state.scaler is not None and what == "gradient norm":
            state.scaler_skipped += 1  # float16 overflow: the scaler lowers its scale, the run goes on
            continue
        state.skipped += 1
        if state.skipped > opts.skip_nonfinite:
            raise NonFiniteError(
                f"non-finite {what} ({value}) at step {step}; last good checkpoint: {state.last_good or 'none yet'}",
                "lower `lr`, keep `grad_clip` at 1.0 or lower it, use `dtype` float32, or pass "
                "`skip_nonfinite` N to skip up to N bad steps; resume with `resume`")
        display.note(f"warning: non-finite {what} at step {step}: step skipped ({state.skipped}/{opts.skip_nonfinite})")


def any_rank(state: State, *flags: bool) -> list[bool]:
    """For each flag, whether it is set on any rank (one tiny all-reduce under torchrun)."""
    if not state.dist.enabled:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=state.device)
    torch.distributed.all_reduce(t)
    return [v > 0 for v in t.tolist()]


class StepStats:
    """Each step's loss and gradient norm, kept on the device until the next sync point."""

    def __init__(self):
        self.steps: list[int] = []
        self.values: list[torch.Tensor] = []
        self.bad_steps: list[tuple[int, str, float]] = []

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.steps.append(step)
        self.values.append(torch.stack([loss.detach().float(), grad_norm.detach().float().to(loss.device)]))

    def flush(self, dist: Dist) -> tuple[dict[int, float], float]:
        """({step: loss averaged over ranks}, the last step's gradient norm): one transfer for all pending steps."""
        both = torch.stack(self.values)  # (n, 2)
        if dist.enabled:
            losses = both[:, 0].contiguous()
            torch.distributed.all_reduce(losses)
            both = torch.stack([losses / dist.world_size, both[:, 1]], dim=1)
        rows = both.tolist()
        out = {s: r[0] for s, r in zip(self.steps, rows)}
        self.bad_steps = [(s, "loss", r[0]) if not math.isfinite(r[0]) else (s, "gradient norm", r[1])
                          for s, r in zip(self.steps, rows) if not (math.isfinite(r[0]) and math.isfinite(r[1]))]
        norm = rows[-1][1]
        self.steps, self.values = [], []
        return out, norm


class Feeder:
    """The next step's micro-batches, read ahead on CUDA (pinned memory, non-blocking copies) while the
    current step runs; elsewhere read when needed. `sampler_state()` is the position of the batches consumed."""

    def __init__(self, sampler: BatchSampler, device: torch.device, micro_batches: int):
        self.sampler, self.device, self.n = sampler, device, micro_batches
        self.ahead: list | None = None
        self.read_ahead = device.type == "cuda"

    def _read(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.sampler.next(self.device) for _ in range(self.n)]

    def take(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batches, self.ahead = (self.ahead if self.ahead is not None else self._read()), None
        return batches

    def prefetch(self) -> None:
        if self.read_ahead:
            self.ahead = self._read()

    def sampler_state(self) -> dict:
        state = self.sampler.state_dict()
        if self.ahead is not None:
            state["draws"] -= self.n
        return state


def evaluate_and_keep_best(run: Run, state: State, step: int, record: dict, result: TrainResult,
                           display: Display) -> None:
    """Validation loss on the fixed windows; a new best is saved as best.safetensors (weights only)."""
    cfg = run.model_cfg
    val = fixed_window_loss(state.raw_model, state.valid_tokens, state.val_starts, cfg.context_length,
                            run.train_cfg.batch_size, state.device, state.autocast, state.dist)
    ppl = math.exp(min(val, 50))
    record.update(val_loss=val, val_ppl=ppl)
    if state.valid_tokens_per_byte is not None:  # the windows' mean loss, spread over the text's bytes
        record["val_bpb"] = val * state.valid_tokens_per_byte / math.log(2)
    result.val_losses[step] = val
    display.note(f"step {step}: val loss {val:.4f}  ppl {ppl:.2f}")
    if math.isfinite(val) and (state.best_val is None or val < state.best_val):
        state.best_val = val
        record["best"] = True
        model_sd, _ = full_state(state.raw_model, None)  # under FSDP every rank takes part in the gather
        if state.dist.is_main:
            save_states(*state_tensors(model_sd, tied_aliases(state.raw_model)), None, None, step,
                        run.run_dir / runs.CHECKPOINT_DIR / runs.BEST_CHECKPOINT,
                        metadata={"model_config": cfg.model_dump(), "val_loss": val, "preset": run.preset})


def save_step(run: Run, state: State, step: int, elapsed: float, feeder: Feeder | None = None) -> None:
    """Rank 0 writes checkpoints/step_N.safetensors atomically, then keeps only the newest `keep_last`.

    The file is the same for 1 process, DDP and FSDP: full tensors with plain names (FSDP gathers them
    to rank 0's CPU first), so a run continues on any world size and either way of parallelizing."""
    model_sd, optim_sd = full_state(state.raw_model, state.optimizer)
    if state.dist.is_main:
        path = run.run_dir / runs.CHECKPOINT_DIR / runs.step_checkpoint_name(step)
        saved, extra = checkpoint_state(run, state, elapsed,
                                        feeder.sampler_state() if feeder is not None else state.sampler.state_dict())
        save_states(*state_tensors(model_sd, tied_aliases(state.raw_model)), state.optimizer, optim_sd, step, path,
                    metadata=saved.metadata(), extra_tensors=extra)
        for _, old in runs.step_checkpoints(run.run_dir)[:-run.train_cfg.keep_last]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        state.last_good = path
    if state.dist.enabled:
        torch.distributed.barrier()


def plan_time_budget(run: Run) -> None:
    """--time-budget: a probe of real training steps measures tokens/s on this hardware, and max_steps is
    set so that training (plus its evaluations) fills the budget (`budget.steps_in_budget`); the schedule
    ends there. The probe's own time counts against the budget. Should the machine slow down, `fit`
    shortens the schedule (`fit_to_deadline`) and, as a last resort, stops at the deadline with a checkpoint."""
    budget, tc = run.options.time_budget, run.train_cfg
    deadline = time.perf_counter() + budget
    tps, spent = measure_throughput(run, max_seconds=probe_seconds(budget, 0.02, 60.0), max_steps=20)
    dist = dist_from_env()
    if dist.enabled:  # every rank plans the same schedule: the slowest rank's rate
        t = torch.tensor([tps], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        tps = float(t.item())
    step_tokens = tokens_per_step(tc.batch_size, tc.grad_accum_steps, dist.world_size, run.model_cfg.context_length)
    steps = steps_in_budget(budget, spent, tps, step_tokens, eval_cost_in_steps(tc) / tc.eval_every)
    if steps < 1:
        raise UserError(f"a `time_budget` of {format_duration(budget)} leaves no time to train (the probe ran "
                        f"{tps:,.0f} tokens/s, {spent:.1f} s)", "give a longer `time_budget` or a smaller model")
    note = run.schedule.plan_deadline(time_plan(budget, deadline, spent, tps, steps), run.options.stop_at)
    if note is not None:
        run.notes.append(note)
    run.notes.append(f"`time_budget` {format_duration(budget)}: the probe ran {tps:,.0f} tokens/s ({spent:.1f} s) "
                     f"-> {steps:,} steps of {step_tokens:,} tokens, the {tc.schedule} schedule planned to end there")


def fit_to_deadline(run: Run, state: State, step: int, pace: Pace, meter: Throughput, display: Display) -> None:
    """Keep a run with a deadline (--time-budget, quickstart's --minutes) to it when its steps turn out
    slower or faster than the probe measured (`budget.replanned_length`).

    Slower (another job took the cores, thermal throttling): the schedule is shortened, so that the
    learning rate still decays to its end (the last step evaluates and saves) before the deadline rather
    than being cut off at full rate. Faster (the probe under-read the machine): a WSD schedule still in
    its flat phase is lengthened to fill the time, up to `time_plan.max_steps_cap`; no step already
    taken had another rate (`wsd_decay_start` only moves later). A cosine schedule is never lengthened.
    The new length goes to config.json at once, so a resumed run keeps it; `time_budget.replanned`
    lists each change. Under torchrun, all ranks take the smallest length any proposes."""
    schedule = run.schedule
    plan = schedule.plan
    target = replanned_length(plan, pace, time.perf_counter(), step, schedule.max_steps, schedule.train_cfg,
                              schedule.can_lengthen(step))
    if state.dist.enabled:
        t = torch.tensor([target], dtype=torch.float64, device=state.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        target = int(t.item())
    if target == schedule.max_steps:
        return
    schedule.resize(target, step)
    meter.end_step = schedule.end_step
    display.retotal(schedule.end_step)
    # Said only when the length moved materially since it was last said (small corrections are frequent on a
    # busy machine; every one is still in config.json's time_budget.replanned).
    noted = plan.noted_steps if plan.noted_steps is not None else plan.planned_steps
    if replan_is_material(noted, target):
        plan.noted_steps = target
        display.note(f"steps are {'slower' if target < noted else 'faster'} than the probe measured: the schedule "
                     f"now ends at step {target:,} instead of {noted:,}, to "
                     + ("finish before the deadline" if target < noted else "use the time budget"))
    if state.dist.is_main:
        update_run_config(run, max_steps=target, planned_tokens=state.tokens_per_step * target,
                          train=run.train_cfg.model_dump())


def update_run_config(run: Run, **changes) -> None:
    """Rewrite the run's config.json (atomically) with `changes` applied at its top level."""
    path = run.run_dir / runs.CONFIG_FILE
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(changes)
    atomic_write_text(path, json.dumps(config, indent=2) + "\n")


def can_lengthen(run: Run, step: int) -> bool:
    """`Schedule.can_lengthen` of the run's schedule."""
    return run.schedule.can_lengthen(step)


def record_time_used(run: Run, seconds: float, result: TrainResult) -> None:
    """The actual wall-clock of a --time-budget run beside its plan, in config.json."""
    update_run_config(
        run,
        time_budget={
            **run.time_plan.record(),
            "actual_s": round(seconds, 2),
            "steps_done": result.step,
            "stopped": result.stopped,
        },
    )


def measure_throughput(run: Run, max_seconds: float, max_steps: int = 10) -> tuple[float, float]:
    """Training tokens/s of `run` on its device: one warm-up step, then real steps (`train_step` and the
    optimizer, on the run's data) until `max_seconds` have passed since the call, building the model and the
    warm-up step included (at least one timed step), so a probe announced as N seconds takes about N seconds.
    Returns (tokens/s, seconds spent). Nothing is written; the run itself starts afresh from its seed."""
    t_start = time.perf_counter()
    state = build_state(run, probe=True)
    state.model.train()

    def step() -> None:
        train_step(state, [state.sampler.next(state.device) for _ in range(run.train_cfg.grad_accum_steps)])
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)

    step()  # first step: allocations, kernel selection (and compiling, with --compile)
    sync(state.device)
    t0, n = time.perf_counter(), 0
    while n < 1 or (time.perf_counter() - t_start < max_seconds and n < max_steps):
        step()
        sync(state.device)
        n += 1
    return n * state.tokens_per_step / (time.perf_counter() - t0), time.perf_counter() - t_start


# --------------------------------------------------------------------------------------------
# Bookkeeping: throughput, metrics.jsonl (+ TensorBoard, W&B), RNG state
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


def tokens_per_byte(meta: dict) -> float | None:
    """Tokens per byte of the text a token file was encoded from (None when its sidecar lacks the bytes).

    >>> tokens_per_byte({"num_tokens": 250, "source_bytes": 1000}), tokens_per_byte({"num_tokens": 5})
    (0.25, None)
    """
    n, b = meta.get("num_tokens"), meta.get("source_bytes")
    return n / b if isinstance(n, int) and isinstance(b, int) and b > 0 else None


class MetricsLog:
    """Rank 0's metrics.jsonl (one JSON object per logged, evaluated or saved step), and the same records to
    the run's loggers (`--log tensorboard,wandb`, see `train/loggers.py`; a failing logger never stops the run)."""

    def __init__(self, run: Run, summary: dict, start_step: int = 0, warn: Callable[[str], None] | None = None):
        self.fh = open(run.run_dir / runs.METRICS_FILE, "a", encoding="utf-8")
        self.loggers = loggers.open_loggers(loggers.names_of(run.train_cfg.log), run.run_dir, config=summary,
                                            start_step=start_step, **({"warn": warn} if warn else {}))

    def write(self, record: dict) -> None:
        if len(record) <= 3:  # step, tokens, elapsed_s only: nothing was logged at this step
            return
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        self.loggers.log_metrics(record["step"], record)

    def close(self) -> None:
        self.fh.close()
        self.loggers.close()


def rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    """`RNG(device).state_dict()`."""
    return RNG(device).state_dict()


def restore_rng(extra: dict[str, torch.Tensor], device: torch.device) -> None:
    """Set the RNG streams in a checkpoint's `extra` tensors now."""
    rng = RNG(device)
    rng.load_state_dict(extra)
    rng.apply()
