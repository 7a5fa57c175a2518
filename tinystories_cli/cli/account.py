"""`tslm account`: parameters, FLOPs, AdamW memory and training time of a preset."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from tinystories_cli import account
from tinystories_cli.cli import common
from tinystories_cli.config import PRESETS, ModelConfig, TrainConfig, resolve_configs
from tinystories_cli.console import console, human_bytes, human_count
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import strict_json

# the command's options, one alias each (keeps the signature one line per parameter)
PresetArg = Annotated[str | None, typer.Argument(help="Preset name (see --list).", show_default=False)]
ListPresetsOpt = Annotated[bool, typer.Option("--list", help="List the presets and exit.")]
BatchSizeOpt = Annotated[
    int | None, typer.Option("--batch-size", help="Sequences per step (default: the preset's).")
]
MemoryOpt = Annotated[
    str | None, typer.Option("--memory", help="Accelerator memory, e.g. 80GB: prints the largest batch that fits.")
]
StepsOpt = Annotated[
    int | None, typer.Option("--steps", help="Training steps for the time estimate (default: the preset's).")
]
TokensOpt = Annotated[
    float | None, typer.Option("--tokens", help="Training tokens for the time estimate (overrides --steps).")
]
PeakTflopsOpt = Annotated[
    float | None,
    typer.Option(
        "--peak-tflops",
        help="Peak throughput in TFLOP/s (default: the A100 peak of --dtype: 312 bf16/fp16, 156 TF32 for float32).",
        show_default=False,
    ),
]
MfuOpt = Annotated[float, typer.Option("--mfu", help="Model FLOPs utilization, 0-1.")]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype", help="Compute dtype of the run: auto (bfloat16 on a GPU) | float32 | bfloat16 | float16."
    ),
]
ParallelOpt = Annotated[
    str,
    typer.Option(
        "--parallel",
        help="ddp (each process holds everything) or fsdp (weights, gradients and AdamW state sharded).",
    ),
]
WorldSizeOpt = Annotated[
    int, typer.Option("--world-size", help="Processes (GPUs) of the run; memory is per process.")
]
ActivationCheckpointingOpt = Annotated[
    bool,
    typer.Option(
        "--activation-checkpointing", help="Each block keeps only its input; the backward recomputes the rest."
    ),
]
MeasureOpt = Annotated[
    bool,
    typer.Option(
        "--measure", help="Also measure activation memory with one forward+backward on CPU (small configs)."
    ),
]
AsJsonOpt = Annotated[bool, typer.Option("--json", help="Print all figures as one JSON object.")]


@common.with_options(common.config_options(ModelConfig, common.MODEL, include=common.SHAPE_FIELDS),
                     common.config_options(TrainConfig, common.TRAIN, include=("optimizer",)))
def command(
    preset: PresetArg = None,
    list_presets: ListPresetsOpt = False,
    config: common.ConfigFile = None,
    batch_size: BatchSizeOpt = None,
    memory: MemoryOpt = None,
    steps: StepsOpt = None,
    tokens: TokensOpt = None,
    peak_tflops: PeakTflopsOpt = None,
    mfu: MfuOpt = 0.5,
    dtype: DtypeOpt = "auto",
    parallel: ParallelOpt = "ddp",
    world_size: WorldSizeOpt = 1,
    activation_checkpointing: ActivationCheckpointingOpt = False,
    measure: MeasureOpt = False,
    as_json: AsJsonOpt = False,
    print_config: common.PrintConfig = False,
    settings: dict | None = None,
) -> None:
    """Parameters, FLOPs, training memory (AdamW's, or Muon + AdamW's with --optimizer muon) and training time
    for a model preset."""
    if list_presets:
        _print_presets(as_json)
        return
    p, cfg, train = resolve_configs(preset, config, common.given(settings, ModelConfig.model_fields))
    if print_config:
        console.print_json(strict_json({"preset": p.name, "model": cfg.model_dump()}))
        return
    for name, value in (("--batch-size", batch_size), ("--steps", steps), ("--tokens", tokens)):
        if value is not None and not 0 < value < 1e30:  # also refuses NaN and inf
            raise UserError(f"{name} must be a positive finite number, got {value}")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu}")
    if peak_tflops is not None and not 0 < peak_tflops < 1e9:  # also refuses NaN and inf
        raise UserError(f"--peak-tflops must be a positive finite number, got {peak_tflops}")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"unknown --dtype {dtype!r}", "use auto, float32, bfloat16 or float16")
    if parallel not in ("ddp", "fsdp"):
        raise UserError(f"unknown --parallel {parallel!r}", "use ddp or fsdp")
    if world_size < 1:
        raise UserError(f"--world-size must be positive, got {world_size}")
    mem_bytes = account.parse_memory(memory) if memory is not None else None
    bs = batch_size or train.batch_size
    rep = account.report(
        cfg, batch_size=bs, steps=None if tokens else (steps or train.max_steps),
        tokens=int(tokens) if tokens else None, memory=mem_bytes, peak_tflops=peak_tflops, mfu=mfu,
        dtype=dtype, activation_checkpointing=activation_checkpointing, parallel=parallel, world_size=world_size,
        optimizer=(settings or {}).get("optimizer") or "adamw",
    )
    rep["preset"] = p.name
    if measure:
        measured = account.measure_activation_bytes(cfg, bs, activation_checkpointing=activation_checkpointing)
        rep["memory"]["activations_measured"] = measured
    if as_json:
        console.print_json(strict_json(rep))
        return
    _render(p.name, cfg, rep)


def _print_presets(as_json: bool) -> None:
    if as_json:
        console.print_json(strict_json({n: {"description": p.description, "model": p.model.model_dump(),
                                           "train": p.train.model_dump()} for n, p in PRESETS.items()}))
        return
    t = Table(title="Presets", title_justify="left")
    for col in ("name", "params", "layers", "d_model", "heads", "ctx", "description"):
        t.add_column(col, justify="left" if col in ("name", "description") else "right", no_wrap=col != "description")
    for n, p in PRESETS.items():
        m = p.model
        t.add_row(n, human_count(account.parameter_counts(m)["total"]), str(m.num_layers), str(m.d_model),
                  str(m.num_heads), str(m.context_length), p.description)
    console.print(t)


def _table(title: str) -> Table:
    t = Table(title=title, title_justify="left", show_header=True)
    t.add_column("component")
    t.add_column("value", justify="right")
    t.add_column("", justify="right")
    return t


def _render(name: str, cfg, rep: dict) -> None:
    c = cfg
    console.print(
        f"[bold]{name}[/bold]  vocab={c.vocab_size} ctx={c.context_length} L={c.num_layers} d={c.d_model} "
        f"h={c.num_heads} d_ff={c.d_ff}  {c.norm_position}-{c.norm} {c.pos_emb} {c.ffn} "
        f"{'tied' if c.tie_embeddings else 'untied'}"
    )
    _render_parameters(rep["parameters"], c)
    _render_flops(rep["forward_flops"], rep["forward_flops_share"], c)
    _render_training(rep["training"], rep["memory"], rep["setup"])
    _render_activations(rep["activations"], c, rep["training"]["batch_size"])
    if "time" in rep:
        _render_time(rep["time"], rep["setup"])


def _render_parameters(p: dict, c) -> None:
    t = _table("Parameters")
    rows = [("token embedding", p["token_embedding"])]
    if p["position_embedding"]:
        rows.append(("position embedding", p["position_embedding"]))
    rows += [
        ("per layer: attention", p["attention_per_layer"]),
        (f"per layer: FFN ({c.ffn})", p["ffn_per_layer"]),
        ("per layer: norms", p["norms_per_layer"]),
        ("per layer: total", p["layer"]),
        (f"all {c.num_layers} layers", p["layers"]),
        ("final norm", p["final_norm"]),
        ("LM head" + (" (tied)" if c.tie_embeddings else ""), p["lm_head"]),
    ]
    for label, v in rows:
        t.add_row(label, human_count(v), f"{v:,}")
    t.add_row("[bold]total[/bold]", f"[bold]{human_count(p['total'])}[/bold]", f"{p['total']:,}")
    t.add_row("bytes fp32 / bf16", human_bytes(p["bytes_fp32"]), human_bytes(p["bytes_bf16"]))
    console.print(t)


def _render_flops(f: dict, share: dict, c) -> None:
    t = _table(f"Forward FLOPs (batch 1, seq {c.context_length})")
    labels = {"qkv_projections": "QKV projections", "attention_scores": "attention scores",
              "attention_weighted": "attention-weighted values", "output_projection": "output projection",
              "ffn": f"FFN ({c.ffn})", "lm_head": "LM head"}
    for k, label in labels.items():
        t.add_row(label, human_count(f[k]), f"{100 * share[k]:.2f}%")
    t.add_row("[bold]total[/bold]", f"[bold]{human_count(f['total'])}[/bold]", "100.00%")
    console.print(t)


def _render_training(tr: dict, m: dict, setup: dict) -> None:
    """FLOPs per step and the training memory term by term (per process)."""
    how = (f"{setup['parallel'].upper()} on {setup['world_size']} processes, memory per process"
           if setup["world_size"] > 1 or setup["parallel"] == "fsdp" else "one process")
    if setup["activation_checkpointing"]:
        how += ", activation checkpointing"
    t = _table(f"Training (batch {tr['batch_size']} x {tr['seq_len']} = {tr['tokens_per_step']:,} tokens/step per "
               f"process, AdamW fp32; {how})")
    t.add_row("FLOPs per step (fwd + 2x bwd)", human_count(tr["flops_per_step"]), "")
    sharded = " (sharded)" if setup["parallel"] == "fsdp" else ""
    for k in ("parameters", "gradients", "optimizer_state", "activations", "gather_buffers"):
        if k in m:
            t.add_row(
                f"memory: {k.replace('_', ' ')}"
                f"{sharded if k in ('parameters', 'gradients', 'optimizer_state') else ''}",
                human_bytes(m[k]),
                f"{100 * m[k] / m['total']:.1f}%",
            )
    t.add_row("[bold]memory: total[/bold]", f"[bold]{human_bytes(m['total'])}[/bold]", "")
    if "activations_measured" in m:
        am = m["activations_measured"]
        t.add_row("activations measured (CPU)", human_bytes(am), f"{100 * (m['activations'] / am - 1):+.1f}% est.")
    if "max_batch_size" in m:
        t.add_row(f"largest batch per process in {human_bytes(m['budget'])}", str(m["max_batch_size"]), "")
    console.print(t)


def _render_time(tm: dict, setup: dict) -> None:
    secs = tm["seconds"]
    t = _table(f"Training time ({tm['steps']:,} steps, {human_count(tm['tokens'])} tokens)")
    t.add_row("total FLOPs", human_count(tm["total_flops"]), "")
    devices = f" x {tm['devices']} devices" if tm["devices"] > 1 else ""
    t.add_row(f"at {100 * tm['mfu']:.0f}% MFU of {tm['peak_tflops']:g} TFLOP/s{devices} ({setup['dtype']})",
              _duration(secs), f"{secs:,.0f} s")
    console.print(t)


def _render_activations(a: dict, c, batch: int) -> None:
    """The activation estimate term by term (what autograd keeps for the backward)."""
    t = _table(f"Activation memory (batch {batch}, fp32 estimate; --measure checks it)")
    rows = [("embedding (ids, positions, dropout mask)", a["embedding"])]
    if "checkpointed_inputs" in a:
        rows += [(f"block inputs kept by the checkpoints ({c.num_layers} layers)", a["checkpointed_inputs"]),
                 ("one block recomputed in the backward", a["recomputed_layer"])]
    else:
        rows += [("per layer (attention, FFN, norms)", a["per_layer"]), (f"all {c.num_layers} layers", a["layers"])]
    rows += [("final norm", a["final_norm"]), ("LM head input", a["lm_head_input"]),
             ("logits and loss (B x T x vocab)", a["logits"])]
    for label, v in rows:
        t.add_row(label, human_bytes(v),
                  f"{100 * v / a['total']:.1f}%" if label != "per layer (attention, FFN, norms)" else "")
    t.add_row("[bold]total[/bold]", f"[bold]{human_bytes(a['total'])}[/bold]", "")
    console.print(t)


def _duration(seconds: float) -> str:
    days, rem = divmod(seconds, 86400)
    hours, rem = divmod(rem, 3600)
    minutes = rem / 60
    if days >= 1:
        return f"{int(days)}d {int(hours)}h"
    if hours >= 1:
        return f"{int(hours)}h {int(minutes)}m"
    return f"{minutes:.1f} min"
