"""Our pre-norm RMSNorm/RoPE/SwiGLU `TransformerLM` as llama.cpp's `llama` architecture (a GGUF file).

The names, hyperparameters and tokenizer fields llama.cpp reads, computed here without the `gguf`
package (`export.export_gguf` writes them with it):

    tensors = gguf_tensors(plain_state(model, torch.float32), cfg)    # llama.cpp names -> tensors
    tokens, types, merges = gguf_vocab(tokenizer, cfg.vocab_size)

RoPE: llama.cpp runs the `llama` architecture with its NORM rope type, which rotates adjacent pairs
(x[2i], x[2i+1]) of each head, exactly as our `RotaryPositionalEmbedding` does. So q/k rows are written
in OUR order: no permutation (the Hugging Face export permutes them for `rotate_half`, and llama.cpp's own
converter undoes that permutation when it reads a Hugging Face Llama).

Tokenizer: llama.cpp's `gpt2` tokenizer model (byte-level BPE) with the `gpt-2` pre-tokenizer regex, the
same split our tokenizer uses. Tokens are written through the GPT-2 byte-to-unicode alphabet (as in
vocab.json), special tokens as their text with type CONTROL; merges as "a b" in rank order; ids past
the tokenizer's (a model vocabulary padded larger) are UNUSED placeholder tokens.
"""

from __future__ import annotations

from torch import Tensor

from tinystories_cli.config import ModelConfig
from tinystories_cli.interop.llama import LLAMA_SWITCHES, refuse_settings
from tinystories_cli.tokenizer.files import encode_token_bytes

ARCH = "llama"
TOKENIZER_MODEL = "gpt2"
TOKENIZER_PRE = "gpt-2"
# llama.cpp's token types (gguf.TokenType)
NORMAL, CONTROL, UNUSED = 1, 3, 5

# Per-layer tensors: ours -> llama.cpp's `blk.N.<name>.weight`.
LAYER_NAMES = {
    "attn.q_proj.weight": "attn_q.weight",
    "attn.k_proj.weight": "attn_k.weight",
    "attn.v_proj.weight": "attn_v.weight",
    "attn.output_proj.weight": "attn_output.weight",
    "ffn.w1.weight": "ffn_gate.weight",
    "ffn.w3.weight": "ffn_up.weight",
    "ffn.w2.weight": "ffn_down.weight",
    "ln1.weight": "attn_norm.weight",
    "ln2.weight": "ffn_norm.weight",
}


def gguf_incompatibilities(cfg: ModelConfig) -> list[str]:
    """The `setting=value` choices llama.cpp's `llama` architecture cannot run (empty when it can).

    >>> gguf_incompatibilities(ModelConfig(norm="layernorm", ffn="gelu", bias=True))
    ['norm=layernorm', 'ffn=gelu', 'bias=True']
    """
    bad = [f"{k}={getattr(cfg, k)}" for k, want in LLAMA_SWITCHES.items() if getattr(cfg, k) != want]
    if cfg.bias:
        bad.append("bias=True")
    return bad


def check_gguf_compatible(cfg: ModelConfig) -> None:
    """Raise (one line) unless `cfg` runs as llama.cpp's `llama` architecture."""
    refuse_settings(gguf_incompatibilities(cfg), "not runnable as llama.cpp's llama architecture (it needs "
                    "pre-norm RMSNorm, RoPE, SwiGLU, no biases)")


def gguf_tensors(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """llama.cpp tensor names -> our tensors (q/k rows unchanged, see the module docstring); a tied LM head
    is left out (llama.cpp then uses token_embd)."""
    check_gguf_compatible(cfg)
    out = {"token_embd.weight": state_dict["token_embeddings.weight"]}
    for i in range(cfg.num_layers):
        for ours, theirs in LAYER_NAMES.items():
            out[f"blk.{i}.{theirs}"] = state_dict[f"layers.{i}.{ours}"]
    out["output_norm.weight"] = state_dict["ln_final.weight"]
    if not cfg.tie_embeddings:
        out["output.weight"] = state_dict["lm_head.weight"]
    return out


def gguf_hparams(cfg: ModelConfig) -> dict[str, float | int]:
    """The `llama.*` hyperparameters (keys without the architecture prefix)."""
    return {"context_length": cfg.context_length, "embedding_length": cfg.d_model,
            "feed_forward_length": cfg.d_ff, "block_count": cfg.num_layers,
            "attention.head_count": cfg.num_heads, "attention.head_count_kv": cfg.num_heads,
            "attention.layer_norm_rms_epsilon": float(cfg.norm_eps), "rope.freq_base": float(cfg.rope_theta),
            "rope.dimension_count": cfg.head_dim, "vocab_size": cfg.vocab_size}


def gguf_vocab(tokenizer, vocab_size: int, special_ids: dict[str, int]) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for llama.cpp's `gpt2` tokenizer, one token per model id;
    `special_ids`: special token -> id."""
    specials = {i: s for s, i in special_ids.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in specials:
            tokens.append(specials[i])
            types.append(CONTROL)
        elif i in tokenizer.vocab:
            tokens.append(encode_token_bytes(tokenizer.vocab[i]))
            types.append(NORMAL)
        else:  # the model's vocabulary is larger than the tokenizer's: rows no text encodes to
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
    merges = [f"{encode_token_bytes(a)} {encode_token_bytes(b)}" for a, b in tokenizer.merges]
    return tokens, types, merges

