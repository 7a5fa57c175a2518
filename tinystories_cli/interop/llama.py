"""Our pre-norm RMSNorm/RoPE/SwiGLU `TransformerLM` <-> Hugging Face `LlamaForCausalLM`.

One table drives both directions of the tensor names, `permute_for_llama` is the one place that maps
interleaved-pair RoPE to Llama's half-split rotation, and `check_llama_compatible` is the one check of
which configs map at all:

    sd = to_llama_state_dict(model.state_dict(), cfg)     # Llama names, q/k rows permuted
    model.load_state_dict(from_llama_state_dict(sd, cfg))  # and back (the identity on tensors)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tinystories_cli.checkpoint import clean_name, unwrap_model
from tinystories_cli.config import ModelConfig
from tinystories_cli.errors import UserError

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
    bad = llama_incompatibilities(cfg)
    if bad:
        verb = "is" if len(bad) == 1 else "are"
        raise NotLlamaCompatible(f"{', '.join(bad)} {verb} not representable as LlamaForCausalLM "
                        "(only pre-norm RMSNorm/RoPE/SwiGLU models map to Llama)",
                        "keep this model in tslm's own safetensors format")


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
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }


def to_llama_state_dict(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Map our state_dict names/layouts to `LlamaForCausalLM`'s (q/k rows permuted by `permute_for_llama`)."""
    check_llama_compatible(cfg)
    h = cfg.num_heads
    out = {"model.embed_tokens.weight": state_dict["token_embeddings.weight"],
           "model.norm.weight": state_dict["ln_final.weight"]}
    out["lm_head.weight"] = state_dict.get("lm_head.weight", state_dict["token_embeddings.weight"])
    for i in range(cfg.num_layers):
        for ours, theirs in LLAMA_LAYER_NAMES.items():
            w = state_dict[f"layers.{i}.{ours}"]
            out[f"model.layers.{i}.{theirs}"] = permute_for_llama(w, h) if ours in ROPE_ROWS else w
    return out


def from_llama_state_dict(llama_sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Inverse of `to_llama_state_dict`: Llama names/layouts to ours (for `TransformerLM.load_state_dict`)."""
    check_llama_compatible(cfg)
    h = cfg.num_heads
    out = {"token_embeddings.weight": llama_sd["model.embed_tokens.weight"],
           "ln_final.weight": llama_sd["model.norm.weight"],
           "lm_head.weight": llama_sd.get("lm_head.weight", llama_sd["model.embed_tokens.weight"])}
    for i in range(cfg.num_layers):
        for ours, theirs in LLAMA_LAYER_NAMES.items():
            w = llama_sd[f"model.layers.{i}.{theirs}"]
            out[f"layers.{i}.{ours}"] = unpermute_from_llama(w, h) if ours in ROPE_ROWS else w
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
