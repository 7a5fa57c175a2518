"""Our pre-norm RMSNorm/RoPE/SwiGLU `TransformerLM` <-> Hugging Face `LlamaForCausalLM`.

One table drives both directions of the tensor names, `permute_for_llama` is the one place that maps
interleaved-pair RoPE to Llama's half-split rotation, and `check_llama_compatible` is the one check of
which configs map at all:

    sd = to_llama_state_dict(model.state_dict(), cfg)     # Llama names, q/k rows permuted
    model.load_state_dict(from_llama_state_dict(sd, cfg))  # and back (the identity on tensors)
    cfg = model_config_from_llama(json.loads(Path("config.json").read_text()))   # a Llama config.json

With `bias` (Llama's `attention_bias` / `mlp_bias`) the projections' biases map by the same names
(q/k biases permuted like their rows). `model_config_from_llama` refuses what this model cannot compute
(rope scaling, sliding windows, another activation or model type) by name; grouped-query attention is
imported by repeating each key/value head for the query heads that share it (`expand_kv_heads`), which
computes the same function with full multi-head attention.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tinystories_cli.checkpoint import clean_name, unwrap_model
from tinystories_cli.config import ModelConfig
from tinystories_cli.errors import UserError
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

EOT = "<|endoftext|>"
# What LlamaForCausalLM computes, switch by switch (the ModelConfig value it requires).
LLAMA_SWITCHES = {"norm": "rmsnorm", "norm_position": "pre", "pos_emb": "rope", "ffn": "swiglu"}

# Per-layer parameter names: ours -> Hugging Face Llama's. q/k rows are also permuted (interleaved-pair
# RoPE -> half-split RoPE); every other tensor is copied as is.
LLAMA_LAYER_NAMES = {
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.output_proj.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ln1.weight": "input_layernorm.weight",
    "ln2.weight": "post_attention_layernorm.weight",
}
ROPE_ROWS = {"attn.q_proj.weight", "attn.k_proj.weight"}
ATTENTION_LINEARS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.output_proj")
FFN_LINEARS = ("ffn.w1", "ffn.w3", "ffn.w2")


class NotLlamaCompatible(UserError):
    """The model's architecture has no LlamaForCausalLM equivalent."""


def llama_incompatibilities(cfg: ModelConfig) -> list[str]:
    """The `switch=value` settings LlamaForCausalLM cannot represent (empty when it can).

    >>> llama_incompatibilities(ModelConfig(norm_position="post", pos_emb="nope"))
    ['norm_position=post', 'pos_emb=nope']
    """
    return [f"{k}={getattr(cfg, k)}" for k, want in LLAMA_SWITCHES.items() if getattr(cfg, k) != want]


def check_llama_compatible(cfg: ModelConfig) -> None:
    """Raise (one line) unless `cfg` maps to LlamaForCausalLM."""
    refuse_settings(llama_incompatibilities(cfg), "not representable as LlamaForCausalLM "
                    "(only pre-norm RMSNorm/RoPE/SwiGLU models map to Llama)")


def refuse_settings(bad: list[str], what: str) -> None:
    """Raise `NotLlamaCompatible` naming the `setting=value` choices in `bad` (nothing when it is empty).

    >>> refuse_settings(["norm=layernorm"], "not representable here")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    tinystories_cli.interop.llama.NotLlamaCompatible: norm=layernorm is not representable here (keep this model...)
    """
    if bad:
        verb = "is" if len(bad) == 1 else "are"
        raise NotLlamaCompatible(f"{', '.join(bad)} {verb} {what}", "keep this model in tslm's own safetensors format")


def layer_names(cfg: ModelConfig) -> dict[str, str]:
    """Our per-layer tensor names -> Llama's, with the projections' biases when `cfg.bias`."""
    names = dict(LLAMA_LAYER_NAMES)
    if cfg.bias:
        for ours in ATTENTION_LINEARS + FFN_LINEARS:
            names[f"{ours}.bias"] = LLAMA_LAYER_NAMES[f"{ours}.weight"].removesuffix(".weight") + ".bias"
    return names


def _permute_rows(t: Tensor, num_heads: int, fn) -> Tensor:
    """`fn` (permute/unpermute) on the rows of a weight (d_out, d_in) or a bias (d_out,)."""
    return fn(t, num_heads) if t.dim() == 2 else fn(t.unsqueeze(1), num_heads).squeeze(1)


