"""Preparing a run: resolve the configs, find and check the tokenizer and token files, pick the run directory.

    run = prepare_run("debug", options=TrainOptions(run_name="smoke"))   # everything checked, nothing written

Every bad input is refused here, before a process group starts or a file is written.

Fine-tuning (`TrainOptions.init_from`: a run, a checkpoint file or a Hugging Face directory, see
`resolve_init_source`): the model config and weights come from the source, the optimizer and schedule
start fresh. Model settings that contradict the source are refused (dropout and a shorter context may
change); the tokenizer is the source's; train settings default to the source run's (else the preset's
or the defaults), with two schedule defaults made for short runs: warmup at most a tenth of the steps,
and the final learning rate keeps the source's lr/min_lr ratio.
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import InitVar, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from tinystories_cli import paths, runs
from tinystories_cli.account import check_fits_in_memory, parse_memory, training_memory
from tinystories_cli.checkpoint import read_checkpoint
from tinystories_cli.config import (
    ModelConfig,
    Preset,
    TrainConfig,
    build_config,
    get_preset,
    load_config_file,
    option,
    resolve_configs,
    results_neutral,
)
from tinystories_cli.console import human_bytes
from tinystories_cli.device import dist_from_env
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import atomic_write_text, check_source_outside, sha256_file
from tinystories_cli.interop.hf import is_hf_dir, plan_hf_model, read_hf_model, tokenizer_from_hf, write_tokenizer
from tinystories_cli.tokens import check_tokens, open_tokens
from tinystories_cli.train.budget import TimePlan, tokens_per_step
from tinystories_cli.train.loggers import check_available as check_loggers_available
from tinystories_cli.train.runstate import RunState, SamplerState  # noqa: F401  (SamplerState: its old home)
from tinystories_cli.train.schedule import Schedule
from tinystories_cli.trained import load_weights


@dataclass
class TrainOptions:
    """Run-level choices that are not hyperparameters (they never change what a step computes).

    Each is declared once here: its description is the `--help` of the `tslm train` option generated from
    it (`config.option`, `cli.common.config_options`)."""

    run_name: str | None = option(None, "Run directory name under runs/ (default: preset-timestamp).")
    run_dir: Path | None = option(None,
                                  "Run directory anywhere (instead of runs/<--run-name>); runs/latest is not moved.")
    # None, "auto", or a run name / run dir / checkpoint file (`tslm train --resume [auto|RUN]`)
    resume: str | None = option(None, "Continue a run.", cli=False)
    force: bool = option(False, "Start over in a run directory that already holds a run.")
    stop_at: int | None = option(None, "End at this step (with a checkpoint) without changing the schedule.")
    skip_nonfinite: int = option(0, "Skip up to N steps with a NaN/inf loss or gradient instead of stopping.")
    peak_tflops: float | None = option(None, "Hardware peak TFLOP/s for MFU (default: a measured matmul).")
    train_file: Path | None = option(None, "Train token file (default data/<dataset>/train.npy).",
                                     flags=("--train-data",))
    valid_file: Path | None = option(None, "Validation token file (default data/<dataset>/valid.npy).",
                                     flags=("--valid-data",))
    tokenizer_dir: Path | None = option(None, "Tokenizer directory (default data/<dataset>/tokenizer).",
                                        flags=("--tokenizer",))
    # auto (rich on a terminal, else plain lines) | rich | plain | quiet (`tslm train --plain`, `--quiet`)
    display: str = option("auto", "How progress is shown.", cli=False)
    # bytes per device: pick micro-batch and accumulation to fit (`fit_to_memory`)
    fit_memory: int | None = option(
        None, "Device memory, e.g. 24GB: pick the micro-batch and accumulation that keep the global batch "
        "(--batch-size x --grad-accum x processes) within it, from `tslm account`'s estimate with a 10% margin.",
        cli_type=str, parse=parse_memory)
    # seconds of wall-clock: plan max_steps from a probe (`loop.plan_time_budget`)
    time_budget: float | None = option(
        None, "Wall-clock budget, e.g. 90m or 1.5h: a short probe of real steps sets --max-steps so the schedule "
        "ends on time; if steps get slower, the schedule is shortened to still end by the deadline (if faster, a "
        "wsd schedule still flat is lengthened).", cli_type=str, parse=lambda text: parse_duration(text))
    init_from: str | None = option(None, "Fine-tune: model config, weights and tokenizer from a run, a checkpoint or "
                                   "a Hugging Face directory; fresh optimizer and schedule.")


@dataclass
class InitSource:
    """Where a fine-tuning run takes its model config, weights and tokenizer from."""

    spec: str                 # as given
    path: Path                # the run directory, checkpoint file or Hugging Face directory
    kind: str                 # "run" | "checkpoint" | "huggingface"
    weights: list[Path]       # the file(s) the weights are read from
    sha256: list[str]
    model_cfg: ModelConfig
    tokenizer_dir: Path       # a tslm tokenizer directory, or the Hugging Face directory itself
    preset: str | None = None
    train: dict | None = None  # the source run's train config, when it has one

    def record(self) -> dict[str, Any]:
        """What config.json keeps under "init_from"."""
        return {"path": str(self.path.resolve()), "kind": self.kind,
                "weights": [{"file": str(f.resolve()), "sha256": h} for f, h in zip(self.weights, self.sha256)]}


@dataclass
class Run:
    """Everything `train` needs, resolved and checked (built by `prepare_run`).

    The run's length is its `schedule`'s (`train/schedule.py`, the one owner): `train_cfg`, `max_steps`,
    `end_step` and `time_plan` read it, and only the schedule's methods change them (a deadline may be
    attached, `run.time_plan = ...`, before training starts)."""

    preset: str
    model_cfg: ModelConfig
    train_cfg: InitVar[TrainConfig]
    options: TrainOptions
    run_dir: Path
    tokenizer_dir: Path
    train_file: Path
    valid_file: Path
    resume_from: Path | None
    max_steps: InitVar[int]
    end_step: InitVar[int]
    fresh: bool
    tokenizer_fingerprint: str | None = None
    init_from: InitSource | None = None
    notes: list[str] = field(default_factory=list)  # what was chosen for the user, printed in the header
    # a deadline (`time_budget`, quickstart): the budget, the probe, the steps
    time_plan: InitVar[TimePlan | None] = None
    auto_size: dict | None = None  # `auto_size`: what the rule chose and why (`autosize.prepare_auto_run`)
    schedule: Schedule = field(init=False)

    def __post_init__(self, train_cfg: TrainConfig, max_steps: int, end_step: int, time_plan: TimePlan | None):
        self.schedule = Schedule(train_cfg, max_steps, end_step, time_plan)


def _attach_plan(run: Run, plan: TimePlan | None) -> None:
    run.schedule.plan = plan


# (assigned after the class: a dataclass would take a property in its body for a field's default)
Run.train_cfg = property(lambda run: run.schedule.train_cfg, doc="The resolved train settings (the schedule's).")
Run.max_steps = property(lambda run: run.schedule.max_steps, doc="The step the lr schedule ends at.")
Run.end_step = property(lambda run: run.schedule.end_step, doc="The step the run stops at (`stop_at`, else max_steps).")
Run.time_plan = property(lambda run: run.schedule.plan, _attach_plan, doc="The deadline plan, if any.")


_NUMBER = r"(\d+(?:\.\d+)?)"
# A duration: a plain number of seconds, or hours, minutes and seconds in that order, each at most once.
_DURATION = re.compile(rf"^(?:{_NUMBER}|(?:{_NUMBER}h)?\s*(?:{_NUMBER}m)?\s*(?:{_NUMBER}s)?)$")
DURATION_HINT = "use e.g. 90m, 1.5h, 1h30m, 45s or 5400 (seconds): h, m, s in that order, each once"


def parse_duration(text: str) -> float:
    """Seconds in a duration such as 90m, 1.5h, 1h30m, 45s or 5400 (seconds).

    The grammar is strict: NUMBER (seconds), or [NUMBER h][NUMBER m][NUMBER s] with at least one part,
    units in that order and each at most once; NUMBER is digits with an optional fraction (1.5, not .5
    or 1.5.5). Anything else (1h30, 5m5m, 1.5.5h, 30s1m) is refused rather than read as something else.

    >>> parse_duration("90m"), parse_duration("1h30m"), parse_duration("1.5h"), parse_duration("5400")
    (5400.0, 5400.0, 5400.0, 5400.0)
    >>> parse_duration("1h30")
    Traceback (most recent call last):
    tinystories_cli.errors.UserError: cannot read duration '1h30' (use e.g. 90m, 1.5h, 1h30m, 45s or 5400 (seconds): h, m, s in that order, each once)
    """  # noqa: E501 (a doctest's expected one-line output)
    m = _DURATION.match(text.strip().lower()) if isinstance(text, str) else None
    if m is None or not any(m.groups()):
        raise UserError(f"cannot read duration {text!r}", DURATION_HINT)
    plain, h, mins, secs = (float(g) if g is not None else 0.0 for g in m.groups())
    seconds = plain + 3600 * h + 60 * mins + secs
    if not (seconds > 0 and math.isfinite(seconds)):
        raise UserError(f"duration {text!r} must be positive", DURATION_HINT)
    return seconds


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
    if opts.run_name is not None:
        runs.check_run_name(opts.run_name)
    file_data = load_config_file(config_file) if config_file else {}
    file_model = file_data.get("model") or {}
    src = resolve_sources(preset, config_file, file_data, model_overrides, train_overrides, opts)
    preset_name, model_cfg, train_cfg, init, named = src.preset, src.model_cfg, src.train_cfg, src.init, src.named
    run_dir, resume_from, tokenizer_dir = src.run_dir, src.resume_from, src.tokenizer_dir
    if resume_from is None:
        check_fresh_run_dir(run_dir, tokenizer_dir, init, opts)

    check_fits_in_memory(model_cfg, "this model")  # it is built in host memory first, whatever the device
    tokenizer = load_run_tokenizer(tokenizer_dir, train_cfg.dataset)
    if init is not None:
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise UserError(f"the tokenizer of {init.path} has {tokenizer.vocab_size} ids but its model only "
                            f"{model_cfg.vocab_size}", "the source directory is inconsistent")
    elif resume_from is None:
        explicit = any((d or {}).get("vocab_size") is not None for d in (file_model, model_overrides))
        if named is not None and not explicit:
            check_preset_tokenizer(named, tokenizer_dir, int(tokenizer.vocab_size))
        model_cfg = vocab_from_tokenizer(model_cfg, int(tokenizer.vocab_size), explicit)
    fingerprint = getattr(tokenizer, "fingerprint", None)
    train_file = Path(opts.train_file or paths.tokens_path(train_cfg.dataset, "train"))
    valid_file = Path(opts.valid_file or paths.tokens_path(train_cfg.dataset, "valid"))
    for f, split in ((train_file, "train"), (valid_file, "valid")):
        check_token_file_fits(f, split, train_cfg.dataset, fingerprint, model_cfg)

    notes = []
    if opts.fit_memory is not None:
        train_cfg, note = fit_to_memory(model_cfg, train_cfg, opts.fit_memory, dist_from_env().world_size)
        notes.append(note)
    if opts.time_budget is not None and resume_from is not None:
        raise UserError("`time_budget` plans the schedule when a run starts; a resumed run keeps its plan",
                        "drop `time_budget` when resuming")
    check_loggers_available(train_cfg.log)
    max_steps, end_step = schedule_length(model_cfg, train_cfg, opts)
    if train_cfg.max_steps != max_steps:
        train_cfg = train_cfg.model_copy(update={"max_steps": max_steps})
    return Run(preset_name, model_cfg, train_cfg, opts, run_dir, tokenizer_dir, train_file, valid_file,
               resume_from, max_steps, end_step, fresh=resume_from is None, tokenizer_fingerprint=fingerprint,
               notes=notes, init_from=init)


@dataclass
class Sources:
    """Where a run's configs, tokenizer and run directory come from (`resolve_sources`)."""

    preset: str
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    run_dir: Path
    resume_from: Path | None
    tokenizer_dir: Path
    init: InitSource | None = None  # fine-tuning, only when the run starts fresh
    named: Preset | None = None     # the preset of a fresh run (it may name its tokenizer)


