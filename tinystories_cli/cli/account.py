"""`tslm account`: parameters, FLOPs, AdamW memory and training time of a preset."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from tinystories_cli import account
from tinystories_cli.cli import common
from tinystories_cli.config import PRESETS, ModelConfig, resolve_configs
from tinystories_cli.console import console, human_bytes, human_count
from tinystories_cli.errors import UserError


@common.with_options(common.config_options(ModelConfig, common.MODEL, include=common.SHAPE_FIELDS))
def command(
    preset: Annotated[Optional[str], typer.Argument(help="Preset name (see --list).", show_default=False)] = None,
    list_presets: Annotated[bool, typer.Option("--list", help="List the presets and exit.")] = False,
    config: common.ConfigFile = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Sequences per step (default: the preset's).")] = None,
    memory: Annotated[Optional[str], typer.Option("--memory", help="Accelerator memory, e.g. 80GB: prints the largest batch that fits.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Training steps for the time estimate (default: the preset's).")] = None,
    tokens: Annotated[Optional[float], typer.Option("--tokens", help="Training tokens for the time estimate (overrides --steps).")] = None,
    peak_tflops: Annotated[float, typer.Option("--peak-tflops", help="Peak throughput in TFLOP/s (A100 fp32: 19.5).")] = 19.5,
    mfu: Annotated[float, typer.Option("--mfu", help="Model FLOPs utilization, 0-1.")] = 0.5,
    measure: Annotated[bool, typer.Option("--measure", help="Also measure activation memory with one forward+backward on CPU (small configs).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print all figures as one JSON object.")] = False,
    print_config: common.PrintConfig = False,
    settings: dict | None = None,
) -> None:
    """Parameters, FLOPs, AdamW training memory and training time for a model preset."""
    if list_presets:
        _print_presets(as_json)
        return
    p, cfg, train = resolve_configs(preset, config, common.given(settings, ModelConfig.model_fields))
    if print_config:
        console.print_json(json.dumps({"preset": p.name, "model": cfg.model_dump()}))
        return
    for name, value in (("--batch-size", batch_size), ("--steps", steps), ("--tokens", tokens)):
        if value is not None and not 0 < value < 1e30:  # also refuses NaN and inf
            raise UserError(f"{name} must be a positive finite number, got {value}")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu}")
    if not 0 < peak_tflops < 1e9:  # also refuses NaN and inf
        raise UserError(f"--peak-tflops must be a positive finite number, got {peak_tflops}")
    mem_bytes = account.parse_memory(memory) if memory is not None else None
    bs = batch_size or train.batch_size
    rep = account.report(
        cfg, batch_size=bs, steps=None if tokens else (steps or train.max_steps),
        tokens=int(tokens) if tokens else None, memory=mem_bytes, peak_tflops=peak_tflops, mfu=mfu,
    )
    rep["preset"] = p.name
    if measure:
        measured = account.measure_activation_bytes(cfg, bs)
        rep["memory"]["activations_measured"] = measured
    if as_json:
        console.print_json(json.dumps(rep))
        return
    _render(p.name, cfg, rep)


def _print_presets(as_json: bool) -> None:
    if as_json:
        console.print_json(json.dumps({n: {"description": p.description, "model": p.model.model_dump(),
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
    p = rep["parameters"]
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

    f, share = rep["forward_flops"], rep["forward_flops_share"]
    t = _table(f"Forward FLOPs (batch 1, seq {c.context_length})")
    labels = {"qkv_projections": "QKV projections", "attention_scores": "attention scores",
              "attention_weighted": "attention-weighted values", "output_projection": "output projection",
              "ffn": f"FFN ({c.ffn})", "lm_head": "LM head"}
    for k, label in labels.items():
        t.add_row(label, human_count(f[k]), f"{100 * share[k]:.2f}%")
    t.add_row("[bold]total[/bold]", f"[bold]{human_count(f['total'])}[/bold]", "100.00%")
    console.print(t)

    tr, m = rep["training"], rep["memory"]
    t = _table(f"Training (batch {tr['batch_size']} x {tr['seq_len']} = {tr['tokens_per_step']:,} tokens/step, AdamW fp32)")
    t.add_row("FLOPs per step (fwd + 2x bwd)", human_count(tr["flops_per_step"]), "")
    for k in ("parameters", "gradients", "optimizer_state", "activations"):
        t.add_row(f"memory: {k.replace('_', ' ')}", human_bytes(m[k]), f"{100 * m[k] / m['total']:.1f}%")
    t.add_row("[bold]memory: total[/bold]", f"[bold]{human_bytes(m['total'])}[/bold]", "")
    if "activations_measured" in m:
        am = m["activations_measured"]
        t.add_row("activations measured (CPU)", human_bytes(am), f"{100 * (m['activations'] / am - 1):+.1f}% est.")
    if "max_batch_size" in m:
        t.add_row(f"largest batch in {human_bytes(m['budget'])}", str(m["max_batch_size"]), "")
    console.print(t)

    if "time" in rep:
        tm = rep["time"]
        secs = tm["seconds"]
        t = _table(f"Training time ({tm['steps']:,} steps, {human_count(tm['tokens'])} tokens)")
        t.add_row("total FLOPs", human_count(tm["total_flops"]), "")
        t.add_row(f"at {100 * tm['mfu']:.0f}% MFU of {tm['peak_tflops']:g} TFLOP/s", _duration(secs), f"{secs:,.0f} s")
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
