"""`--auto-size`: the model size and learning rate for a training budget, from a measured rule.

The budget is counted in REFERENCE TOKENS: the tokens the reference model (d_model 128, 4 layers,
batch 16 x 256) would train on in the budget. A time budget becomes reference tokens through a
short probe of that model (`tokens/s x seconds`); that is the only machine-dependent step, so the
rule itself was measured at fixed token budgets (examples/size_sweep.py) whatever the load was.
A budget given in the chosen model's own tokens (--train-tokens, --max-steps) is converted with the
measured relative speed of each width (`Rule.speed`).

The rule (RULES, from the sweep recorded in tests/benchmarks/RESULTS.md): the widest model whose
threshold the budget reaches, with its best learning rate:

    >>> [(r.d_model, f"{r.min_ref_tokens:.3g}", r.lr) for r in RULES]
    [(64, '0', 0.006), (128, '1.2e+06', 0.004), (192, '8.8e+06', 0.006)]
    >>> c = choose(ref_tokens=1.5e6)
    >>> c.shape, c.lr, c.batch_size, c.decay_fraction
    (Shape(d_model=128, num_layers=4, num_heads=4), 0.004, 8, 0.4)

A row may also carry its own batch (sequences of 256 tokens), warmup (at most a tenth of the steps) and
decay length; unless it does, they are batch 16, warmup 20 steps, and warmup-stable-decay to lr/10 over
the last 20% (`SCHEDULE`: it beat cosine at all three sweep points where both were run). The d_model 128
row takes batch 8 at lr 4e-3 and decays over the last 40% (better by 0.075 at 1.5M and 0.025 at 3.5M).
A row's `speed` is its tokens/s at its batch relative to the reference model's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from tinystories_cli.config import default_d_ff, load_config_file
from tinystories_cli.errors import UserError
from tinystories_cli.train.budget import probe_seconds
from tinystories_cli.train.loop import measure_throughput
from tinystories_cli.train.prepare import Run, TrainOptions, prepare_run

BASE_PRESET = "tinystories-cpu"   # everything the rule does not choose comes from this preset
REFERENCE_WIDTH = 128             # the model the probe times (4 layers, d_model 128)
BATCH_SIZE = 16
CONTEXT_LENGTH = 256
TOKENS_PER_STEP = BATCH_SIZE * CONTEXT_LENGTH
WARMUP_STEPS = 20
HEAD_WIDTH = 32
# WSD (decay over the last 20%) beat cosine at all three sweep points where both ran, at equal tokens:
# d_model 128, lr 6e-3, 3.5M reference tokens: 2.503 vs 2.543; 1.5M: 2.872 vs 2.923; d_model 64, lr 6e-3,
# 0.5M: 3.273 vs 3.389 held-out loss (one seed each; RESULTS.md, "Size for the budget").
SCHEDULE = "wsd"
DECAY_FRACTION = 0.2
MIN_LR_RATIO = 0.1
# Muon on the hidden matrices (AdamW keeps the row's lr for the embedding, head and norms). The sweep at the
# d_model-128 row, 1M tokens, seed 0 (tests/benchmarks/RESULTS.md, "Muon against AdamW"): Muon lr 0.01 2.957,
# 0.02 2.909, 0.04 3.071 against AdamW's 2.956 at the row's lr; so 0.02, untuned for the other rows.
OPTIMIZER = "muon"
MUON_LR = 0.02
# Muon's weight decay, swept at the same point (Muon lr 0.02, float32): 0 2.909 / 2.940 / 2.922 (seeds 0-2),
# 0.01 2.904 (seed 0), 0.1 2.862 / 2.887 / 2.865, 0.2 2.865 / 2.893 / 2.870: 0.1 beat 0 by 0.047-0.058 every seed.
MUON_WEIGHT_DECAY = 0.1


@dataclass(frozen=True)
class Shape:
    d_model: int
    num_layers: int
    num_heads: int

    def model_overrides(self) -> dict:
        return {"d_model": self.d_model, "num_layers": self.num_layers, "num_heads": self.num_heads,
                "d_ff": default_d_ff(self.d_model, "swiglu"), "context_length": CONTEXT_LENGTH}


def shape_for(d_model: int) -> Shape:
    """The sweep's shape of a width: heads of 32 dims, 4 layers (2 for the smallest width).

    >>> shape_for(128), shape_for(64).num_layers
    (Shape(d_model=128, num_layers=4, num_heads=4), 2)
    """
    return Shape(d_model, 2 if d_model <= 64 else 4, max(1, d_model // HEAD_WIDTH))


@dataclass(frozen=True)
class Rule:
    min_ref_tokens: float   # the smallest budget (reference tokens) at which this width wins
    d_model: int
    lr: float               # its best peak learning rate in the sweep
    speed: float            # its training tokens/s (at its batch) relative to the reference model (the sweep's probes)
    batch_size: int = BATCH_SIZE           # sequences of CONTEXT_LENGTH tokens per step
    warmup_steps: int = WARMUP_STEPS       # at most a tenth of the run's steps
    decay_fraction: float = DECAY_FRACTION  # the WSD decay's share of the steps


# From examples/size_sweep.py (every run in tests/benchmarks/RESULTS.md, "Size for the budget"), the
# widths at lr 6e-3 (their best of those tried): at 0.5M reference tokens d_model 64 (2 layers) beat 128,
# 3.389 vs 3.596; at 1.5M d_model 128 beat 64, 2.923 vs 2.952; 192 and 256 (lr 3e-3) lost by 0.4-0.5 at
# both. Second sweep (WSD): at 3.5M d_model 128 beat 192, 2.503 vs 2.623 (and 6 layers 2.576, batch 32
# 2.582); at 8.5M 192 edged out 128, 2.282 vs 2.286. Each threshold is where the difference of the two
# widths crosses zero, interpolated in log budget: 1.3M (d128 - d64: +0.207, -0.029) and 8.3M (d192 -
# d128: +0.120, -0.004; one seed each, so above 8.3M the two are close, and 192 pulls ahead only as
# the budget grows). `speed`: the sweeps' probes (d64 34.3K, d128 14.2K tokens/s; d192 10.1K, d128
# 15.0K tokens/s; d128 at batch 8 15.4K against 15.0K at 16).
# Fourth sweep (d_model 128, WSD, two seeds at 3.5M): batch 8 at lr 4e-3 with the decay over the last 40%
# 2.479 / 2.461 against the old row's (batch 16, lr 6e-3, 20%) 2.503 / 2.488, and 2.797 against 2.872 at
# 1.5M (one seed). Tried and not better within the seed noise (~0.015): batch 4 at lr 3e-3 (2.463 / 2.487),
# lr 5e-3 with 100 warmup steps (2.466 / 2.476), 3 layers (2.460 / 2.465), a 60% decay (2.485, seed 0).
# The thresholds were measured with the old row's settings, and the d64 and d192 rows were not re-tuned.
# Fifth sweep (issue 27: Muon, bf16 autocast and compile auto, at equal wall-clock, `--seconds`, two seeds,
# both widths at the d128 row's settings): d192 - d128 +0.173 / +0.117 at 240 s and +0.023 / +0.006 at 600 s,
# where the reference model's probe ran 13.3K tokens/s (3.2M and 8.0M reference tokens). The mean difference
# crosses zero, interpolated in log budget, at 665 s = 8.8M: the d192 threshold moves there from 8.3M.
# The same for d64 (its row's settings: batch 16, lr 6e-3, 20% decay) against d128, with Muon (weight decay 0.1):
# d128 - d64 +0.083 / +0.124 at 60 s and -0.165 / -0.103 at 150 s, crossing at 89 s = 1.19M: 1.3M -> 1.2M.
# `speed` re-measured as runs now train (tests/benchmarks/autosize_speeds.py, medians of 3 rounds): bf16 autocast,
# each row at its batch with Muon against the eager reference probe (batch 16, AdamW); compiled for the rows whose
# budgets start above the ~90 s where a compile pays (d128 1.05 (0.87-1.11; eager 0.82), d192 0.67 (0.64-0.71;
# eager 0.59)), eager for d64 (3.12, the median of 6 rounds, 2.69-3.32). The speeds above were eager float32, AdamW.
RULES: tuple[Rule, ...] = (
    Rule(0.0, 64, 6e-3, 3.12),
    Rule(1.2e6, 128, 4e-3, 1.05, batch_size=8, decay_fraction=0.4),
    Rule(8.8e6, 192, 6e-3, 0.67),
)


@dataclass
class Choice:
    """What --auto-size picked, and why (recorded in config.json under "auto_size")."""

    shape: Shape
    lr: float
    ref_tokens: float         # the budget in reference tokens
    tokens: int               # the chosen model's own tokens in that budget
    why: str
    batch_size: int = BATCH_SIZE
    warmup_steps: int = WARMUP_STEPS
    decay_fraction: float = DECAY_FRACTION
    speed: float = 1.0        # the chosen model's tokens/s relative to the reference model (Rule.speed)

    def model_overrides(self) -> dict:
        return self.shape.model_overrides()

    def train_overrides(self, steps: int | None = None) -> dict:
        """lr, min_lr, batch, warmup, schedule and optimizer; with `steps`, max_steps too (the warmup is then capped
        at a tenth of them)."""
        out = {"lr": self.lr, "min_lr": self.lr * MIN_LR_RATIO, "batch_size": self.batch_size, "grad_accum_steps": 1,
               "warmup_steps": self.warmup_steps, "schedule": SCHEDULE, "decay_fraction": self.decay_fraction,
               "optimizer": OPTIMIZER, "muon_lr": MUON_LR, "muon_weight_decay": MUON_WEIGHT_DECAY}
        if steps is not None:
            out.update(max_steps=steps, warmup_steps=min(self.warmup_steps, max(1, steps // 10)))
        return out

    def record(self) -> dict:
        """The shape and the training settings chosen (`train_overrides` without the derived min_lr and
        grad_accum_steps), the budget and why."""
        train = {k: v for k, v in self.train_overrides().items() if k not in ("min_lr", "grad_accum_steps")}
        return {"d_model": self.shape.d_model, "num_layers": self.shape.num_layers, "num_heads": self.shape.num_heads,
                **train, "reference_tokens": round(self.ref_tokens), "tokens": self.tokens, "why": self.why}


def rule_for(ref_tokens: float) -> Rule:
    """The row of RULES for a budget of `ref_tokens` reference tokens.

    >>> rule_for(1e5).d_model, rule_for(1.2e6).d_model, rule_for(5e6).d_model, rule_for(1e9).d_model
    (64, 128, 128, 192)
    """
    if not (ref_tokens >= 0 and math.isfinite(ref_tokens)):
        raise ValueError(f"the token budget must be a finite number >= 0, got {ref_tokens}")
    return [r for r in RULES if r.min_ref_tokens <= ref_tokens][-1]


def choose(ref_tokens: float, source: str = "") -> Choice:
    """The choice for a budget of `ref_tokens` reference tokens; `source` says where the budget came from."""
    r = rule_for(ref_tokens)
    nxt = [x for x in RULES if x.min_ref_tokens > ref_tokens]
    bounds = ([f"at least the {r.min_ref_tokens / 1e6:g}M where d_model {r.d_model} wins"] if r.min_ref_tokens > 0
              else [])  # the smallest row has no lower bound ("at least the 0M" said nothing)
    bounds += [f"below the {nxt[0].min_ref_tokens / 1e6:g}M where d_model {nxt[0].d_model} wins"] if nxt else []
    why = (f"{source}{ref_tokens / 1e6:.2f}M reference tokens (d_model {REFERENCE_WIDTH} equivalent): "
           + (", ".join(bounds) or f"d_model {r.d_model} for every budget"))
    return _choice(r, ref_tokens, int(ref_tokens * r.speed), why)


def _choice(r: Rule, ref_tokens: float, tokens: int, why: str) -> Choice:
    return Choice(shape_for(r.d_model), r.lr, ref_tokens, tokens, why, r.batch_size, r.warmup_steps, r.decay_fraction,
                  r.speed)


def choose_for_seconds(seconds: float, reference_tokens_per_s: float) -> Choice:
    """A wall-clock budget at the probed speed of the reference model.

    >>> choose_for_seconds(240, 6_100).shape.d_model       # the issue's 4 minutes at 6.1K tokens/s: 1.46M
    128
    >>> choose_for_seconds(240, 3_000).shape.d_model       # a busier machine: 0.72M
    64
    """
    if not (seconds > 0 and reference_tokens_per_s > 0):
        raise UserError(f"cannot size a model for {seconds:g} s at {reference_tokens_per_s:g} tokens/s",
                        "give a positive time budget")
    return choose(seconds * reference_tokens_per_s,
                  f"{seconds / 60:.3g} min x {reference_tokens_per_s:,.0f} reference tokens/s = ")


def choose_for_tokens(tokens: float) -> Choice:
    """A budget in the chosen model's own tokens: the widest width whose threshold is reached once its
    tokens are converted to reference tokens (a slower model's token costs more time).

    >>> choose_for_tokens(1.64e6).shape.d_model, choose_for_tokens(1e6).shape.d_model
    (128, 64)
    """
    if not (tokens > 0 and math.isfinite(tokens)):
        raise ValueError(f"the token budget must be a positive finite number, got {tokens}")
    r = [r for r in RULES if tokens / r.speed >= r.min_ref_tokens][-1]
    return _own_tokens(r, int(tokens), f"{tokens / 1e6:.2f}M tokens of d_model {r.d_model} = ")


def choose_for_steps(steps: int, context_length: int = CONTEXT_LENGTH, batch_size: int | None = None) -> Choice:
    """A budget in optimizer steps: of `batch_size` sequences when given (a token budget), else of each
    width's own batch, the widest width whose threshold its steps reach (so a width that takes smaller
    batches needs more steps for the same budget).

    >>> [choose_for_steps(n).shape.d_model for n in (200, 700, 3000)]
    [64, 128, 192]
    """
    if steps <= 0:
        raise ValueError(f"the step budget must be positive, got {steps}")
    if batch_size is not None:
        return choose_for_tokens(float(steps * batch_size * context_length))
    r = [r for r in RULES if steps * r.batch_size * context_length / r.speed >= r.min_ref_tokens][-1]
    return _own_tokens(r, steps * r.batch_size * context_length,
                       f"{steps} steps of d_model {r.d_model} x {r.batch_size} sequences = ")


def _own_tokens(r: Rule, tokens: int, source: str) -> Choice:
    """Row `r`'s choice for `tokens` of its own (the budget in reference tokens at its speed)."""
    c = choose(tokens / r.speed, source)
    return _choice(r, c.ref_tokens, tokens, c.why)