def resolve_sources(preset: str | None, config_file: str | Path | None, file_data: dict,
                    model_overrides: dict[str, Any] | None, train_overrides: dict[str, Any] | None,
                    opts: TrainOptions) -> Sources:
    """The configs (preset < file < flags; the saved ones when resuming; the source's when fine-tuning),
    the tokenizer directory and the run directory."""
    file_model, file_train = file_data.get("model") or {}, file_data.get("train") or {}
    run_dir, resume_from = find_resume(opts)
    if resume_from is not None:
        saved = runs.read_run_config(run_dir)
        preset_name, model_cfg, train_cfg = resumed_configs(
            saved, run_dir, preset, {**file_model, **(model_overrides or {})}, file_train, train_overrides
        )
        check_resumable(resume_from, run_dir, saved)
        train_cfg = keep_started_dtype(train_cfg, saved)
        return Sources(preset_name, model_cfg, train_cfg, run_dir, resume_from, runs.tokenizer_dir_of(run_dir))
    if opts.init_from is not None:
        init = resolve_init_source(opts.init_from)
        preset_name, model_cfg, train_cfg = init_configs(init, preset, file_data, model_overrides, train_overrides,
                                                         opts)
        default_name = new_run_name(f"{init.path.resolve().name.removesuffix('.safetensors')}-finetune")
        run_dir = run_dir or opts.run_dir or runs.runs_root() / (opts.run_name or default_name)
        return Sources(preset_name, model_cfg, train_cfg, run_dir, None, init.tokenizer_dir, init=init)
    p, model_cfg, train_cfg = resolve_configs(preset, config_file, model_overrides, train_overrides)
    tokenizer_dir = preset_tokenizer_dir(p, train_cfg.dataset, opts.tokenizer_dir)
    run_dir = run_dir or opts.run_dir or runs.runs_root() / (opts.run_name or new_run_name(p.name))
    return Sources(p.name, model_cfg, train_cfg, run_dir, None, tokenizer_dir, named=p)


