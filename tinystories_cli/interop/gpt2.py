"""Hugging Face `GPT2LMHeadModel` <-> our `TransformerLM` in its GPT-2 configuration.

GPT-2 is our model with these switches: pre-norm LayerNorm (with bias), learned positions, a GELU FFN
with the tanh approximation (`ffn="gelu_tanh"`; "gelu_new" in transformers), biases on every attention
and FFN projection (`bias=True`), and (usually) the LM head tied to the token embedding.

Two layout differences, both handled here:
- GPT-2's projections are `Conv1D`s: y = x W + b with W (in, out), the transpose of our Linear's
  (out, in) weight;
- its attention input projection is one fused `c_attn` (d, 3d) whose output columns are q, k, v in that
  order; we split it into `q_proj`, `k_proj`, `v_proj`.

    cfg = model_config_from_gpt2(json.loads(Path("config.json").read_text()))
    ours = from_gpt2_state_dict(gpt2_tensors, cfg)        # for TransformerLM(cfg).load_state_dict
    back = to_gpt2_state_dict(ours, cfg)                  # and back (the identity on tensors)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tinystories_cli.config import ModelConfig
from tinystories_cli.interop.hfconfig import (
    MAX_CONTEXT,
    MAX_LAYERS,
    MAX_VOCAB,
    check_architecture,
    hf_bool,
    hf_float,
    hf_int,
    refuse_if,
)

# What GPT2LMHeadModel computes, switch by switch (the ModelConfig value it requires). `ffn` may be any
# activation GPT-2's config can name (see OUR_ACTIVATION). A model without biases (`bias=False`,
# `layernorm_bias=False`) maps too: its missing biases are written as zeros, which compute the same.
GPT2_SWITCHES = {"norm": "layernorm", "norm_position": "pre", "pos_emb": "learned"}
# transformers' activation_function -> our `ffn` (gelu_new, gelu_fast and gelu_pytorch_tanh are one function).
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}
OUR_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
# Buffers that older GPT-2 files carry (causal masks): not weights, skipped on import.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
PREFIX = "transformer."

# Per-layer tensors copied as they are (LayerNorms): ours -> GPT-2's.
NORM_NAMES = {"ln1.weight": "ln_1.weight", "ln1.bias": "ln_1.bias",
              "ln2.weight": "ln_2.weight", "ln2.bias": "ln_2.bias"}
# Conv1D projections other than c_attn: ours -> GPT-2's (weights transposed, biases copied).
PROJ_NAMES = {"attn.output_proj": "attn.c_proj", "ffn.w1": "mlp.c_fc", "ffn.w2": "mlp.c_proj"}


def gpt2_incompatibilities(cfg: ModelConfig) -> list[str]:
    """The `switch=value` settings GPT2LMHeadModel cannot represent (empty when it can)."""
    bad = [f"{k}={getattr(cfg, k)}" for k, want in GPT2_SWITCHES.items() if getattr(cfg, k) != want]
    if cfg.ffn not in OUR_ACTIVATION:
        bad.append(f"ffn={cfg.ffn}")
    return bad


def model_config_from_gpt2(hf: dict) -> ModelConfig:
    """Our ModelConfig for a `GPT2LMHeadModel` config.json; what our model cannot compute is refused by name."""
    check_architecture(hf, "gpt2", "GPT2LMHeadModel")
    act = hf.get("activation_function", "gelu_new")
    refuse_if(not isinstance(act, str) or act not in ACTIVATIONS, f"activation_function {str(act)[:40]!r}")
    refuse_if(not hf_bool(hf, "scale_attn_weights", True), "scale_attn_weights=false (unscaled attention)")
    refuse_if(hf_bool(hf, "scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true")
    refuse_if(hf_bool(hf, "add_cross_attention", False), "add_cross_attention=true")
    d = hf_int(hf, "n_embd")
    heads = hf_int(hf, "n_head")
    refuse_if(d % heads != 0, f"n_embd {d} not divisible by n_head {heads}")
    n_inner = hf.get("n_inner")
    return ModelConfig(
        vocab_size=hf_int(hf, "vocab_size", hi=MAX_VOCAB),
        context_length=hf_int(hf, "n_positions", hf.get("n_ctx", 1024), hi=MAX_CONTEXT),
        d_model=d, num_layers=hf_int(hf, "n_layer", hi=MAX_LAYERS), num_heads=heads,
        d_ff=4 * d if n_inner is None else hf_int(hf, "n_inner"),
        norm="layernorm", norm_position="pre", norm_eps=hf_float(hf, "layer_norm_epsilon", 1e-5),
        layernorm_bias=True, pos_emb="learned", ffn=ACTIVATIONS[act], bias=True,
        tie_embeddings=hf_bool(hf, "tie_word_embeddings", True), dropout=0.0, init="gpt2",
    )


def gpt2_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for `transformers.GPT2Config` (also valid as its config.json) for this model."""
    bad = gpt2_incompatibilities(cfg)
    if bad:
        raise ValueError(f"{', '.join(bad)} cannot be represented as GPT2LMHeadModel")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_embd": cfg.d_model,
        "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": cfg.d_ff,
        "activation_function": OUR_ACTIVATION[cfg.ffn], "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "scale_attn_weights": True,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
    }


