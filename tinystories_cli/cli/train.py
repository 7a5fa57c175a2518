"""`tslm train`: train a model from a preset (+ config file + flags) into runs/<name>/."""

from __future__ import annotations

from typing import Annotated

import torch
import typer

from tinystories_cli import train as train_lib
from tinystories_cli.cli import common
from tinystories_cli.config import ModelConfig, TrainConfig
from tinystories_cli.console import console, err_console
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import strict_json
from tinystories_cli.train import autosize

CPU_PRESET = "tinystories-cpu"

RUN = "Run"

COMMAND_KWARGS = {"no_args_is_help": False}

# An interrupted run exits as a process killed by the signal would (128 + signal number), after saving its
# checkpoint: a scheduler (Slurm requeue, a shell loop) then knows the run did not finish.
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


def _opt(*names: str, help: str, panel: str = RUN, **kw):
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False, **kw)


# The parameters of `tslm train`'s settings and options whose flag is not `--parameter-name` (train_file ->
# --train-data, ...), read from the fields, for the messages that name a parameter.
FLAG_RENAMES = common.flag_renames(ModelConfig, TrainConfig, train_lib.TrainOptions)


@common.with_options(common.config_options(ModelConfig, common.MODEL), common.config_options(TrainConfig, common.TRAIN),
                     common.config_options(train_lib.TrainOptions, RUN))
def command(
    preset: Annotated[
        str | None, typer.Option("--preset", "-p", help="Preset name (see `tslm account --list`).")
    ] = None,
    config: common.ConfigFile = None,
    resume: Annotated[
        bool,
        _opt(
            "--resume",
            help="Continue a run. `--resume` or `--resume auto`: --run-name (or runs/latest) from its latest "
            "checkpoint, starting fresh if it has none; `--resume RUN_OR_CHECKPOINT`: that run or checkpoint.",
        ),
    ] = False,
    resume_target: Annotated[
        str | None,
        typer.Argument(
            help="With --resume: auto, a run name, a run directory or a checkpoint file.",
            show_default=False,
            metavar="[auto|RUN]",
        ),
    ] = None,
    wandb: Annotated[bool, _opt("--wandb", help="Same as --log wandb (kept for older scripts).", hidden=True)] = False,
    auto_size: Annotated[
        bool,
        _opt(
            "--auto-size",
            help="Pick d_model, layers, heads, lr, batch, warmup and decay for the budget "
            "(--time-budget, --train-tokens or --max-steps) from the rule measured on a CPU (README: Auto size); "
            f"flags given explicitly win. Base preset: --preset, else {autosize.BASE_PRESET}.",
        ),
    ] = False,
    plain: Annotated[bool, _opt("--plain", help="Plain log lines instead of the live display.")] = False,
    quiet: Annotated[bool, _opt("--quiet", "-q", help="No progress output.")] = False,
    print_config: common.PrintConfig = False,
    settings: dict | None = None,
) -> None:
    """Train a model: `tslm train --preset debug` (after `tslm bpe` and `tslm encode`)."""
    run = _prepare(preset, config, resume, resume_target, wandb, auto_size, plain, quiet, settings)
    if not quiet and not run.auto_size:
        warning = cpu_time_warning(run)
        if warning:
            err_console.print(f"[yellow]note:[/yellow] {warning}", soft_wrap=True, highlight=False)
    if print_config:
        console.print_json(strict_json({"preset": run.preset, "model": run.model_cfg.model_dump(),
                                       "train": run.train_cfg.model_dump(), "run_dir": str(run.run_dir),
                                       **({"auto_size": run.auto_size} if run.auto_size else {})}))
        return
    result = train_lib.train(run)
    if not quiet:
        best = (f", best val loss {result.best_val_loss:.4f} (sampled estimate; `tslm eval` gives the whole-file loss)"
                if result.best_val_loss is not None else "")
        how = {"finished": "finished", "stop_at": "stopped at --stop-at", "interrupted": "interrupted",
               "time_budget": "stopped at the --time-budget deadline"}[result.stopped]
        console.print(f"{how} at step {result.step}/{result.max_steps}{best}; run in {result.run_dir} "
                      f"({result.tokens_per_s / 1e3:.1f}K tokens/s)", soft_wrap=True)
    if result.stopped == "interrupted":
        raise typer.Exit(EXIT_CODES.get(result.signal or "", 130))


def _prepare(preset, config, resume: bool, resume_target, wandb: bool, auto_size: bool, plain: bool, quiet: bool,
             settings: dict):
    """The run the flags describe (`prepare_run`, or `prepare_auto_run` with --auto-size)."""
    if wandb:  # the older spelling of --log wandb
        settings = {**settings, "log": ",".join(x for x in (settings.get("log"), "wandb") if x)}
    model_over = common.given(settings, ModelConfig.model_fields)
    train_over = common.given(settings, TrainConfig.model_fields)
    if resume_target is not None and not resume:
        raise UserError(f"unexpected argument {resume_target!r}",
                        "to continue a run pass --resume, --resume auto or --resume RUN")
    resume_value = (resume_target or "auto") if resume else None
    if (preset is None and config is None and resume_value is None and settings.get("init_from") is None
            and not auto_size):
        raise UserError("no preset given",
                        "pass --preset NAME (see `tslm account --list`), --config FILE, --resume or --init-from")
    if settings.get("run_name") is not None and settings.get("run_dir") is not None:
        raise UserError("--run-name and --run-dir are exclusive", "pass one of them")
    peak_tflops = settings.get("peak_tflops")
    if peak_tflops is not None and not 0 < peak_tflops < 1e9:  # also refuses NaN and inf
        raise UserError(f"--peak-tflops must be a positive finite number, got {peak_tflops}")
    opts = train_lib.TrainOptions(**common.options_from(train_lib.TrainOptions, settings), resume=resume_value,
                                  display="quiet" if quiet else ("plain" if plain else "auto"))
    if auto_size:
        return autosize.prepare_auto_run(preset, config, model_over, train_over, opts,
                                         notify=None if quiet else (lambda m: console.print(m, soft_wrap=True)))
    return train_lib.prepare_run(preset, config, model_over, train_over, opts)


CPU_MFU = 0.35           # the share of the measured matmul speed a CPU training step reaches (RESULTS.md: 30-40%)
CPU_WARN_SECONDS = 3600  # a CPU run estimated longer than this is told about the CPU preset before it starts


def cpu_time_warning(run) -> str | None:
    """On a CPU, a run whose estimated time is over an hour (a GPU-sized preset such as tinystories-17m):
    the estimate and what fits a CPU, said before the first step. None otherwise."""
    from tinystories_cli.device import measure_peak_tflops, pick_device
    from tinystories_cli.train.display import format_duration
    from tinystories_cli.train.loop import flops_per_token

    if pick_device(run.train_cfg.device).type != "cpu":
        return None
    tc = run.train_cfg
    tokens = run.end_step * tc.batch_size * tc.grad_accum_steps * run.model_cfg.context_length
    peak = run.options.peak_tflops or measure_peak_tflops(torch.device("cpu"))
    seconds = flops_per_token(run.model_cfg) * tokens / (peak * 1e12 * CPU_MFU)
    if seconds < CPU_WARN_SECONDS:
        return None
    return (f"{run.preset} is sized for a GPU: on this CPU ({peak:.2g} TFLOP/s measured) its {run.end_step:,} steps "
            f"take about {format_duration(seconds)}. On a CPU use --preset {CPU_PRESET}, or --auto-size with "
            f"--time-budget (e.g. --auto-size --time-budget 30m) to size the model for the time you have")