def check_fresh_run_dir(run_dir: Path, tokenizer_dir: Path, init: InitSource | None, opts: TrainOptions) -> None:
    """A fresh run's directory: none of its sources inside it, nothing foreign in it, and no run in it unless
    `force` (or `resume="auto"` on a run that never reached its first checkpoint: it starts over)."""
    check_sources_outside_run(run_dir, tokenizer_dir, init, opts)
    runs.check_no_foreign(run_dir)
    if (run_dir / runs.CONFIG_FILE).exists() or runs.step_checkpoints(run_dir):
        if not opts.force and opts.resume != "auto":
            raise UserError(f"{run_dir} already holds a run",
                            "pass `resume` to continue it, `force` to start it over, or choose another `run_name`")


def check_sources_outside_run(run_dir: Path, tokenizer_dir: Path, init: InitSource | None, opts: TrainOptions) -> None:
    """A fresh run clears `run_dir` (what an earlier run wrote there) before it copies its tokenizer and loads
    its weights: none of its sources may lie inside it (`fileio.check_source_outside`)."""
    sources = [(tokenizer_dir, "the tokenizer"), (opts.train_file, "the training tokens"),
               (opts.valid_file, "the validation tokens")]
    if init is not None:
        sources += ([(init.path, "the model to fine-tune from")]
                    + [(w, "the weights to fine-tune from") for w in init.weights])
    for src, what in sources:
        check_source_outside(src, [run_dir], what, "clear")


