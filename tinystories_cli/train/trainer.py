"""The trainer: `train(run)` builds the state, writes the run directory, and `Trainer.fit` runs one
optimizer step at a time, reading top to bottom as the loop in `train/loop.py`'s docstring says:

    lr = set_lr(step)                               # the schedule: cosine or WSD, ending at run.max_steps
    loss, grad_norm = micro_steps(step)             # micro-steps -> clip (`loop.train_step`)
    guarded_update(state, loss, grad_norm)          # optimizer.step, skipped on the device if not finite
    signalled, out_of_time = sync(step, lr, ...)    # at sync points: losses to the host, deadline, log line
    evaluate_and_save(step, ...)                    # eval (and keep the best) -> save
    log.write(record)                               # metrics.jsonl, TensorBoard, W&B

The pieces (state, step, checkpoint save/restore, the budget) live in `loop.py`, `runstate.py`, `schedule.py`
and `budget.py`; this module only composes them. The run's stateful components each have `state_dict()` /
`load_state_dict()`: the schedule (`run.schedule`: lr, length, deadline plan), the data sampler, the RNG, the
loss scaler, model and optimizer; `loop.checkpoint_state` gathers a step checkpoint from them and `loop.restore`
gives each its part back.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch

from tinystories_cli import runs
from tinystories_cli.device import deterministic_on_cpu, dist_from_env
from tinystories_cli.optim import set_scheduled_lr
from tinystories_cli.run_readme import write_run_readme
from tinystories_cli.train.budget import Pace
from tinystories_cli.train.display import Display, Signals, print_header
from tinystories_cli.train.loop import (
    Feeder,
    MetricsLog,
    State,
    StepStats,
    Throughput,
    TrainResult,
    any_rank,
    build_state,
    check_nonfinite,
    evaluate_and_keep_best,
    first_step,
    fit_to_deadline,
    flops_per_token,
    guarded_update,
    is_sync_point,
    peak_tflops,
    plan_time_budget,
    record_time_used,
    run_summary,
    save_step,
    train_step,
    write_run_dir,
)
from tinystories_cli.train.prepare import Run

OnStep = Callable[[int, dict], None]


def train(run: Run, on_step: OnStep | None = None) -> TrainResult:
    """Train `run` from its start (or checkpoint) to `run.end_step`; returns losses and where it stopped.

    `on_step(step, record)` is called after every step (tests use it to inject faults).
    """
    main = dist_from_env().is_main
    with runs.RunLock(run.run_dir) if main else contextlib.nullcontext(), deterministic_on_cpu(run.train_cfg.device):
        return _train_owned(run, on_step)


def _train_owned(run: Run, on_step: OnStep | None) -> TrainResult:
    """`train` while this process owns the run directory (rank 0) or rank 0 does (other ranks)."""
    started = time.perf_counter()
    if run.options.time_budget is not None and run.time_plan is None:
        plan_time_budget(run)
    state = build_state(run)
    summary = run_summary(run, state)
    main = state.dist.is_main
    if main:
        write_run_dir(run, state, summary)
    display = Display(run.options.display, state.start_step, run.end_step, enabled=main)
    peak, peak_note = peak_tflops(run, state.device)
    if main:
        print_header(display, run, summary, peak_note, state.start_step, run.notes + state.notes)
    log = MetricsLog(run, summary, state.start_step, warn=display.warn) if main else None
    try:
        result = fit(run, state, display, log, peak, on_step)
    finally:
        display.close()
        if log is not None:
            log.close()
    if main and run.time_plan is not None:
        record_time_used(run, time.perf_counter() - started, result)
    if main:
        write_run_readme(run.run_dir)  # the run directory describes itself (what, on what, results, how to use it)
    if state.dist.enabled:
        torch.distributed.barrier()
    return result


def fit(run: Run, state: State, display: Display, log: MetricsLog | None, peak: float,
        on_step: OnStep | None = None) -> TrainResult:
    """Steps `state.start_step + 1 .. run.end_step` (`Trainer.fit`)."""
    return Trainer(run, state, display, log, peak, on_step).fit()


class Trainer:
    """One training run's loop over a built `State`: lr -> micro-steps -> clip -> step -> eval/save -> log.

    Nothing is read back to the host between sync points (log, eval and save steps, the first and the
    last step): losses and gradient norms stay on the device until then (`StepStats`), and a bad step
    is skipped on the device (`guarded_update`)."""

    def __init__(self, run: Run, state: State, display: Display, log: MetricsLog | None, peak: float,
                 on_step: OnStep | None = None):
        self.run, self.state, self.display, self.log, self.on_step = run, state, display, log, on_step
        self.tc = run.train_cfg  # the settings of every step (a replan changes only the length)
        self.result = TrainResult(run.run_dir, state.start_step, run.max_steps, best_val_loss=state.best_val)
        self.meter = Throughput(state.start_step, run.end_step, flops_per_token(run.model_cfg), peak)
        self.stats = StepStats()
        self.feeder = Feeder(state.sampler, state.device, self.tc.grad_accum_steps)
        self.pace = Pace()
        self.signals = Signals()

    def fit(self) -> TrainResult:
        run, state = self.run, self.state
        state.model.train()
        if state.dist.is_main:  # a resumed run's RNG streams: last thing before the loop, nothing else may draw
            state.rng.apply()
        step = state.start_step
        with self.signals:
            while step < run.end_step:  # `fit_to_deadline` may move run.end_step
                step += 1
                lr = self.set_lr(step)
                loss, grad_norm = self.micro_steps(step)
                guarded_update(state, loss, grad_norm)
                self.stats.add(step, loss, grad_norm)
                record = self.meter.record(step, state, state.elapsed_before)
                self.result.step = step
                signalled, out_of_time = self.sync(step, lr, record)
                self.evaluate_and_save(step, record, stop=signalled or out_of_time)
                if self.log is not None:
                    self.log.write(record)
                if self.on_step is not None:
                    self.on_step(step, record)
                if self.stopped(step, signalled, out_of_time):
                    break
                self.pace.stepped(step == state.start_step + 1)
        return self.finish()

    def set_lr(self, step: int) -> float:
        """The scheduled learning rate of `step`, set on every parameter group (`optim.set_scheduled_lr`)."""
        lr = self.run.schedule.lr(step)  # the Schedule owns the run's length
        set_scheduled_lr(self.state.optimizer, lr, self.tc.lr)  # Muon's groups follow with their own peak
        return lr

    def micro_steps(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's micro-batches -> mean loss and gradient norm (the first step may fall back from compile)."""
        batches = self.feeder.take()
        if step == self.state.start_step + 1:
            out = first_step(self.state, batches, self.display)
        else:
            out = train_step(self.state, batches)
        self.feeder.prefetch()  # the next step's batches are read while this one runs on the device
        return out

    def sync(self, step: int, lr: float, record: dict) -> tuple[bool, bool]:
        """At a sync point (or on a stop request): losses to the host and the non-finite check, whether any
        rank was signalled or is past the deadline, the deadline replan, the log line. Returns
        (signalled, out of time)."""
        run, state, tc = self.run, self.state, self.tc
        stop_requested = self.signals.stop and not state.dist.enabled  # a CPU flag: no sync needed
        if not (is_sync_point(step, state.start_step, run.end_step, run.max_steps, tc) or stop_requested):
            return False, False
        losses, norm = self.stats.flush(state.dist)
        self.result.train_losses.update(losses)
        check_nonfinite(state, run.options, losses, self.stats, self.display)
        late = run.time_plan is not None and time.perf_counter() > run.time_plan.deadline
        signalled, out_of_time = any_rank(state, self.signals.stop, late)
        if run.time_plan is not None and not (signalled or out_of_time):
            fit_to_deadline(run, state, step, self.pace, self.meter, self.display)
        if step % tc.log_every == 0 or step == run.end_step or step == state.start_step + 1:
            record.update(train_loss=losses[step], lr=lr, grad_norm=norm, **self.meter.rates(step),
                          skipped_steps=state.skipped + state.scaler_skipped)
            if state.scaler is not None:
                record["loss_scale"] = state.scaler.scale.item()
            self.display.log(step, run.end_step, self.meter.line(losses[step], lr, norm, record))
        return signalled, out_of_time

    def evaluate_and_save(self, step: int, record: dict, stop: bool) -> None:
        """Evaluate (keeping the best weights) at eval steps and the schedule's end; save at save steps,
        on a stop and at the run's end."""
        run, tc = self.run, self.tc
        if step % tc.eval_every == 0 or step == run.max_steps:
            t_eval = time.perf_counter()
            evaluate_and_keep_best(run, self.state, step, record, self.result, self.display)
            self.pace.evaluated(time.perf_counter() - t_eval)
        if step % tc.save_every == 0 or stop or step == run.end_step:
            save_step(run, self.state, step, record["elapsed_s"], self.feeder)

    def stopped(self, step: int, signalled: bool, out_of_time: bool) -> bool:
        """Whether the run stops after `step`: its deadline passed before its end, or a signal came."""
        if out_of_time and not signalled and step < self.run.end_step:
            self.result.stopped = "time_budget"
            self.display.note(f"`time_budget` spent at step {step}: saved a checkpoint")
            return True
        if signalled:  # (a deadline that passes at the last step is just the end)
            name = self.signals.signame
            self.result.stopped, self.result.signal = "interrupted", name or "SIGINT"
            self.display.note(f"{name or 'signal'}: saved a checkpoint at step {step}; continue with "
                              f"`tslm train resume=True run_name={self.run.run_dir.name}`")
            return True
        return False

    def finish(self) -> TrainResult:
        run, result = self.run, self.result
        if result.stopped == "finished" and run.end_step < run.max_steps:
            result.stopped = "stop_at"
        result.max_steps = run.max_steps  # not the planned length when `fit_to_deadline` moved it
        result.best_val_loss = self.state.best_val
        result.elapsed_s, result.tokens_per_s = self.meter.totals(result.step, self.state.tokens_per_step)
        return result
