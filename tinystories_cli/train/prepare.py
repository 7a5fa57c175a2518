"""Preparing a run: resolve the configs, find and check the tokenizer and token files, pick the run directory.

    run = prepare_run("debug", options=TrainOptions(run_name="smoke"))   # everything checked, nothing written

Every bad input is refused here, before a process group starts or a file is written.
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tinystories_cli import paths, runs
from tinystories_cli.account import check_fits_in_memory, training_memory
from tinystories_cli.checkpoint import read_checkpoint
from tinystories_cli.config import ModelConfig, TrainConfig, build_config, load_config_file, resolve_configs, results_neutral
from tinystories_cli.console import human_bytes
from tinystories_cli.device import dist_from_env
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import atomic_write_text
from tinystories_cli.tokens import check_tokens, open_tokens


@dataclass
class TrainOptions:
    """Run-level choices that are not hyperparameters (they never change what a step computes)."""

    run_name: str | None = None
    run_dir: Path | None = None  # an explicit run directory instead of runs/<run_name>
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
    fit_memory: int | None = None  # bytes per device: pick micro-batch and accumulation to fit (`fit_to_memory`)
    time_budget: float | None = None  # seconds of wall-clock: plan max_steps from a probe (`loop.plan_time_budget`)


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
    notes: list[str] = field(default_factory=list)  # what was chosen for the user, printed in the header
    time_plan: dict[str, float] | None = None  # --time-budget: the budget, the probe and the steps it planned


def parse_duration(text: str) -> float:
    """Seconds in a duration such as 90m, 1.5h, 1h30m, 45s or 5400 (seconds).

    >>> parse_duration("90m"), parse_duration("1h30m"), parse_duration("1.5h"), parse_duration("5400")
    (5400.0, 5400.0, 5400.0, 5400.0)
    """
    parts = re.findall(r"([0-9]*\.?[0-9]+)\s*([hms]?)", text.strip().lower())
    if not parts or re.sub(r"[0-9.hms\s]", "", text.lower()) or "".join(n + u for n, u in parts) != \
            re.sub(r"\s", "", text.lower()):
        raise UserError(f"cannot read duration {text!r}", "use e.g. 90m, 1.5h, 1h30m or 3600s")
    seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1, "": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise UserError(f"duration {text!r} must be positive", "use e.g. 90m, 1.5h, 1h30m or 3600s")
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
    file_model, file_train = file_data.get("model") or {}, file_data.get("train") or {}
    run_dir, resume_from = find_resume(opts)
    if resume_from is not None:
        saved = runs.read_run_config(run_dir)
        preset_name, model_cfg, train_cfg = resumed_configs(saved, run_dir, preset, {**file_model, **(model_overrides or {})},
                                                            file_train, train_overrides)
        check_resumable(resume_from, run_dir, saved)
        tokenizer_dir = runs.tokenizer_dir_of(run_dir)
    else:
        p, model_cfg, train_cfg = resolve_configs(preset, config_file, model_overrides, train_overrides)
        preset_name = p.name
        tokenizer_dir = opts.tokenizer_dir or paths.tokenizer_dir(train_cfg.dataset)
        run_dir = run_dir or opts.run_dir or runs.runs_root() / (opts.run_name or new_run_name(preset_name))
        runs.check_no_foreign(run_dir)
        if (run_dir / runs.CONFIG_FILE).exists() or runs.step_checkpoints(run_dir):
            # --resume auto on a run that never reached its first checkpoint starts it over.
            if not opts.force and opts.resume != "auto":
                raise UserError(f"{run_dir} already holds a run",
                                "pass --resume to continue it, --force to start it over, or choose another --run-name")

    check_fits_in_memory(model_cfg, "this model")  # it is built in host memory first, whatever the device
    tokenizer = load_run_tokenizer(tokenizer_dir, train_cfg.dataset)
    if resume_from is None:
        explicit = any((d or {}).get("vocab_size") is not None for d in (file_model, model_overrides))
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
        raise UserError("--time-budget plans the schedule when a run starts; a resumed run keeps its plan",
                        "drop --time-budget when resuming")
    max_steps, end_step = plan_steps(model_cfg, train_cfg, opts)
    if train_cfg.max_steps != max_steps:
        train_cfg = train_cfg.model_copy(update={"max_steps": max_steps})
    return Run(preset_name, model_cfg, train_cfg, opts, run_dir, tokenizer_dir, train_file, valid_file,
               resume_from, max_steps, end_step, fresh=resume_from is None, tokenizer_fingerprint=fingerprint,
               notes=notes)


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
        raise UserError(f"even a micro-batch of 1 needs about {hb(need[1])}, more than "
                        f"{hb(usable)} ({100 - 100 * FIT_MARGIN:.0f}% of the budget)",
                        "use --parallel fsdp on more GPUs, --activation-checkpointing, a shorter --ctx, or a "
                        "smaller model (see `tslm account --memory`)")
    b = fits[0]
    accum = per_process // b
    bigger = [n for c, n in need.items() if c > b]
    why = f"; micro-batch {min(c for c in need if c > b)} would need {hb(min(bigger))}" if bigger else ""
    note = (f"--fit-memory {hb(budget)}: micro-batch {b} x accumulation {accum} x {world_size} "
            f"process{'es' if world_size > 1 else ''} = global batch {per_process * world_size}; estimated "
            f"{hb(need[b])} per process, under {hb(usable)} (a {100 * FIT_MARGIN:.0f}% margin kept){why}")
    return train_cfg.model_copy(update={"batch_size": b, "grad_accum_steps": accum}), note


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
                        "start it again with --force, or use --resume auto")
    return run_dir, resume_from


def resumed_configs(saved: dict, run_dir: Path, preset: str | None, given_model: dict, file_train: dict,
                    train_overrides: dict | None) -> tuple[str, ModelConfig, TrainConfig]:
    """The saved run's configs, with the given train settings applied where they may change on resume."""
    name = saved.get("preset")
    if preset and preset != name:
        raise UserError(f"--preset {preset} differs from the preset of the run being resumed ({name})",
                        "drop --preset when resuming, or use a new --run-name")
    model_cfg = ModelConfig.model_validate(saved["model"])
    changed = [k for k, v in given_model.items() if v is not None and getattr(model_cfg, k, None) != v]
    if changed:
        raise UserError(f"model settings {changed} differ from the run being resumed ({run_dir})",
                        "drop them, or start a new run with another --run-name")
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