def rule_table() -> list[tuple[str, str, str, str, str]]:
    """(budget range, shape, lr, batch/warmup/decay, relative speed) rows of RULES, as the README shows them."""
    rows = []
    for i, r in enumerate(RULES):
        hi = RULES[i + 1].min_ref_tokens if i + 1 < len(RULES) else None
        span = f"{r.min_ref_tokens / 1e6:g}M - {hi / 1e6:g}M" if hi else f">= {r.min_ref_tokens / 1e6:g}M"
        s = shape_for(r.d_model)
        rows.append((span, f"d_model {s.d_model}, {s.num_layers} layers, {s.num_heads} heads", f"{r.lr:g}",
                     f"{r.batch_size}, {r.warmup_steps}, {r.decay_fraction:.0%}", f"{r.speed:.2f}"))
    return rows


# ----------------------------------------------------------------------------------------------
# A run sized by the rule (`tslm train --auto-size`)
# ----------------------------------------------------------------------------------------------


def probe_reference(preset: str, train_over: dict, opts: TrainOptions, seconds: float) -> tuple[float, float]:
    """(tokens/s, seconds spent) of the reference model on this machine, on the run's data."""
    keep = {k: train_over[k] for k in ("dataset", "device", "dtype", "compile") if train_over.get(k) is not None}
    probe_opts = replace(opts, force=True, resume=None, time_budget=None, stop_at=None, fit_memory=None)
    run = prepare_run(preset, None, shape_for(REFERENCE_WIDTH).model_overrides(),
                      {**keep, "batch_size": BATCH_SIZE, "grad_accum_steps": 1, "max_steps": 100, "warmup_steps": 1},
                      probe_opts)
    return measure_throughput(run, seconds, max_steps=30)