FIT_MARGIN = 0.10  # of the budget, kept free: allocator fragmentation, CUDA context, kernels' workspaces


def fit_to_memory(model_cfg: ModelConfig, train_cfg: TrainConfig, budget: int, world_size: int
                  ) -> tuple[TrainConfig, str]:
    """The largest micro-batch (dividing the per-process batch, batch_size x grad_accum_steps) whose estimated
    training memory (`account.training_memory` for this parallelism, dtype and activation checkpointing) stays
    under the budget less FIT_MARGIN; the accumulation makes up the rest, so the global batch is unchanged.
    Returns the updated config and a line saying what was chosen and why."""
    per_process = train_cfg.batch_size * train_cfg.grad_accum_steps
    setup = {"activation_checkpointing": train_cfg.activation_checkpointing, "world_size": world_size,
             "parallel": train_cfg.parallel if world_size > 1 else "ddp", "dtype": train_cfg.dtype}
    usable = int(budget * (1 - FIT_MARGIN))
    need = {b: training_memory(model_cfg, b, **setup)["total"]
            for b in range(per_process, 0, -1) if per_process % b == 0}
    fits = [b for b, n in need.items() if n <= usable]
    hb = human_bytes
    if not fits:
        raise UserError(
            f"even a micro-batch of 1 needs about {hb(need[1])}, more than "
            f"{hb(usable)} ({100 - 100 * FIT_MARGIN:.0f}% of the budget)",
            "use `parallel` fsdp on more GPUs, `activation_checkpointing`, a shorter `context_length`, or a "
            "smaller model (see `tslm account memory=True`)",
        )
    b = fits[0]
    accum = per_process // b
    bigger = [n for c, n in need.items() if c > b]
    why = f"; micro-batch {min(c for c in need if c > b)} would need {hb(min(bigger))}" if bigger else ""
    note = (f"`fit_memory` {hb(budget)}: micro-batch {b} x accumulation {accum} x {world_size} "
            f"process{'es' if world_size > 1 else ''} = global batch {per_process * world_size}; estimated "
            f"{hb(need[b])} per process, under {hb(usable)} (a {100 * FIT_MARGIN:.0f}% margin kept){why}")
    return train_cfg.model_copy(update={"batch_size": b, "grad_accum_steps": accum}), note