def check_global_batch(saved: dict, saved_train: TrainConfig, train_cfg: TrainConfig) -> None:
    """A resumed run keeps its global batch (batch x accumulation x world size); the world size may change."""
    world = dist_from_env().world_size
    want = saved_train.batch_size * saved_train.grad_accum_steps * int(saved.get("world_size", 1))
    got = train_cfg.batch_size * train_cfg.grad_accum_steps * world
    if got == want:
        return
    keep = []
    if want % (train_cfg.grad_accum_steps * world) == 0:
        keep.append(f"--batch-size {want // (train_cfg.grad_accum_steps * world)}")
    if want % (train_cfg.batch_size * world) == 0:
        keep.append(f"--grad-accum {want // (train_cfg.batch_size * world)}")
    fix = (f"pass {' or '.join(keep)} to keep it" if keep else
           f"pick --batch-size and --grad-accum whose product times {world} is {want}")
    raise UserError(f"the run's global batch is {want} sequences per step; batch {train_cfg.batch_size} x accumulation "
                    f"{train_cfg.grad_accum_steps} x {world} processes makes {got}", fix)


def load_run_tokenizer(tokenizer_dir: Path, dataset: str):
    if not tokenizer_dir.is_dir():
        raise UserError(f"tokenizer not found: {tokenizer_dir}",
                        f"train one with `tslm bpe {paths.text_path(dataset, 'train')}`, or pass --tokenizer")
    return runs.load_tokenizer(tokenizer_dir)


def vocab_from_tokenizer(model_cfg: ModelConfig, tok_vocab: int, explicit: bool) -> ModelConfig:
    """The model's vocab comes from the tokenizer unless set explicitly (then it must be large enough)."""
    if explicit:
        if model_cfg.vocab_size < tok_vocab:
            raise UserError(f"vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's {tok_vocab}",
                            f"drop --vocab-size (it defaults to the tokenizer's) or set it >= {tok_vocab}")
        return model_cfg
    return model_cfg if model_cfg.vocab_size == tok_vocab else model_cfg.model_copy(update={"vocab_size": tok_vocab})


def check_token_file_fits(path: Path, split: str, dataset: str, fingerprint: str | None, model_cfg: ModelConfig) -> None:
    """Present, made with this tokenizer, ids inside the vocabulary, longer than one context."""
    tokens, _ = open_tokens(path, split, dataset, split)
    check_tokens(path, fingerprint, model_cfg.vocab_size)
    if len(tokens) <= model_cfg.context_length:
        raise UserError(f"{path} holds {len(tokens)} tokens, fewer than context length + 1 "
                        f"({model_cfg.context_length + 1})", "encode more text or lower --ctx")


def plan_steps(model_cfg: ModelConfig, train_cfg: TrainConfig, opts: TrainOptions) -> tuple[int, int]:
    """(max_steps, end_step): --train-tokens (if set) decides max_steps; the schedule ends exactly there."""
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
    return max_steps, end_step


class SamplerState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = Field(ge=0, lt=2**63)
    draws: int = Field(ge=0, lt=2**63)
    grad_accum: int = Field(1, ge=1, lt=2**31)


class RunState(BaseModel):
    """What the trainer stores in a step checkpoint's metadata, checked before a resume acts on it."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model_config_: dict = Field(alias="model_config")
    train_config: dict
    preset: str
    sampler: SamplerState
    best_val_loss: float | None = None
    skipped_nonfinite: int = Field(0, ge=0)
    elapsed_s: float = Field(0.0, ge=0)
    max_steps: int = Field(gt=0)
    tokenizer_fingerprint: str | None = None
    scaler_skipped: int = Field(0, ge=0)
    world_size: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    grad_accum_steps: int | None = Field(None, ge=1)


def check_resumable(ckpt_path: Path, run_dir: Path, saved: dict) -> None:
    """Refuse, before anything is written, a checkpoint that is damaged, whose run state is malformed, or
    that belongs to another run (model config, train settings or tokenizer differ from config.json)."""
    older = [p for _, p in runs.step_checkpoints(run_dir) if p != ckpt_path and p.name < ckpt_path.name]
    fix = (f"resume from the previous one: `tslm train --resume {older[-1]}`" if older
           else "start the run again with --force")
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
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            atomic_write_text(dst / f.name, f.read_text(encoding="utf-8")) if f.suffix in (".json", ".txt") \
                else shutil.copyfile(f, dst / f.name)
