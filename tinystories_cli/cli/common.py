"""Option types shared by several subcommands (one definition, used everywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

MODEL = "Model overrides"

ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="TOML or JSON config file (sections \\[model], \\[train]).")]
PrintConfig = Annotated[bool, typer.Option("--print-config", help="Print the fully resolved config as JSON and exit.")]
Ctx = Annotated[Optional[int], typer.Option("--ctx", "--context-length", help="Context length.", rich_help_panel=MODEL)]
VocabSize = Annotated[Optional[int], typer.Option("--vocab-size", help="Vocabulary size.", rich_help_panel=MODEL)]
DModel = Annotated[Optional[int], typer.Option("--d-model", help="Model width.", rich_help_panel=MODEL)]
NumLayers = Annotated[Optional[int], typer.Option("--num-layers", help="Transformer blocks.", rich_help_panel=MODEL)]
NumHeads = Annotated[Optional[int], typer.Option("--num-heads", help="Attention heads.", rich_help_panel=MODEL)]
DFF = Annotated[Optional[int], typer.Option("--d-ff", help="FFN width (default: 8/3 d_model for SwiGLU, else 4 d_model).", rich_help_panel=MODEL)]
Norm = Annotated[Optional[str], typer.Option("--norm", help="rmsnorm | layernorm | none.", rich_help_panel=MODEL)]
NormPosition = Annotated[Optional[str], typer.Option("--norm-position", help="pre | post.", rich_help_panel=MODEL)]
PosEmb = Annotated[Optional[str], typer.Option("--pos-emb", help="rope | nope | sinusoidal | learned.", rich_help_panel=MODEL)]
FFN = Annotated[Optional[str], typer.Option("--ffn", help="swiglu | silu | gelu | relu.", rich_help_panel=MODEL)]
Tie = Annotated[Optional[bool], typer.Option("--tie-embeddings/--untie-embeddings", help="Share the token embedding with the LM head.", rich_help_panel=MODEL, show_default=False)]
RopeTheta = Annotated[Optional[float], typer.Option("--rope-theta", help="RoPE base.", rich_help_panel=MODEL)]


def model_overrides(
    ctx: int | None = None,
    vocab_size: int | None = None,
    d_model: int | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    d_ff: int | None = None,
    norm: str | None = None,
    norm_position: str | None = None,
    pos_emb: str | None = None,
    ffn: str | None = None,
    tie_embeddings: bool | None = None,
    rope_theta: float | None = None,
) -> dict:
    """The model flags that were given, as ModelConfig keys (None = not given)."""
    values = dict(
        context_length=ctx, vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
        d_ff=d_ff, norm=norm, norm_position=norm_position, pos_emb=pos_emb, ffn=ffn,
        tie_embeddings=tie_embeddings, rope_theta=rope_theta,
    )
    return {k: v for k, v in values.items() if v is not None}