# Model settings that may differ from an --init-from source: they do not change the weights' meaning.
INIT_FREE = {"dropout", "attention_backend", "init"}


def resolve_init_source(spec: str) -> InitSource:
    """A run (its best checkpoint, else its latest), a checkpoint file, or a Hugging Face directory; every
    check that needs no tensor data runs here (a Hugging Face directory's config and tensor shapes)."""
    path = runs.resolve_run(spec)
    if path.is_dir() and is_hf_dir(path):
        plan = plan_hf_model(path)
        files = sorted(set(plan.files.values()))
        return InitSource(spec, path, "huggingface", files, [sha256_file(f) for f in files], plan.cfg, path)
    if path.is_dir() and not (path / runs.CONFIG_FILE).is_file():
        raise UserError(f"{path} is neither a tslm run, a checkpoint nor a Hugging Face model directory",
                        "pass a run name or directory, a .safetensors checkpoint, or a directory with config.json "
                        "and model.safetensors")
    run_dir = runs.run_dir_of(path)
    holder = runs.lock_holder(run_dir)
    if (path.is_dir() and holder is not None and runs.best_checkpoint(path) is None
            and runs.latest_checkpoint(path) is None):
        raise UserError(f"{path} is still being trained by {holder} and has no checkpoint yet",
                        "wait for its first checkpoint (or for the run to finish), then start the fine-tuning")
    weights = runs.checkpoint_for(path)
    cfg = runs.model_config_of(read_checkpoint(weights), run_dir)
    try:
        saved = runs.read_run_config(run_dir)
    except UserError:
        saved = {}
    train = saved.get("train") if isinstance(saved.get("train"), dict) else None
    return InitSource(spec, path, "checkpoint" if path.is_file() else "run", [weights], [sha256_file(weights)], cfg,
                      runs.tokenizer_dir_of(run_dir), preset=saved.get("preset"), train=train)


