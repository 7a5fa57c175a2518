"""The budget planner: wall-clock seconds <-> training steps, in one place.

Every run with a deadline (`tslm train --time-budget`, `--auto-size` with a time budget, quickstart's
`--minutes`) is planned from the same pieces:

    probe_seconds(budget)        how long to time real steps before planning (`loop.measure_throughput`)
    tokens_per_step(...)         batch x accumulation x processes x context
    eval_cost_in_steps(tc)       an evaluation, in training steps (forward-only: FORWARD_COST of a step's work)
    steps_in_budget(...)         the steps that fill what the probe left of the budget (`--time-budget`)
    plan_bounded_run(...)        the same for quickstart, capped at MAX_EPOCHS passes over its data
    TimePlan                     what was planned; the loop keeps to its deadline, config.json records it
    Pace + replanned_length(...) while training: shorten (or lengthen a flat WSD schedule) to the deadline

Nothing here trains or reads files; the loop asks it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# A token evaluated (forward only) costs about a third of a token trained (forward + backward = 3 forwards).
FORWARD_COST_DIVISOR = 3
START_SHARE = 0.03      # of a --time-budget, kept for start-up, checkpoints and the last evaluation
MIN_PROBE_S = 2.0       # building the model, a warm-up step and one timed step take about this on a CPU


def probe_seconds(budget_s: float, share: float, most: float) -> float:
    """How long a probe of `share` of the budget runs: at least MIN_PROBE_S, at most `most` seconds.

    >>> probe_seconds(600, 0.02, 60.0), probe_seconds(30, 0.02, 60.0), probe_seconds(3600, 0.05, 20.0)
    (12.0, 2.0, 20.0)
    """
    return min(most, max(MIN_PROBE_S, share * budget_s))


def tokens_per_step(batch_size: int, grad_accum_steps: int, world_size: int, context_length: int) -> int:
    """Training tokens in one optimizer step (all processes together).

    >>> tokens_per_step(4, 2, 3, 16)
    384
    """
    return batch_size * grad_accum_steps * world_size * context_length


def eval_cost_in_steps(tc) -> float:
    """One evaluation in training steps: eval_batches forward-only batches, each a third of the work of
    one of a step's grad_accum_steps micro-batches (an estimate, for planning)."""
    return tc.eval_batches / (FORWARD_COST_DIVISOR * tc.grad_accum_steps)


def steps_in_budget(budget_s: float, spent_s: float, tokens_per_s: float, step_tokens: int, eval_share: float) -> int:
    """Steps that fill a `--time-budget` after the probe (`spent_s`), START_SHARE kept for start-up, with
    `eval_share` (evaluation cost per step, in steps) on top of every step.

    >>> steps_in_budget(100.0, 2.0, 1000.0, 500, 0.0)
    190
    """
    usable = budget_s - spent_s - START_SHARE * budget_s
    return int(usable * tokens_per_s / step_tokens / (1 + eval_share))


@dataclass
class TimePlan:
    """What a run with a deadline planned (`Run.time_plan`): the loop keeps to `deadline` (a
    `time.perf_counter()` value, `replanned_length`), and config.json records the rest under "time_budget".
    `max_steps_cap`: the most steps a lengthened schedule may have (quickstart: its passes over the data)."""

    budget_s: float
    probe_s: float
    probe_tokens_per_s: float
    planned_steps: int
    deadline: float
    max_steps_cap: int | None = None
    replanned: list[dict] = field(default_factory=list)  # {"at_step", "from", "to"} for each change of length
    noted_steps: int | None = None  # the length last printed (small corrections are not printed)

    def record(self) -> dict:
        """config.json's "time_budget" (the keys runs have always written; the deadline is this process's)."""
        out = {"budget_s": self.budget_s, "probe_s": self.probe_s, "probe_tokens_per_s": self.probe_tokens_per_s,
               "planned_steps": self.planned_steps}
        if self.max_steps_cap is not None:
            out["max_steps_cap"] = self.max_steps_cap
        if self.replanned:
            out["replanned"] = list(self.replanned)
        return out


def time_plan(budget_s: float, deadline: float, probe_s: float, tokens_per_s: float, steps: int,
              max_steps_cap: int | None = None) -> TimePlan:
    """A `TimePlan` (probe figures rounded as config.json keeps them)."""
    return TimePlan(budget_s, round(probe_s, 2), round(tokens_per_s, 1), steps, deadline,
                    None if max_steps_cap is None else int(max_steps_cap))


# --------------------------------------------------------------------------------------------
# quickstart: a bounded run, capped at a number of passes over its data
# --------------------------------------------------------------------------------------------