def with_zero_biases(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """`state_dict` plus zero biases for every projection and LayerNorm that has none."""
    sd = dict(state_dict)
    ref = sd["token_embeddings.weight"]
    rows = {"attn.q_proj": cfg.d_model, "attn.k_proj": cfg.d_model, "attn.v_proj": cfg.d_model,
            "attn.output_proj": cfg.d_model, "ffn.w1": cfg.d_ff, "ffn.w2": cfg.d_model, "ln1": cfg.d_model,
            "ln2": cfg.d_model}
    for i in range(cfg.num_layers):
        for name, n in rows.items():
            sd.setdefault(f"layers.{i}.{name}.bias", ref.new_zeros(n))
    sd.setdefault("ln_final.bias", ref.new_zeros(cfg.d_model))
    return sd


def gpt2_expected_shapes(cfg: ModelConfig, prefix: str = PREFIX) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a GPT2LMHeadModel model.safetensors holds for this config (lm_head only untied)."""
    d, f = cfg.d_model, cfg.d_ff
    per_layer = {"ln_1.weight": (d,), "ln_1.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
                 "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
                 "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
                 "mlp.c_fc.weight": (d, f), "mlp.c_fc.bias": (f,), "mlp.c_proj.weight": (f, d), "mlp.c_proj.bias": (d,)}
    out = {f"{prefix}wte.weight": (cfg.vocab_size, d), f"{prefix}wpe.weight": (cfg.context_length, d),
           f"{prefix}ln_f.weight": (d,), f"{prefix}ln_f.bias": (d,)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        out.update({f"{prefix}h.{i}.{k}": v for k, v in per_layer.items()})
    return out


def from_gpt2_state_dict(gpt2_sd: dict[str, Tensor], cfg: ModelConfig, prefix: str = PREFIX) -> dict[str, Tensor]:
    """GPT-2 names/layouts to ours (for `TransformerLM.load_state_dict`): c_attn split, Conv1D transposed."""
    p = prefix
    wte = gpt2_sd[f"{p}wte.weight"]
    out = {"token_embeddings.weight": wte, "position_embeddings.weight": gpt2_sd[f"{p}wpe.weight"],
           "ln_final.weight": gpt2_sd[f"{p}ln_f.weight"], "ln_final.bias": gpt2_sd[f"{p}ln_f.bias"],
           "lm_head.weight": gpt2_sd.get("lm_head.weight", wte)}
    for i in range(cfg.num_layers):
        h, ours = f"{p}h.{i}.", f"layers.{i}."
        for o, t in NORM_NAMES.items():
            out[ours + o] = gpt2_sd[h + t]
        q, k, v = gpt2_sd[h + "attn.c_attn.weight"].t().chunk(3, dim=0)  # (3d, d) -> three (d, d)
        qb, kb, vb = gpt2_sd[h + "attn.c_attn.bias"].chunk(3, dim=0)
        for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            out[f"{ours}attn.{name}.weight"], out[f"{ours}attn.{name}.bias"] = w, b
        for o, t in PROJ_NAMES.items():
            out[f"{ours}{o}.weight"] = gpt2_sd[f"{h}{t}.weight"].t()
            out[f"{ours}{o}.bias"] = gpt2_sd[f"{h}{t}.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def to_gpt2_state_dict(state_dict: dict[str, Tensor], cfg: ModelConfig, prefix: str = PREFIX) -> dict[str, Tensor]:
    """Inverse of `from_gpt2_state_dict` (a tied LM head is left out: GPT-2 ties it by config). Biases a
    model without them lacks are written as zeros."""
    p = prefix
    state_dict = with_zero_biases(state_dict, cfg)
    out = {f"{p}wte.weight": state_dict["token_embeddings.weight"],
           f"{p}wpe.weight": state_dict["position_embeddings.weight"],
           f"{p}ln_f.weight": state_dict["ln_final.weight"], f"{p}ln_f.bias": state_dict["ln_final.bias"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state_dict["lm_head.weight"]
    for i in range(cfg.num_layers):
        h, ours = f"{p}h.{i}.", f"layers.{i}."
        for o, t in NORM_NAMES.items():
            out[h + t] = state_dict[ours + o]
        qkv = [state_dict[f"{ours}attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")]
        out[h + "attn.c_attn.weight"] = torch.cat(qkv, dim=0).t()
        out[h + "attn.c_attn.bias"] = torch.cat(
            [state_dict[f"{ours}attn.{n}.bias"] for n in ("q_proj", "k_proj", "v_proj")])
        for o, t in PROJ_NAMES.items():
            out[f"{h}{t}.weight"] = state_dict[f"{ours}{o}.weight"].t()
            out[f"{h}{t}.bias"] = state_dict[f"{ours}{o}.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(cfg: ModelConfig, specials: dict[str, int], dtype: str = "float32") -> dict[str, Any]:
    """config.json for GPT2LMHeadModel: `gpt2_config_dict` plus token ids and dtype."""
    eot = specials.get("<|endoftext|>")
    out = dict(gpt2_config_dict(cfg))
    out.update({"bos_token_id": eot, "eos_token_id": eot, "initializer_range": 0.02, "use_cache": True,
                "torch_dtype": dtype, "dtype": dtype})  # transformers < 5 reads torch_dtype, >= 5 dtype
    return out


def hf_state_dict(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """GPT-2-named tensors from our plain state (contiguous, each its own storage)."""
    return {k: v.contiguous().clone() for k, v in to_gpt2_state_dict(state, cfg).items()}