def prepare_auto_run(preset: str | None, config_file: str | Path | None, model_overrides: dict | None,
                     train_overrides: dict | None, options: TrainOptions,
                     notify: Callable[[str], None] | None = None) -> Run:
    """`prepare_run` with the size, learning rate, batch and warmup chosen by the rule for the budget
    (options.time_budget, else train_tokens, else max_steps, as given); settings given explicitly (flags
    or the config file) win over the choice. The choice is in `run.auto_size` and `run.notes`."""
    if options.resume is not None or options.init_from is not None:
        raise UserError("auto-size picks the model when a run starts from scratch",
                        "drop `auto_size` when resuming or fine-tuning")
    preset = preset or BASE_PRESET
    file_data = load_config_file(config_file) if config_file else {}
    given_model = {k: v for d in (file_data.get("model"), model_overrides) for k, v in (d or {}).items()
                   if v is not None}
    given_train = {k: v for d in (file_data.get("train"), train_overrides) for k, v in (d or {}).items()
                   if v is not None}
    if options.time_budget is not None:
        budget = options.time_budget
        probe_s = probe_seconds(budget, 0.03, 20.0)
        if notify:
            notify(f"auto-size: timing the reference model (d_model {REFERENCE_WIDTH}) for {probe_s:.0f} s")
        tps, spent = probe_reference(preset, given_train, options, probe_s)
        if budget - spent <= 0:
            raise UserError(f"the time budget ({budget:g} s) was spent by the probe", "give a longer time budget")
        choice = choose_for_seconds(budget - spent, tps)
        options = replace(options, time_budget=budget - spent)
    elif given_train.get("train_tokens") is not None:
        choice = choose_for_tokens(float(given_train["train_tokens"]))
    elif given_train.get("max_steps") is not None:
        choice = choose_for_steps(int(given_train["max_steps"]) * given_train.get("grad_accum_steps", 1),
                                  given_model.get("context_length", CONTEXT_LENGTH), given_train.get("batch_size"))
    else:
        raise UserError("auto-size needs a budget to size the model for",
                        "pass `time_budget`, `train_tokens` or `max_steps`")
    steps = None if options.time_budget is not None else math.ceil(choice.tokens / (choice.batch_size * CONTEXT_LENGTH))
    chosen_model, chosen_train = sized_overrides(choice, given_model, given_train, steps)
    run = prepare_run(preset, config_file, {**chosen_model, **(model_overrides or {})},
                      {**chosen_train, **(train_overrides or {})}, options)
    kept = sorted(k for k in (*choice.model_overrides(), *choice.train_overrides(steps))
                  if k in given_model or k in given_train)
    mc, tc = run.model_cfg, run.train_cfg
    run.auto_size = {**record_of(choice, run), **({"explicit": kept} if kept else {})}
    run.notes.append(f"`auto_size`: d_model {mc.d_model}, {mc.num_layers} layers, {mc.num_heads} heads, lr {tc.lr:g}, "
                     f"batch {tc.batch_size}, warmup {tc.warmup_steps}, {tc.schedule} schedule"
                     + (f" (decay over the last {tc.decay_fraction:.0%})" if tc.schedule == "wsd" else "")
                     + f"; {choice.why}"
                     + (f" (given explicitly: {', '.join(kept)})" if kept else ""))
    return run