# Never more passes than this over train.npy (a small text overfits eventually). Measured on the 1.34M
# training tokens of the 5 MB TinyStories file (RESULTS.md, issue 19): the held-out loss was still falling
# at the end of 25M-token runs, 12.6 passes for d_model 192 (2.323 at 9.4 passes -> 2.150) and 18.7 for 128,
# so a cap of 6 stopped a 30-minute run after ~13 minutes. 12 stays inside what was measured.
MAX_EPOCHS = 12.0
MIN_STEPS = 2
NUM_EVALS = 5                     # validation (and checkpoint) points in the run


@dataclass
class StepPlan:
    """How long the training run is, and why."""

    steps: int
    limited_by: str                   # "time" | "data" (MAX_EPOCHS) | "minimum"
    seconds: float                    # estimated wall-clock time of the run
    eval_every: int
    warmup_steps: int
    tokens_per_step: int = 0
    data_steps: int = 0               # the steps MAX_EPOCHS passes over the data take (a lengthened run's cap)


def plan_bounded_run(budget_s: float, tokens_per_s: float, tokens_per_step: int, train_tokens: int, eval_tokens: int,
                     *, max_epochs: float = MAX_EPOCHS, min_steps: int = MIN_STEPS, num_evals: int = NUM_EVALS,
                     overhead_s: float = 2.0, safety: float = 0.9) -> StepPlan:
    """Steps that fit in `budget_s` seconds at the measured throughput, capped at `max_epochs` passes.

    Time = steps x (tokens_per_step / tokens_per_s) + min(num_evals, steps) validation passes over
    `eval_tokens` (forward only: about a third of a training step per token) + `overhead_s`
    (start-up, checkpoints); `safety` leaves room for a noisy estimate.

    >>> plan_bounded_run(60, 10_000, 8192, 10**9, 0).steps          # (0.9 * 60 - 2) s / 0.8192 s per step
    63
    >>> plan_bounded_run(600, 10**6, 8192, 100_000, 0).limited_by   # 12 epochs of 100K tokens = 146 steps
    'data'
    """
    tps = max(tokens_per_s, 1e-9)
    step_s = tokens_per_step / tps
    eval_each = eval_tokens / tps / FORWARD_COST_DIVISOR
    usable = budget_s * safety - overhead_s
    if usable >= num_evals * (step_s + eval_each):
        by_time = int((usable - num_evals * eval_each) // step_s)
    else:  # fewer steps than evaluations: one evaluation per step
        by_time = int(max(usable, 0.0) // (step_s + eval_each))
    by_data = max(1, int(max_epochs * train_tokens // tokens_per_step))
    steps, why = (by_time, "time") if by_time <= by_data else (by_data, "data")
    if steps < min_steps:
        steps, why = min_steps, "minimum"
    eval_every = max(1, math.ceil(steps / num_evals))
    warmup = min(max(1, steps // 20), 100, steps)
    seconds = steps * step_s + min(num_evals, steps) * eval_each + overhead_s
    return StepPlan(steps, why, seconds, eval_every, warmup, data_steps=max(by_data, steps))


def eval_batches_for(budget_s: float, tokens_per_s: float, context_length: int, batch_size: int, max_batches: int,
                     *, num_evals: int = NUM_EVALS, share: float = 0.1) -> int:
    """Validation batches per evaluation so that all evaluations together take about `share` of the
    budget (at least 1 batch, at most the preset's `max_batches`). On a slow CPU the preset's 10
    batches would cost more than the training steps of a short run.

    >>> eval_batches_for(600, 1_000, 256, 32, 10)     # 60 s of evals at 1K tokens/s: 140 windows
    4
    >>> eval_batches_for(600, 100_000, 256, 32, 10)
    10
    """
    windows = share * budget_s * tokens_per_s * FORWARD_COST_DIVISOR / (num_evals * context_length)
    return max(1, min(max_batches, int(windows // batch_size)))


# --------------------------------------------------------------------------------------------
# While training: keep to the deadline
# --------------------------------------------------------------------------------------------

MIN_PACE_STEPS = 5      # steps timed before the pace is trusted ...
PACE_SHARE = 0.05       # ... and this share of the planned steps
REPLAN_SLACK = 0.02     # the schedule moves only when it would overrun, or leave unused, more than this share
LENGTHEN_MARGIN = 0.03  # a lengthened schedule is planned this share short of the deadline (a later slowdown)
REPLAN_NOTE_SHARE = 0.1  # a new schedule length is printed when it differs this much from the last one printed


class Pace:
    """Seconds per training step and per evaluation, measured as the run goes (for `replanned_length`).
    Counting starts after the first step (allocations, compiling)."""

    def __init__(self):
        self.t0: float | None = None
        self.steps = 0
        self.eval_s = 0.0
        self.evals = 0

    def stepped(self, first: bool) -> None:
        if first:
            self.t0, self.steps, self.eval_s, self.evals = time.perf_counter(), 0, 0.0, 0
        elif self.t0 is not None:
            self.steps += 1

    def evaluated(self, seconds: float) -> None:
        if self.t0 is not None:
            self.eval_s += seconds
            self.evals += 1

    def seconds_per_step(self, now: float, planned_steps: int) -> float | None:
        """Training seconds per step so far (evaluations excluded); None until PACE_SHARE of the
        planned steps (at least MIN_PACE_STEPS) are timed: the first steps run slower than the rest."""
        if self.t0 is None or self.steps < max(MIN_PACE_STEPS, PACE_SHARE * planned_steps):
            return None
        return max(now - self.t0 - self.eval_s, 1e-9) / self.steps


def steps_that_fit(seconds: float, step_s: float, eval_s: float, eval_every: int) -> int:
    """Training steps that fit in `seconds` with an evaluation every `eval_every` steps and one at the end.

    >>> steps_that_fit(100.0, 1.0, 5.0, 10)     # 60 steps + 6 evaluations + the last one: 95 s
    63
    >>> steps_that_fit(3.0, 1.0, 5.0, 10)
    0
    """
    return max(0, int((seconds - eval_s) / (step_s + eval_s / eval_every)))


def replanned_length(plan: TimePlan, pace: Pace, now: float, step: int, max_steps: int, tc,
                     may_lengthen: bool) -> int:
    """The schedule length that ends the run by `plan.deadline` at the pace measured so far: shorter when
    the steps turned slower (never before the warmup's end, nor before the next step); longer, up to
    `plan.max_steps_cap`, only when `may_lengthen` (a WSD schedule still flat); `max_steps` when neither
    moves it by more than REPLAN_SLACK, or the pace is not known yet."""
    step_s = pace.seconds_per_step(now, plan.planned_steps)
    if step_s is None:
        return max_steps
    eval_s = pace.eval_s / pace.evals if pace.evals else step_s * eval_cost_in_steps(tc)
    finish_s = 1.0 + 0.01 * plan.budget_s  # the last save and the run's README
    fits = step + steps_that_fit(plan.deadline - now - finish_s, step_s, eval_s, tc.eval_every)
    if fits < max_steps * (1 - REPLAN_SLACK):
        return max(fits, step + 1, min(tc.warmup_steps + 1, max_steps))
    if may_lengthen:
        longer = int(step + (fits - step) * (1 - LENGTHEN_MARGIN))
        longer = longer if plan.max_steps_cap is None else min(longer, plan.max_steps_cap)
        if longer > max_steps * (1 + REPLAN_SLACK):
            return longer
    return max_steps


def replan_is_material(noted: int, target: int, share: float = REPLAN_NOTE_SHARE) -> bool:
    """Whether a schedule now ending at `target` differs enough from the `noted` length (the one last
    printed) to print it again.

    >>> replan_is_material(100, 97), replan_is_material(100, 90), replan_is_material(100, 112)
    (False, True, True)
    """
    return abs(target - noted) >= share * max(noted, 1)


# What the compile decision (`device.choose_compile`) needs to know: how long the training ahead will take.
OPTIMISTIC_TFLOPS = 4.0  # faster than any CPU this tool trains on (the 2-core dev VM measures 0.17 fp32)
EXPECTED_MFU = 0.3  # of the measured matmul peak: the quickstart-size model trained at ~0.37 of bf16's (12-06)


def expected_seconds(deadline: float | None, flops: float, measure_peak_tflops: Callable[[], float]) -> float:
    """The expected wall-clock of the training ahead: until `deadline` (a `time.perf_counter()` value) when
    the run has one; else its `flops` at `EXPECTED_MFU` of the measured matmul peak. The peak is measured
    only when even `OPTIMISTIC_TFLOPS` would take a second, so a test-sized run never measures.

    >>> expected_seconds(None, 1e12, lambda: 1 / 0)  # a quarter second even at 4 TFLOP/s: not measured
    0.25
    >>> expected_seconds(None, 6e14, lambda: 0.2)    # 600 TFLOP at 0.1 TFLOP/s
    6000.0
    """
    if deadline is not None:
        return max(0.0, deadline - time.perf_counter())
    optimistic = flops / (OPTIMISTIC_TFLOPS * 1e12)
    if optimistic < 1.0:
        return optimistic
    return flops / (measure_peak_tflops() * 1e12 * EXPECTED_MFU)