def permute_for_llama(w: Tensor, num_heads: int) -> Tensor:
    """Reorder the rows of a q/k projection (d_out, d_in) from interleaved-pair RoPE to Llama's half split.

    Ours rotates pairs (2i, 2i+1) within each head; Llama's `rotate_half` pairs (i, i + hd/2) with the
    same frequency theta^(-2i/hd). So per head, Llama's row i is our row 2i and row hd/2 + i is our 2i+1.

    >>> permute_for_llama(torch.arange(4.0).reshape(4, 1), num_heads=1).flatten().tolist()
    [0.0, 2.0, 1.0, 3.0]
    """
    d_out, d_in = w.shape
    hd = d_out // num_heads
    return w.reshape(num_heads, hd // 2, 2, d_in).transpose(1, 2).reshape(d_out, d_in)


def unpermute_from_llama(w: Tensor, num_heads: int) -> Tensor:
    """Inverse of `permute_for_llama`."""
    d_out, d_in = w.shape
    hd = d_out // num_heads
    return w.reshape(num_heads, 2, hd // 2, d_in).transpose(1, 2).reshape(d_out, d_in)


def llama_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for `transformers.LlamaConfig` (also valid as its config.json) for this model."""
    check_llama_compatible(cfg)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "torch_dtype": "float32",
    }


def to_llama_state_dict(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Map our state_dict names/layouts to `LlamaForCausalLM`'s (q/k rows permuted by `permute_for_llama`)."""
    check_llama_compatible(cfg)
    h = cfg.num_heads
    out = {"model.embed_tokens.weight": state_dict["token_embeddings.weight"],
           "model.norm.weight": state_dict["ln_final.weight"]}
    out["lm_head.weight"] = state_dict.get("lm_head.weight", state_dict["token_embeddings.weight"])
    for i in range(cfg.num_layers):
        for ours, theirs in layer_names(cfg).items():
            w = state_dict[f"layers.{i}.{ours}"]
            rope = ours.replace(".bias", ".weight") in ROPE_ROWS
            out[f"model.layers.{i}.{theirs}"] = _permute_rows(w, h, permute_for_llama) if rope else w
    return out


def from_llama_state_dict(llama_sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Inverse of `to_llama_state_dict`: Llama names/layouts to ours (for `TransformerLM.load_state_dict`)."""
    check_llama_compatible(cfg)
    h = cfg.num_heads
    out = {"token_embeddings.weight": llama_sd["model.embed_tokens.weight"],
           "ln_final.weight": llama_sd["model.norm.weight"],
           "lm_head.weight": llama_sd.get("lm_head.weight", llama_sd["model.embed_tokens.weight"])}
    for i in range(cfg.num_layers):
        for ours, theirs in layer_names(cfg).items():
            w = llama_sd[f"model.layers.{i}.{theirs}"]
            rope = ours.replace(".bias", ".weight") in ROPE_ROWS
            out[f"layers.{i}.{ours}"] = _permute_rows(w, h, unpermute_from_llama) if rope else w
    return out


def hf_config(cfg: ModelConfig, specials: dict[str, int], dtype: str = "float32") -> dict[str, Any]:
    """config.json for LlamaForCausalLM: `llama_config_dict` plus token ids and dtype."""
    eot = specials.get(EOT)
    out = dict(llama_config_dict(cfg))
    out.update({
        "bos_token_id": eot, "eos_token_id": eot, "pad_token_id": None,
        "initializer_range": 0.02, "use_cache": True, "attention_dropout": 0.0, "rope_scaling": None,
        # transformers < 5 reads torch_dtype, >= 5 reads dtype.
        "torch_dtype": dtype, "dtype": dtype,
    })
    return out


def plain_state(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    """The model's tensors under plain names (no `module.` / `_orig_mod.`), on the CPU in `dtype`."""
    return {clean_name(k): v.detach().to("cpu", dtype) for k, v in unwrap_model(model).state_dict().items()}


def hf_state_dict(model: torch.nn.Module, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Llama-named tensors (contiguous, each its own storage); a tied LM head is left to tie_word_embeddings."""
    sd = to_llama_state_dict(plain_state(model, dtype), cfg)
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.contiguous().clone() for k, v in sd.items()}


# ---------------------------------------------------------------- importing a Llama config.json


def _rope_theta(hf: dict) -> float:
    """rope_theta from `rope_parameters` (transformers >= 5) or the top level; any scaling is refused."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    for key, value in (("rope_scaling", scaling), ("rope_parameters", params)):
        if value is not None:
            kind = value.get("rope_type", value.get("type", "default")) if isinstance(value, dict) else value
            refuse_if(kind != "default", f"rope scaling ({key} type {kind!r})")
    if isinstance(params, dict) and "rope_theta" in params:
        return hf_float(params, "rope_theta")
    return hf_float(hf, "rope_theta", 10_000.0)


def model_config_from_llama(hf: dict) -> tuple[ModelConfig, int]:
    """(our ModelConfig, num_key_value_heads) for a `LlamaForCausalLM` config.json.

    Refuses by name what our model does not compute: another model type, rope scaling, sliding windows,
    an activation other than SiLU, a head_dim other than hidden_size / num_attention_heads.
    """
    check_architecture(hf, "llama", "LlamaForCausalLM")
    d = hf_int(hf, "hidden_size")
    heads = hf_int(hf, "num_attention_heads")
    kv = hf_int(hf, "num_key_value_heads", heads)
    refuse_if(d % heads != 0, f"hidden_size {d} not divisible by num_attention_heads {heads}")
    refuse_if(heads % kv != 0, f"num_key_value_heads {kv} not dividing num_attention_heads {heads}")
    head_dim = hf_int(hf, "head_dim", d // heads)
    refuse_if(head_dim != d // heads, f"head_dim {head_dim} != hidden_size / num_attention_heads ({d // heads})")
    act = hf.get("hidden_act", "silu")
    refuse_if(act != "silu", f"hidden_act {act!r} (Llama's SwiGLU uses silu)")
    for key in ("sliding_window", "use_sliding_window"):
        refuse_if(hf.get(key) not in (None, False), f"{key}={hf.get(key)!r}")
    attention_bias, mlp_bias = hf_bool(hf, "attention_bias", False), hf_bool(hf, "mlp_bias", False)
    cfg = ModelConfig(
        vocab_size=hf_int(hf, "vocab_size", hi=MAX_VOCAB),
        context_length=hf_int(hf, "max_position_embeddings", 2048, hi=MAX_CONTEXT),
        d_model=d,
        num_layers=hf_int(hf, "num_hidden_layers", hi=MAX_LAYERS),
        num_heads=heads,
        d_ff=hf_int(hf, "intermediate_size"),
        rope_theta=_rope_theta(hf),
        norm="rmsnorm",
        norm_position="pre",
        norm_eps=hf_float(hf, "rms_norm_eps", 1e-6),
        pos_emb="rope",
        ffn="swiglu",
        tie_embeddings=hf_bool(hf, "tie_word_embeddings", False),
        bias=attention_bias or mlp_bias,
        dropout=0.0,
    )
    return cfg, kv


def llama_expected_shapes(cfg: ModelConfig, num_kv_heads: int, attention_bias: bool = True,
                          mlp_bias: bool = True) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a LlamaForCausalLM model.safetensors holds for this config (lm_head only untied)."""
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    kvd = num_kv_heads * hd
    per_layer = {"self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (kvd, d),
                 "self_attn.v_proj.weight": (kvd, d), "self_attn.o_proj.weight": (d, d),
                 "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
                 "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)}
    if cfg.bias and attention_bias:
        per_layer.update({"self_attn.q_proj.bias": (d,), "self_attn.k_proj.bias": (kvd,),
                          "self_attn.v_proj.bias": (kvd,), "self_attn.o_proj.bias": (d,)})
    if cfg.bias and mlp_bias:
        per_layer.update({"mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,), "mlp.down_proj.bias": (d,)})
    out = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        out.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return out


def expand_kv_heads(llama_sd: dict[str, Tensor], cfg: ModelConfig, num_kv_heads: int) -> dict[str, Tensor]:
    """Grouped-query attention as full multi-head attention: key/value head j serves query heads
    j*g .. j*g+g-1 (g = num_heads / num_kv_heads), so each is repeated g times in place. Exact."""
    g = cfg.num_heads // num_kv_heads
    if g == 1:
        return llama_sd
    out = dict(llama_sd)
    for name, t in llama_sd.items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            heads = t.reshape(num_kv_heads, cfg.head_dim, *t.shape[1:])
            out[name] = heads.repeat_interleave(g, dim=0).reshape(cfg.d_model, *t.shape[1:])
    return out


def fill_missing_biases(llama_sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Zero biases where a model has them on attention but not the FFN (or the reverse): our `bias`
    switch covers both, and a zero bias computes what no bias does."""
    out = dict(llama_sd)
    for i in range(cfg.num_layers):
        for ours, theirs in layer_names(cfg).items():
            key = f"model.layers.{i}.{theirs}"
            if key not in out and theirs.endswith(".bias"):
                rows = cfg.d_model if ours.startswith(("attn.", "ffn.w2")) else cfg.d_ff
                out[key] = torch.zeros(rows)
    return out