def sized_overrides(choice: Choice, given_model: dict, given_train: dict, steps: int | None = None
                    ) -> tuple[dict, dict]:
    """(model, train) overrides of `choice` for what was not given explicitly (`steps`: the run's length,
    when the budget is not a time). A width given explicitly keeps the rule's proportions, not its numbers."""
    chosen_model = {k: v for k, v in choice.model_overrides().items() if k not in given_model}
    if "d_model" in given_model:
        d = int(given_model["d_model"])
        if "d_ff" in chosen_model:
            chosen_model["d_ff"] = default_d_ff(d, str(given_model.get("ffn", "swiglu")))
        if "num_heads" in chosen_model:
            chosen_model["num_heads"] = shape_for(d).num_heads if d % shape_for(d).num_heads == 0 else 1
    chosen_train = {k: v for k, v in choice.train_overrides(steps).items()
                    if k not in given_train and not (k == "max_steps" and "train_tokens" in given_train)}
    return chosen_model, chosen_train


def record_of(choice: Choice, run: Run) -> dict:
    """config.json's "auto_size": what the rule chose and why, with the values the run actually has."""
    mc, tc = run.model_cfg, run.train_cfg
    actual = {"d_model": mc.d_model, "num_layers": mc.num_layers, "num_heads": mc.num_heads, "lr": tc.lr,
              "batch_size": tc.batch_size, "warmup_steps": tc.warmup_steps, "schedule": tc.schedule,
              "decay_fraction": tc.decay_fraction, "optimizer": tc.optimizer, "muon_lr": tc.muon_lr}
    return {**choice.record(), **actual}