def init_configs(init: InitSource, preset: str | None, file_data: dict, model_overrides: dict | None,
                 train_overrides: dict | None, opts: TrainOptions) -> tuple[str, ModelConfig, TrainConfig]:
    """(preset name, model config, train config) of a run fine-tuned from `init` (see the module docstring)."""
    if opts.tokenizer_dir is not None:
        raise UserError("`tokenizer_dir` cannot be combined with `init_from`: the tokenizer comes from the source",
                        f"drop `tokenizer_dir`; encode your text with the source's tokenizer ({init.tokenizer_dir})")
    src = init.model_cfg
    given = {k: v for d in (file_data.get("model"), model_overrides) for k, v in (d or {}).items() if v is not None}
    bad = [f"{k}={v} (source: {getattr(src, k)})" for k, v in given.items()
           if k in ModelConfig.model_fields and k not in INIT_FREE | {"context_length"} and getattr(src, k) != v]
    if bad:
        raise UserError(f"model settings contradict `init_from` {init.spec}: {', '.join(bad)}",
                        "drop them: the architecture comes from the source")
    ctx = given.get("context_length", src.context_length)
    if ctx > src.context_length:
        raise UserError(f"context length {ctx} exceeds the {src.context_length} of `init_from` {init.spec}",
                        f"use `context_length` {src.context_length} or less")
    model_cfg = build_config(ModelConfig, src, {k: v for k, v in given.items() if k in INIT_FREE | {"context_length"}},
                             where="model config")
    preset_train = get_preset(preset).train if preset else None
    base = preset_train or (TrainConfig.model_validate(init.train) if init.train else TrainConfig())
    train_given = {**(file_data.get("train") or {}),
                   **{k: v for k, v in (train_overrides or {}).items() if v is not None}}
    schedule: dict[str, Any] = {}
    lr = train_given.get("lr", base.lr)
    if "min_lr" not in train_given:
        schedule["min_lr"] = lr * base.min_lr / base.lr  # the source's decay ratio at the new peak
    if "warmup_steps" not in train_given:
        ms = train_given.get("max_steps", base.max_steps)
        schedule["warmup_steps"] = min(base.warmup_steps, ms // 10)
    train_cfg = build_config(TrainConfig, base, schedule, train_given, where="train config")
    name = preset or init.preset or ("imported" if init.kind == "huggingface" else "finetune")
    return name, model_cfg, train_cfg


def load_init_weights(model, init: InitSource) -> None:
    """Copy the source's weights into a freshly built `model` (its config is the source's)."""
    if init.kind == "huggingface":
        sd = read_hf_model(init.path).state_dict
    else:
        sd = read_checkpoint(init.weights[0]).model_state_dict()
    load_weights(model, sd, str(init.path))


def find_resume(opts: TrainOptions) -> tuple[Path | None, Path | None]:
    """(run directory, checkpoint to resume from) as far as `opts.resume` decides them; None when not resuming."""
    if opts.resume is None:
        return None, None
    root = runs.runs_root()
    if opts.resume == "auto":
        named = opts.run_dir or (root / opts.run_name if opts.run_name else None)
        candidate = named or root / runs.LATEST_LINK
        resume_from = runs.latest_checkpoint(candidate.resolve()) if candidate.exists() else None
        if resume_from is not None or named is not None:
            # runs/latest without a checkpoint is not reused: a fresh run gets its own name
            return (candidate.resolve() if candidate.exists() else candidate), resume_from
        return None, None
    target = runs.resolve_run(opts.resume)
    run_dir = runs.run_dir_of(target)
    resume_from = target if target.is_file() else runs.latest_checkpoint(run_dir)
    if resume_from is None:
        raise UserError(f"run {run_dir} has no checkpoint to resume from",
                        "start it again with `force`, or use `resume` auto")
    return run_dir, resume_from


def resumed_configs(saved: dict, run_dir: Path, preset: str | None, given_model: dict, file_train: dict,
                    train_overrides: dict | None) -> tuple[str, ModelConfig, TrainConfig]:
    """The saved run's configs, with the given train settings applied where they may change on resume."""
    name = saved.get("preset")
    if preset and preset != name:
        raise UserError(f"`preset` {preset} differs from the preset of the run being resumed ({name})",
                        "drop `preset` when resuming, or use a new `run_name`")
    model_cfg = ModelConfig.model_validate(saved["model"])
    changed = [k for k, v in given_model.items() if v is not None and getattr(model_cfg, k, None) != v]
    if changed:
        raise UserError(f"model settings {changed} differ from the run being resumed ({run_dir})",
                        "drop them, or start a new run with another `run_name`")
    saved_train = TrainConfig.model_validate(saved["train"])
    train_cfg = build_config(TrainConfig, saved_train, file_train, train_overrides, where="train config")
    check_global_batch(saved, saved_train, train_cfg)
    neutral = results_neutral(TrainConfig) | {"batch_size", "grad_accum_steps"}  # the global batch is what counts
    changed = [k for k in TrainConfig.model_fields
               if getattr(saved_train, k) != getattr(train_cfg, k) and k not in neutral]
    if changed:
        raise UserError(f"train settings {changed} differ from the run being resumed ({run_dir}); resuming "
                        "must not change what a step computes", "drop them, or start a new run")
    return name, model_cfg, train_cfg


def keep_started_dtype(train_cfg: TrainConfig, saved: dict) -> TrainConfig:
    """`dtype` auto resolves once, when a run starts (config.json's "chosen"): a resumed run keeps computing
    in that dtype, also where `auto` now picks another (a run started in float32 stays float32).

    >>> keep_started_dtype(TrainConfig(), {"chosen": {"dtype": "float32"}}).dtype
    'float32'
    >>> keep_started_dtype(TrainConfig(dtype="bfloat16"), {"chosen": {"dtype": "float32"}}).dtype
    'bfloat16'
    """
    chosen = saved.get("chosen") if isinstance(saved.get("chosen"), dict) else {}
    started = chosen.get("dtype")
    if train_cfg.dtype != "auto" or started not in ("float32", "bfloat16", "float16"):
        return train_cfg
    return train_cfg.model_copy(update={"dtype": started})


def check_global_batch(saved: dict, saved_train: TrainConfig, train_cfg: TrainConfig) -> None:
    """A resumed run keeps its global batch (batch x accumulation x world size); the world size may change."""
    world = dist_from_env().world_size
    want = saved_train.batch_size * saved_train.grad_accum_steps * int(saved.get("world_size", 1))
    got = train_cfg.batch_size * train_cfg.grad_accum_steps * world
    if got == want:
        return
    keep = []
    if want % (train_cfg.grad_accum_steps * world) == 0:
        keep.append(f"`batch_size` {want // (train_cfg.grad_accum_steps * world)}")
    if want % (train_cfg.batch_size * world) == 0:
        keep.append(f"`grad_accum_steps` {want // (train_cfg.batch_size * world)}")
    fix = (f"pass {' or '.join(keep)} to keep it" if keep else
           f"pick `batch_size` and `grad_accum_steps` whose product times {world} is {want}")
    raise UserError(f"the run's global batch is {want} sequences per step; batch {train_cfg.batch_size} x accumulation "
                    f"{train_cfg.grad_accum_steps} x {world} processes makes {got}", fix)


GPT2_TOKENIZER = paths.GPT2_TOKENIZER


def preset_tokenizer_dir(preset: Preset, dataset: str, given: Path | None) -> Path:
    """The tokenizer a fresh run uses: the one given, else the one its preset names (GPT-2's in
    data/gpt2-tokenizer/), else the dataset's (`tslm bpe` output in data/<dataset>/tokenizer/)."""
    if given is not None:
        return Path(given)
    if preset.tokenizer == "gpt2":
        d = paths.dataset_dir(GPT2_TOKENIZER)
        if not d.is_dir():
            raise UserError(f"preset {preset.name} uses GPT-2's tokenizer (vocab {preset.model.vocab_size}), "
                            f"which is not in {d}",
                            f"fetch it with `tslm download gpt2-tokenizer` and encode your text with "
                            f"`tslm encode FILE tokenizer={d}`")
        return d
    return paths.tokenizer_dir(dataset)


def check_preset_tokenizer(preset: Preset, tokenizer_dir: Path, vocab_size: int) -> None:
    """A preset that names GPT-2's tokenizer trains with it: another vocabulary would build another model."""
    if preset.tokenizer == "gpt2" and vocab_size != preset.model.vocab_size:
        raise UserError(
            f"preset {preset.name} is defined with GPT-2's tokenizer (vocab {preset.model.vocab_size}), "
            f"but {tokenizer_dir} has {vocab_size} ids",
            f"use `tokenizer_dir` {paths.dataset_dir(GPT2_TOKENIZER)} (`tslm download gpt2-tokenizer`) with "
            f"token files encoded by it, or pass `vocab_size` {vocab_size} to train this shape with yours",
        )


def load_run_tokenizer(tokenizer_dir: Path, dataset: str):
    if not tokenizer_dir.is_dir():
        raise UserError(f"tokenizer not found: {tokenizer_dir}",
                        f"train one with `tslm bpe {paths.text_path(dataset, 'train')}`, or pass `tokenizer_dir`")
    if is_hf_dir(tokenizer_dir):  # fine-tuning a Hugging Face directory: its tokenizer.json / vocab.json
        return tokenizer_from_hf(tokenizer_dir)
    return runs.load_tokenizer(tokenizer_dir)


def vocab_from_tokenizer(model_cfg: ModelConfig, tok_vocab: int, explicit: bool) -> ModelConfig:
    """The model's vocab comes from the tokenizer unless set explicitly (then it must be large enough)."""
    if explicit:
        if model_cfg.vocab_size < tok_vocab:
            raise UserError(f"vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's {tok_vocab}",
                            f"drop `vocab_size` (it defaults to the tokenizer's) or set it >= {tok_vocab}")
        return model_cfg
    return model_cfg if model_cfg.vocab_size == tok_vocab else model_cfg.model_copy(update={"vocab_size": tok_vocab})


def check_token_file_fits(path: Path, split: str, dataset: str, fingerprint: str | None,
                          model_cfg: ModelConfig) -> None:
    """Present, made with this tokenizer, ids inside the vocabulary, longer than one context."""
    tokens, _ = open_tokens(path, split, dataset, split)
    check_tokens(path, fingerprint, model_cfg.vocab_size)
    if len(tokens) <= model_cfg.context_length:
        raise UserError(f"{path} holds {len(tokens)} tokens, fewer than context length + 1 "
                        f"({model_cfg.context_length + 1})", "encode more text or lower `context_length`")


def schedule_length(model_cfg: ModelConfig, train_cfg: TrainConfig, opts: TrainOptions) -> tuple[int, int]:
    """(max_steps, end_step): --train-tokens (if set) decides max_steps; the schedule ends exactly there."""
    step_tokens = tokens_per_step(train_cfg.batch_size, train_cfg.grad_accum_steps, dist_from_env().world_size,
                                  model_cfg.context_length)
    max_steps = train_cfg.max_steps
    if train_cfg.train_tokens is not None:
        max_steps = max(1, math.ceil(train_cfg.train_tokens / step_tokens))
    if train_cfg.warmup_steps > max_steps:
        raise UserError(f"warmup_steps ({train_cfg.warmup_steps}) exceeds the number of steps ({max_steps})",
                        "lower `warmup_steps` or raise `max_steps`/`train_tokens`")
    end_step = max_steps
    if opts.stop_at is not None:
        if not 1 <= opts.stop_at <= max_steps:
            raise UserError(f"`stop_at` {opts.stop_at} is outside 1..{max_steps}", "pick a step within the schedule")
        end_step = opts.stop_at
    if opts.skip_nonfinite < 0:
        raise UserError(f"`skip_nonfinite` must be >= 0, got {opts.skip_nonfinite}")
    return max_steps, end_step


def check_resumable(ckpt_path: Path, run_dir: Path, saved: dict) -> None:
    """Refuse, before anything is written, a checkpoint that is damaged, whose run state is malformed, or
    that belongs to another run (model config, train settings or tokenizer differ from config.json)."""
    older = [p for _, p in runs.step_checkpoints(run_dir) if p != ckpt_path and p.name < ckpt_path.name]
    fix = (f"resume from the previous one: `tslm train resume={older[-1]}`" if older
           else "start the run again with `force`")
    try:
        ckpt = read_checkpoint(ckpt_path)
    except UserError as e:
        raise UserError(e.what, fix) from None
    try:
        state = RunState.model_validate(ckpt.metadata)
    except ValidationError as e:
        where = ", ".join(".".join(map(str, err["loc"])) for err in e.errors()[:3])
        raise UserError(f"checkpoint {ckpt_path} has no usable run state ({where}): it is not a step "
                        "checkpoint of a tslm run, or it was damaged", fix) from None
    if ckpt.optimizer_meta is None:
        raise UserError(f"checkpoint {ckpt_path} holds no optimizer state (a weights-only checkpoint)",
                        "resume from a step_*.safetensors checkpoint instead")
    cpu_state = torch.get_rng_state()
    rng = ckpt.extra.get("rng.torch_cpu")
    if rng is not None and (rng.dtype != cpu_state.dtype or rng.shape != cpu_state.shape):
        raise UserError(f"checkpoint {ckpt_path} holds a malformed RNG state", fix)
    differ = [f"model.{k}" for k in _differences(ModelConfig, state.model_config_, saved.get("model"))]
    differ += _differences(TrainConfig, state.train_config, saved.get("train"))
    if differ:
        raise UserError(f"checkpoint {ckpt_path} was trained with other settings than {run_dir} records "
                        f"({', '.join(differ)})", "resume it from the run directory it came from, or start a new run")
    recorded = (saved.get("tokenizer") or {}).get("fingerprint")
    if state.tokenizer_fingerprint is not None and recorded is not None and state.tokenizer_fingerprint != recorded:
        raise UserError(f"checkpoint {ckpt_path} was trained with another tokenizer than {run_dir}",
                        "resume it from the run directory it came from, or start a new run")


def _differences(cls, a: Any, b: Any) -> list[str]:
    """The settings (neutral ones aside) in which two config dicts differ once validated as `cls`."""
    try:
        x, y = cls.model_validate(a), cls.model_validate(b)
    except ValidationError:
        return ["(unreadable config)"]
    neutral = results_neutral(cls)
    return sorted(k for k in cls.model_fields if k not in neutral and getattr(x, k) != getattr(y, k))


def copy_tokenizer(src: Path, dst: Path) -> None:
    if src.resolve() == dst.resolve():
        return
    if is_hf_dir(src):  # a Hugging Face directory: its tokenizer, written in our format
        write_tokenizer(tokenizer_from_hf(src), dst, str(src))
        return
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            atomic_write_text(dst / f.name, f.read_text(encoding="utf-8")) if f.suffix in (".json", ".txt") \
                else shutil.copyfile(f, dst / f.name)
