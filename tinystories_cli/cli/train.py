"""`tslm train`: train a model from a preset (+ config file + flags) into runs/<name>/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from tinystories_cli import train as train_lib
from tinystories_cli.cli import common
from tinystories_cli.console import console
from tinystories_cli.errors import UserError

TRAIN = "Training overrides"
RUN = "Run"

COMMAND_KWARGS = {"no_args_is_help": False}


def _opt(*names: str, help: str, panel: str = TRAIN, **kw):
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False, **kw)


def command(
    preset: Annotated[Optional[str], typer.Option("--preset", "-p", help="Preset name (see `tslm account --list`).")] = None,
    config: common.ConfigFile = None,
    # model overrides
    ctx: common.Ctx = None,
    vocab_size: common.VocabSize = None,
    d_model: common.DModel = None,
    num_layers: common.NumLayers = None,
    num_heads: common.NumHeads = None,
    d_ff: common.DFF = None,
    norm: common.Norm = None,
    norm_position: common.NormPosition = None,
    pos_emb: common.PosEmb = None,
    ffn: common.FFN = None,
    tie_embeddings: common.Tie = None,
    rope_theta: common.RopeTheta = None,
    # train overrides
    dataset: Annotated[Optional[str], _opt("--dataset", help="Dataset under data/ (token files and tokenizer).")] = None,
    batch_size: Annotated[Optional[int], _opt("--batch-size", help="Sequences per micro-batch per process.")] = None,
    grad_accum: Annotated[Optional[int], _opt("--grad-accum", help="Micro-batches per optimizer step.")] = None,
    max_steps: Annotated[Optional[int], _opt("--max-steps", help="Optimizer steps (the cosine schedule ends here).")] = None,
    train_tokens: Annotated[Optional[float], _opt("--train-tokens", help="Token budget; sets --max-steps.")] = None,
    lr: Annotated[Optional[float], _opt("--lr", help="Peak learning rate.")] = None,
    min_lr: Annotated[Optional[float], _opt("--min-lr", help="Learning rate at the end of the cosine.")] = None,
    warmup_steps: Annotated[Optional[int], _opt("--warmup-steps", help="Linear warmup steps.")] = None,
    weight_decay: Annotated[Optional[float], _opt("--weight-decay", help="AdamW weight decay (matrices only).")] = None,
    beta1: Annotated[Optional[float], _opt("--beta1", help="AdamW beta1.")] = None,
    beta2: Annotated[Optional[float], _opt("--beta2", help="AdamW beta2.")] = None,
    grad_clip: Annotated[Optional[float], _opt("--grad-clip", help="Global gradient-norm clip (0 = off).")] = None,
    eval_every: Annotated[Optional[int], _opt("--eval-every", help="Validation every N steps.")] = None,
    eval_batches: Annotated[Optional[int], _opt("--eval-batches", help="Validation batches (fixed windows).")] = None,
    log_every: Annotated[Optional[int], _opt("--log-every", help="Log every N steps.")] = None,
    save_every: Annotated[Optional[int], _opt("--save-every", help="Checkpoint every N steps.")] = None,
    keep_last: Annotated[Optional[int], _opt("--keep-last", help="Step checkpoints to keep (plus best).")] = None,
    seed: Annotated[Optional[int], _opt("--seed", help="Seed for init and batches.")] = None,
    device: Annotated[Optional[str], _opt("--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps.")] = None,
    dtype: Annotated[Optional[str], _opt("--dtype", help="float32 | bfloat16 (autocast).")] = None,
    compile: Annotated[Optional[bool], _opt("--compile/--no-compile", help="torch.compile the model and loss as one graph (falls back to eager if it fails).")] = None,
    # run options
    run_name: Annotated[Optional[str], _opt("--run-name", help="Run directory name under runs/ (default: preset-timestamp).", panel=RUN)] = None,
    resume: Annotated[bool, _opt("--resume", help="Continue a run. `--resume` or `--resume auto`: --run-name (or runs/latest) from its latest checkpoint, starting fresh if it has none; `--resume RUN_OR_CHECKPOINT`: that run or checkpoint.", panel=RUN)] = False,
    resume_target: Annotated[Optional[str], typer.Argument(help="With --resume: auto, a run name, a run directory or a checkpoint file.", show_default=False, metavar="[auto|RUN]")] = None,
    force: Annotated[bool, _opt("--force", help="Start over in a run directory that already holds a run.", panel=RUN)] = False,
    stop_at: Annotated[Optional[int], _opt("--stop-at", help="End at this step (with a checkpoint) without changing the schedule.", panel=RUN)] = None,
    skip_nonfinite: Annotated[int, _opt("--skip-nonfinite", help="Skip up to N steps with a NaN/inf loss or gradient instead of stopping.", panel=RUN)] = 0,
    peak_tflops: Annotated[Optional[float], _opt("--peak-tflops", help="Hardware peak TFLOP/s for MFU (default: a measured matmul).", panel=RUN)] = None,
    train_data: Annotated[Optional[Path], _opt("--train-data", help="Train token file (default data/<dataset>/train.npy).", panel=RUN)] = None,
    valid_data: Annotated[Optional[Path], _opt("--valid-data", help="Validation token file (default data/<dataset>/valid.npy).", panel=RUN)] = None,
    tokenizer: Annotated[Optional[Path], _opt("--tokenizer", help="Tokenizer directory (default data/<dataset>/tokenizer).", panel=RUN)] = None,
    wandb: Annotated[bool, _opt("--wandb", help="Also log to Weights & Biases (needs `pip install wandb`).", panel=RUN)] = False,
    plain: Annotated[bool, _opt("--plain", help="Plain log lines instead of the live display.", panel=RUN)] = False,
    quiet: Annotated[bool, _opt("--quiet", "-q", help="No progress output.", panel=RUN)] = False,
    print_config: common.PrintConfig = False,
) -> None:
    """Train a model: `tslm train --preset debug` (after `tslm bpe` and `tslm encode`)."""
    model_over = common.model_overrides(ctx, vocab_size, d_model, num_layers, num_heads, d_ff, norm, norm_position,
                                        pos_emb, ffn, tie_embeddings, rope_theta)
    if train_tokens is not None and train_tokens <= 0:
        raise UserError(f"--train-tokens must be positive, got {train_tokens:g}")
    train_over = dict(
        dataset=dataset, batch_size=batch_size, grad_accum_steps=grad_accum, max_steps=max_steps,
        train_tokens=int(train_tokens) if train_tokens is not None else None, lr=lr, min_lr=min_lr,
        warmup_steps=warmup_steps, weight_decay=weight_decay, beta1=beta1, beta2=beta2, grad_clip=grad_clip,
        eval_every=eval_every, eval_batches=eval_batches, log_every=log_every, save_every=save_every,
        keep_last=keep_last, seed=seed, device=device, dtype=dtype, compile=compile,
    )
    train_over = {k: v for k, v in train_over.items() if v is not None}
    if resume_target is not None and not resume:
        raise UserError(f"unexpected argument {resume_target!r}", "to continue a run pass --resume, --resume auto or --resume RUN")
    resume_value = (resume_target or "auto") if resume else None
    if preset is None and config is None and resume_value is None:
        raise UserError("no preset given", "pass --preset NAME (see `tslm account --list`), --config FILE, or --resume")
    opts = train_lib.TrainOptions(
        run_name=run_name, resume=resume_value, force=force, stop_at=stop_at, skip_nonfinite=skip_nonfinite,
        peak_tflops=peak_tflops, wandb=wandb, train_file=train_data, valid_file=valid_data, tokenizer_dir=tokenizer,
        display="quiet" if quiet else ("plain" if plain else "auto"),
    )
    if peak_tflops is not None and peak_tflops <= 0:
        raise UserError(f"--peak-tflops must be positive, got {peak_tflops}")
    run = train_lib.prepare_run(preset, config, model_over, train_over, opts)
    if print_config:
        console.print_json(json.dumps({"preset": run.preset, "model": run.model_cfg.model_dump(),
                                       "train": run.train_cfg.model_dump(), "run_dir": str(run.run_dir)}))
        return
    result = train_lib.train(run)
    if not quiet:
        best = f", best val loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
        how = {"finished": "finished", "stop_at": "stopped at --stop-at", "interrupted": "interrupted"}[result.stopped]
        console.print(f"{how} at step {result.step}/{result.max_steps}{best}; run in {result.run_dir} "
                      f"({result.tokens_per_s / 1e3:.1f}K tokens/s)", soft_wrap=True)
