"""A decoder-only Transformer language model written from scratch in plain PyTorch.

No `nn.Linear`, `nn.Embedding`, `nn.LayerNorm` or `torch.nn.functional` layers inside the model:
every layer is a few tensor ops on `nn.Parameter`s, so each can be read, tested and ablated.
The one exception is a switchable fast path, `attention_backend="sdpa"` (or "auto"), which calls
`torch.nn.functional.scaled_dot_product_attention` and PyTorch's fused SiLU in the FFN;
`tests/test_model.py` proves it equals the from-scratch `attention_backend="reference"` path, where
every op is written out.

Every ablation of the seeds is one `ModelConfig` switch: `norm` (rmsnorm | layernorm | none),
`norm_position` (pre | post), `pos_emb` (rope | nope | sinusoidal | learned), `ffn`
(swiglu | silu | gelu | gelu_tanh | relu), `tie_embeddings`, `dropout`, `init` (cs336 | gpt2). `bias`
adds biases to the attention and FFN projections (GPT-2 has them); without it (the default) no bias
tensor exists, so default parameter names and shapes are unchanged.

    >>> import torch
    >>> from tinystories_cli.config import ModelConfig
    >>> model = TransformerLM(ModelConfig(vocab_size=64, context_length=16, d_model=32, num_layers=1, num_heads=2))
    >>> model(torch.randint(0, 64, (2, 10))).shape
    torch.Size([2, 10, 64])

Keyword construction (as in CS336) works too: `TransformerLM(vocab_size=..., context_length=...,
d_model=..., num_layers=..., num_heads=..., d_ff=..., rope_theta=...)`.

KV cache for generation (gpt-fast style: per-layer preallocated k/v buffers). `setup_caches`
allocates them; `forward(ids, start_pos=p)` treats `ids[:, t]` as the token at absolute position
`p + t`, writes its keys/values into the cache and attends to cached positions `0 .. p + t`:

    model.setup_caches(batch_size=1, max_seq_len=cfg.context_length)
    logits = model(prompt_ids, start_pos=0)                  # prefill: (1, P, V)
    pos = prompt_ids.shape[1]
    for _ in range(n):                                       # then one token per step
        next_id = logits[:, -1].argmax(-1, keepdim=True)     # (1, 1)
        logits = model(next_id, start_pos=pos); pos += 1
    model.clear_caches()

Positions never exceed `context_length` (learned positions and the RoPE table stop there), so a
generator that wants more tokens must crop and re-prefill. Without caches, `start_pos` only offsets
the positions.

Hugging Face interop (`to_llama_state_dict` / `from_llama_state_dict` / `llama_config_dict` /
`permute_for_llama`) lives in `interop/llama.py`; the names stay importable from here (loaded on first use).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from tinystories_cli.config import ModelConfig

# Hugging Face interop names kept importable from here (the library contract `tinystories_cli.model.*`) from their
# home `interop/llama.py`: resolved on first access, so importing the model never imports interop (whose Hugging
# Face reader builds on the model's accounting); tests/test_layout.py lists them as the allowed lazy re-exports.
LAZY_REEXPORTS = {name: "tinystories_cli.interop.llama" for name in (
    "permute_for_llama", "unpermute_from_llama", "to_llama_state_dict", "from_llama_state_dict", "llama_config_dict")}

__all__ = [
    "Linear",
    "Embedding",
    "RMSNorm",
    "LayerNorm",
    "SwiGLU",
    "FeedForward",
    "RotaryPositionalEmbedding",
    "softmax",
    "log_softmax",
    "silu",
    "gelu",
    "gelu_tanh",
    "relu",
    "cross_entropy",
    "dropout",
    "scaled_dot_product_attention",
    "KVCache",
    "MultiHeadSelfAttention",
    "TransformerBlock",
    "TransformerLM",
    "sinusoidal_table",
    "permute_for_llama",  # noqa: F822 (lazy)
    "unpermute_from_llama",  # noqa: F822 (lazy)
    "to_llama_state_dict",  # noqa: F822 (lazy)
    "from_llama_state_dict",  # noqa: F822 (lazy)
    "llama_config_dict",  # noqa: F822 (these five resolve in __getattr__ below)
]


def __getattr__(name: str):
    if name in LAZY_REEXPORTS:
        import importlib
        return getattr(importlib.import_module(LAZY_REEXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *LAZY_REEXPORTS])


# --- functions --------------------------------------------------------------------------------

def softmax(x: Tensor, dim: int = -1) -> Tensor:
    """Numerically stable softmax: subtracting the max leaves the result unchanged but keeps exp() finite.

    >>> softmax(torch.tensor([1e4, 1e4]), dim=0)
    tensor([0.5000, 0.5000])
    """
    # the max is a constant shift (softmax is invariant to it), so it needs no gradient: taking it of
    # x.detach() keeps autograd from recording amax (which would save x for its backward)
    e = torch.exp(x - x.detach().amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def log_softmax(x: Tensor, dim: int = -1) -> Tensor:
    """log softmax(x) = x - logsumexp(x), computed stably."""
    m = x.detach().amax(dim=dim, keepdim=True)
    return x - m - torch.log(torch.exp(x - m).sum(dim=dim, keepdim=True))


def silu(x: Tensor) -> Tensor:
    """x * sigmoid(x)."""
    return x * torch.sigmoid(x)


def gelu(x: Tensor) -> Tensor:
    """Exact GELU: x * Phi(x) with the erf form of the normal CDF."""
    return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation of Phi (GPT-2's "gelu_new"):
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def relu(x: Tensor) -> Tensor:
    return torch.clamp_min(x, 0.0)


ACTIVATIONS = {"silu": silu, "gelu": gelu, "gelu_tanh": gelu_tanh, "relu": relu}


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean negative log-likelihood of `targets` under `logits` (..., V), over all leading dims.

    Uses log-sum-exp, never the probabilities, so logits of 1e4 stay finite.

    >>> abs(cross_entropy(torch.tensor([[0.0, 0.0]]), torch.tensor([1])).item() - math.log(2)) < 1e-6
    True
    """
    logits = logits.reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    m = logits.detach().amax(dim=-1, keepdim=True)  # constant shift, no gradient needed
    lse = m.squeeze(-1) + torch.log(torch.exp(logits - m).sum(dim=-1))  # (N,)
    # advanced indexing rather than gather: its backward keeps only the indices, not the (N, V) logits
    target_logit = logits[torch.arange(logits.shape[0], device=logits.device), targets]  # (N,)
    return (lse - target_logit).mean()


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout: zero each element with probability p, scale survivors by 1/(1-p)."""
    if not training or p == 0.0:
        return x
    keep = (torch.rand_like(x) >= p).to(x.dtype) * (1.0 / (1.0 - p))
    return x * keep


def scaled_dot_product_attention(Q: Tensor, K: Tensor, V: Tensor, mask: Tensor | None = None,
                                 dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """softmax(Q K^T / sqrt(d_k)) V with Q (..., q, d_k), K (..., k, d_k), V (..., k, d_v).

    `mask` is boolean (..., q, k), broadcastable; True means "may attend". Returns (..., q, d_v).
    """
    d_k = Q.shape[-1]
    # scaling Q (q x d_k) is cheaper than scaling the (q x k) scores and saves no extra tensor
    scores = (Q * (1.0 / math.sqrt(d_k))) @ K.transpose(-2, -1)  # (..., q, k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = dropout(softmax(scores, dim=-1), dropout_p, training)
    return probs @ V  # (..., q, d_v)


def sinusoidal_table(num_positions: int, d_model: int) -> Tensor:
    """Vaswani et al. positions: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same)."""
    pos = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)  # (P, 1)
    inv = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (d/2,)
    angle = pos * inv  # (P, d/2)
    return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2).float()  # (P, d)


# --- layers -----------------------------------------------------------------------------------

@torch.no_grad()
def _trunc_normal_(w: Tensor, std: float) -> Tensor:
    """N(0, std^2) cut at +-3 std by inverse-CDF sampling: u ~ U(erf(-3/sqrt2), erf(3/sqrt2)), x = sqrt2 std erfinv(u).

    (torch's own trunc_normal_ is a rejection loop, ~50x slower on CPU for large matrices.)
    """
    edge = math.erf(3.0 / math.sqrt(2.0))
    return w.uniform_(-edge, edge).erfinv_().mul_(std * math.sqrt(2.0)).clamp_(-3 * std, 3 * std)


class Linear(nn.Module):
    """y = x W^T (+ b with `bias=True`); W is (out_features, in_features), init N(0, 2/(in+out)) cut at 3 std.

    Without `bias` (the default) there is no `bias` tensor at all (`self.bias` is None), so the
    state_dict holds `weight` only; with it, `bias` (out_features,) starts at zero.
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None, *, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _trunc_normal_(self.weight, math.sqrt(2.0 / (self.in_features + self.out_features)))
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.weight.t()
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}"
                + (", bias" if self.bias is not None else ""))


class Embedding(nn.Module):
    """A lookup table (num_embeddings, embedding_dim), init N(0, 1) cut at 3."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _trunc_normal_(self.weight, 1.0)

    def forward(self, token_ids: Tensor) -> Tensor:
        return self.weight[token_ids]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 and cast back (safe under bf16 autocast)."""

    def __init__(self, d_model: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        in_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(in_dtype)


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * weight + bias (biased variance), in float32 and cast back."""

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(d_model, device=device, dtype=dtype)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        in_dtype = x.dtype
        x = x.float()
        centered = x - x.mean(dim=-1, keepdim=True)
        x = centered * torch.rsqrt(centered.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        x = x * self.weight.float()
        if self.bias is not None:
            x = x + self.bias.float()
        return x.to(in_dtype)


def make_norm(kind: str, d_model: int, eps: float = 1e-5, bias: bool = True, device=None, dtype=None) -> nn.Module:
    """'rmsnorm' | 'layernorm' | 'none' (identity, no parameters)."""
    if kind == "rmsnorm":
        return RMSNorm(d_model, eps, device=device, dtype=dtype)
    if kind == "layernorm":
        return LayerNorm(d_model, eps, bias=bias, device=device, dtype=dtype)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}")


def _fast_silu(x: Tensor) -> Tensor:
    # PyTorch's fused SiLU (2 passes over memory in forward+backward instead of ~6 for x * sigmoid(x));
    # used only when a model is built with fused_kernels=True, and tested equal to `silu`
    return torch.nn.functional.silu(x)


class SwiGLU(nn.Module):
    """Gated FFN: w2(silu(w1 x) * w3 x), w1/w3: d_model -> d_ff, w2: d_ff -> d_model.

    `fused_kernels=True` swaps the from-scratch `silu` for PyTorch's fused one (same numbers, faster eager).
    """

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None, *, fused_kernels: bool = False,
                 bias: bool = False):
        super().__init__()
        self.silu = _fast_silu if fused_kernels else silu
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype, bias=bias)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype, bias=bias)
        self.w3 = Linear(d_model, d_ff, device=device, dtype=dtype, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.silu(self.w1(x)) * self.w3(x))


class FeedForward(nn.Module):
    """Non-gated FFN: w2(act(w1 x)) with act one of silu, gelu (exact), gelu_tanh (tanh approximation), relu."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", device=None, dtype=None, *,
                 fused_kernels: bool = False, bias: bool = False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        self.activation = activation
        self.act = _fast_silu if (fused_kernels and activation == "silu") else ACTIVATIONS[activation]
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype, bias=bias)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.act(self.w1(x)))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


def make_ffn(kind: str, d_model: int, d_ff: int, device=None, dtype=None, fused_kernels: bool = False,
             bias: bool = False) -> nn.Module:
    if kind == "swiglu":
        return SwiGLU(d_model, d_ff, device=device, dtype=dtype, fused_kernels=fused_kernels, bias=bias)
    return FeedForward(d_model, d_ff, kind, device=device, dtype=dtype, fused_kernels=fused_kernels, bias=bias)


class RotaryPositionalEmbedding(nn.Module):
    """RoPE: rotate each consecutive pair (x[2i], x[2i+1]) by the angle pos * theta^(-2i/d_k).

    `forward(x, token_positions)`: x (..., seq, d_k), positions (..., seq) broadcastable to x's
    leading dims. The tables are non-persistent buffers (not in checkpoints), stored full width so the
    rotation is two contiguous multiplies (fast on CPU) rather than four strided ones on half-width views:
        out = x * cos2 + swap_pairs(x) * sin2,   swap_pairs(x)[2i] = x[2i+1], swap_pairs(x)[2i+1] = x[2i]
    with cos2 = (cos_0, cos_0, cos_1, cos_1, ...) and sin2 = (-sin_0, sin_0, -sin_1, sin_1, ...).
    """

    def __init__(self, theta: float, d_k: int, max_seq_len: int, device=None):
        super().__init__()
        if d_k % 2:
            raise ValueError(f"RoPE needs an even d_k, got {d_k}")
        self.theta, self.d_k, self.max_seq_len = theta, d_k, max_seq_len
        inv_freq = theta ** (-torch.arange(0, d_k, 2, dtype=torch.float64, device=device) / d_k)  # (d_k/2,)
        angle = torch.arange(max_seq_len, dtype=torch.float64, device=device).unsqueeze(1) * inv_freq  # (S, d_k/2)
        cos2 = angle.cos().repeat_interleave(2, dim=-1)  # (S, d_k)
        sin2 = torch.stack([-angle.sin(), angle.sin()], dim=-1).flatten(-2)  # (S, d_k)
        self.register_buffer("cos", cos2.float(), persistent=False)
        self.register_buffer("sin", sin2.float(), persistent=False)

    def tables(self, token_positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(cos2, sin2) rows for the positions: (..., seq, d_k) each."""
        return self.cos[token_positions].to(dtype), self.sin[token_positions].to(dtype)

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
        return x * cos + swapped * sin

    def forward(self, x: Tensor, token_positions: Tensor) -> Tensor:
        return self.rotate(x, *self.tables(token_positions, x.dtype))

    def extra_repr(self) -> str:
        return f"theta={self.theta}, d_k={self.d_k}, max_seq_len={self.max_seq_len}"


# --- attention --------------------------------------------------------------------------------

class KVCache(nn.Module):
    """Preallocated keys/values for incremental decoding: k, v of shape (batch, heads, max_seq_len, head_dim).

    Buffers are non-persistent, so they never enter a checkpoint.
    """

    def __init__(self, batch_size: int, num_heads: int, max_seq_len: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        shape = (batch_size, num_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, start_pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, h, T, hd) at positions start_pos..start_pos+T-1; return the cache up to there."""
        B, _, T, _ = k.shape
        end = start_pos + T
        if B > self.k.shape[0] or end > self.k.shape[2]:
            raise ValueError(f"KV cache too small: need batch {B}, length {end}; have {tuple(self.k.shape)}")
        self.k[:B, :, start_pos:end] = k.to(self.k.dtype)
        self.v[:B, :, start_pos:end] = v.to(self.v.dtype)
        return self.k[:B, :, :end], self.v[:B, :, :end]


def _sdpa_available() -> bool:
    return hasattr(torch.nn.functional, "scaled_dot_product_attention")


class MultiHeadSelfAttention(nn.Module):
    """Causal multi-head self-attention with optional RoPE on q and k.

    `.q_proj`, `.k_proj`, `.v_proj`, `.output_proj` are Linear(d_model, d_model) (with biases when
    `bias`). RoPE is applied
    when `theta` is given (then `max_seq_len` sizes its table). `forward(x, token_positions=None)`;
    positions default to 0..T-1 (offset by `start_pos`).
    `attention_backend`: "reference" (from scratch), "sdpa" (PyTorch's fused kernel) or "auto"
    (sdpa when available and exactly equivalent, i.e. no attention dropout in training).
    """

    def __init__(self, d_model: int, num_heads: int, max_seq_len: int | None = None, theta: float | None = None,
                 *, attention_backend: str = "auto", dropout: float = 0.0, bias: bool = False, device=None,
                 dtype=None):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} not divisible by num_heads {num_heads}")
        if attention_backend not in ("auto", "reference", "sdpa"):
            raise ValueError(f"unknown attention_backend {attention_backend!r}")
        if attention_backend == "sdpa" and not _sdpa_available():
            raise ValueError("attention_backend 'sdpa' needs torch.nn.functional.scaled_dot_product_attention "
                             "(torch >= 2.0); use attention_backend 'reference'")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.attention_backend, self.dropout = attention_backend, dropout
        self.q_proj = Linear(d_model, d_model, device=device, dtype=dtype, bias=bias)
        self.k_proj = Linear(d_model, d_model, device=device, dtype=dtype, bias=bias)
        self.v_proj = Linear(d_model, d_model, device=device, dtype=dtype, bias=bias)
        self.output_proj = Linear(d_model, d_model, device=device, dtype=dtype, bias=bias)
        self.rope = None
        if theta is not None:
            if max_seq_len is None:
                raise ValueError("RoPE (theta given) needs max_seq_len")
            self.rope = RotaryPositionalEmbedding(theta, self.head_dim, max_seq_len, device=device)
        self.kv_cache: KVCache | None = None

    def _use_sdpa(self) -> bool:
        if self.attention_backend == "reference":
            return False
        if self.attention_backend == "sdpa":
            return True
        return _sdpa_available() and not (self.training and self.dropout > 0)

    def forward(self, x: Tensor, token_positions: Tensor | None = None, start_pos: int = 0,
                attn_mask: Tensor | None = None) -> Tensor:
        """`attn_mask` (bool, broadcastable to (..., nh, T, S), True = may attend) replaces the
        causal mask when given (the model builds one for left-padded batches)."""
        *lead, T, d = x.shape
        # three separate projections rather than one fused (d -> 3d) matmul: a fused one would make autograd
        # keep the whole qkv buffer alive (v is saved as a view of it) plus a concatenated weight copy
        heads = (self.num_heads, self.head_dim)
        q = self.q_proj(x).unflatten(-1, heads)  # (..., T, nh, hs)
        k = self.k_proj(x).unflatten(-1, heads)
        v = self.v_proj(x).unflatten(-1, heads)
        if self.rope is not None:
            if token_positions is None:
                token_positions = torch.arange(start_pos, start_pos + T, device=x.device)
            # rotate in the contiguous (..., T, nh, hs) layout: tables (..., T, 1, hs) broadcast over heads
            cos, sin = self.rope.tables(token_positions, q.dtype)
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
            q, k = self.rope.rotate(q, cos, sin), self.rope.rotate(k, cos, sin)
        q, k, v = q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2)  # (..., nh, T, hs)

        if self.kv_cache is not None:
            if len(lead) != 1:
                raise ValueError("the KV cache needs input of shape (batch, seq, d_model)")
            k, v = self.kv_cache.update(start_pos, k, v)  # (B, nh, start_pos+T, hs)
        S = k.shape[-2]
        # query t sits at absolute position start_pos + t (or T-1 when uncached) and sees keys 0..that
        causal_plain = S == T and attn_mask is None  # queries and keys start at position 0
        mask = attn_mask
        if mask is None and not causal_plain and T > 1:
            q_pos = torch.arange(S - T, S, device=x.device)
            mask = torch.arange(S, device=x.device) <= q_pos.unsqueeze(-1)  # (T, S)

        p = self.dropout if self.training else 0.0
        if self._use_sdpa():
            y = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal_plain and T > 1)
        else:
            if causal_plain:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            y = scaled_dot_product_attention(q, k, v, mask, dropout_p=p, training=self.training)
        y = y.transpose(-3, -2).flatten(-2)  # (..., T, d)
        return self.output_proj(y)


class TransformerBlock(nn.Module):
    """One layer. Pre-norm: x + attn(ln1(x)), then x + ffn(ln2(x)). Post-norm: ln1(x + attn(x)),
    then ln2(x + ffn(x)). norm='none' drops the norms. Dropout (training only) on both residual branches.
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, max_seq_len: int | None = None,
                 theta: float | None = None, *, norm: str = "rmsnorm", norm_position: str = "pre",
                 norm_eps: float = 1e-5, layernorm_bias: bool = True, ffn: str = "swiglu", dropout: float = 0.0,
                 attention_backend: str = "auto", bias: bool = False, device=None, dtype=None):
        super().__init__()
        if norm_position not in ("pre", "post"):
            raise ValueError(f"unknown norm_position {norm_position!r}")
        self.norm_position, self.dropout = norm_position, dropout
        self.ln1 = make_norm(norm, d_model, norm_eps, layernorm_bias, device=device, dtype=dtype)
        self.attn = MultiHeadSelfAttention(d_model, num_heads, max_seq_len, theta, attention_backend=attention_backend,
                                           dropout=dropout, bias=bias, device=device, dtype=dtype)
        self.ln2 = make_norm(norm, d_model, norm_eps, layernorm_bias, device=device, dtype=dtype)
        # the from-scratch "reference" backend keeps every op from scratch; the others may use fused kernels
        self.ffn = make_ffn(ffn, d_model, d_ff, device=device, dtype=dtype,
                            fused_kernels=attention_backend != "reference", bias=bias)

    def forward(self, x: Tensor, token_positions: Tensor | None = None, start_pos: int = 0,
                attn_mask: Tensor | None = None) -> Tensor:
        p, tr = self.dropout, self.training
        if self.norm_position == "pre":
            x = x + dropout(self.attn(self.ln1(x), token_positions, start_pos, attn_mask), p, tr)
            x = x + dropout(self.ffn(self.ln2(x)), p, tr)
        else:
            x = self.ln1(x + dropout(self.attn(x, token_positions, start_pos, attn_mask), p, tr))
            x = self.ln2(x + dropout(self.ffn(x), p, tr))
        return x


# --- the language model -----------------------------------------------------------------------

class TransformerLM(nn.Module):
    """Token embedding -> `num_layers` TransformerBlocks -> final norm -> LM head; returns logits (B, T, V).

    Build from a `ModelConfig` or from its fields as keywords (`device`/`dtype` keywords are also accepted).
    With `tie_embeddings` the LM head shares `token_embeddings.weight` (both names appear in
    `state_dict`, one tensor). `ln_final` exists whenever norm != 'none' (also for post-norm).
    """

    POSITIONAL = ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff", "rope_theta")

    def __init__(self, config: ModelConfig | None = None, *args: Any, device=None, dtype=None, **kwargs: Any):
        super().__init__()
        if config is not None and not isinstance(config, ModelConfig):  # CS336 order: TransformerLM(V, ctx, d, ...)
            if len(args) + 1 > len(self.POSITIONAL):
                raise TypeError(f"at most {len(self.POSITIONAL)} positional arguments: {self.POSITIONAL}")
            kwargs = {**dict(zip(self.POSITIONAL, (config, *args))), **kwargs}
            config = None
        elif args:
            raise TypeError("pass either a ModelConfig or the config fields, not both positionally")
        if config is None:
            config = ModelConfig(**kwargs)
        elif kwargs:
            config = config.model_copy(update=kwargs)
            config = ModelConfig.model_validate(config.model_dump())
        self.config = cfg = config
        dd = {"device": device, "dtype": dtype}
        self.token_embeddings = Embedding(cfg.vocab_size, cfg.d_model, **dd)
        if cfg.pos_emb == "learned":
            self.position_embeddings = Embedding(cfg.context_length, cfg.d_model, **dd)
        elif cfg.pos_emb == "sinusoidal":
            self.register_buffer("sinusoidal", sinusoidal_table(cfg.context_length, cfg.d_model).to(device),
                                 persistent=False)
        theta = cfg.rope_theta if cfg.pos_emb == "rope" else None
        self.layers = nn.ModuleList(
            TransformerBlock(cfg.d_model, cfg.num_heads, cfg.d_ff, cfg.context_length, theta, norm=cfg.norm,
                             norm_position=cfg.norm_position, norm_eps=cfg.norm_eps,
                             layernorm_bias=cfg.layernorm_bias, ffn=cfg.ffn, dropout=cfg.dropout,
                             attention_backend=cfg.attention_backend, bias=cfg.bias, **dd)
            for _ in range(cfg.num_layers)
        )
        self.ln_final = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.layernorm_bias, **dd)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, **dd)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.token_embeddings.weight
        self._init_special()  # the layers above initialized themselves the cs336 way

    # -- init --
    def reset_parameters(self) -> None:
        """cs336: Linear N(0, 2/(in+out)), Embedding N(0, 1), all cut at 3 std. gpt2: N(0, 0.02) everywhere,
        with output_proj and w2 (the projections that write into the residual stream) scaled by
        1/sqrt(2 num_layers). Norms start at weight 1, bias 0. A tied matrix gets the LM head's init
        in cs336 mode (an N(0, 1) head would give logits of size sqrt(d_model) at step 0).
        """
        for m in self.modules():
            if isinstance(m, (Linear, Embedding)):
                m.reset_parameters()
            elif isinstance(m, (RMSNorm, LayerNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        self._init_special()

    def _init_special(self) -> None:
        cfg = self.config
        if cfg.init == "gpt2":
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = 0.02
                    if name.endswith(("output_proj.weight", "w2.weight")):
                        std = 0.02 / math.sqrt(2 * cfg.num_layers)
                    _trunc_normal_(p, std)
        elif cfg.tie_embeddings:
            self.lm_head.reset_parameters()  # the shared matrix gets the head's init

    # -- caches --
    def setup_caches(self, batch_size: int, max_seq_len: int | None = None, device=None, dtype=None) -> None:
        """Allocate a KVCache per layer for up to `batch_size` sequences of `max_seq_len` (<= context_length)."""
        max_seq_len = max_seq_len or self.config.context_length
        if max_seq_len > self.config.context_length:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds context_length {self.config.context_length}")
        ref = self.lm_head.weight
        device = device or ref.device
        dtype = dtype or ref.dtype
        for layer in self.layers:
            a = layer.attn
            a.kv_cache = KVCache(batch_size, a.num_heads, max_seq_len, a.head_dim, device=device, dtype=dtype)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attn.kv_cache = None

    # -- forward --
    def forward(self, token_ids: Tensor, start_pos: int = 0, pad: Tensor | None = None) -> Tensor:
        """token_ids (B, T) with T <= context_length - start_pos -> logits (B, T, vocab_size).

        `pad` (B,) ints: left padding for batches of prompts of different lengths. Row b's first
        `pad[b]` columns are padding: its tokens sit at positions 0, 1, ... from column pad[b] on,
        and no query attends to a padding column (a padding query sees only itself, so it stays
        finite; its logits mean nothing). Columns count from the start of the KV cache.
        """
        T = token_ids.shape[-1]
        if start_pos + T > self.config.context_length:
            raise ValueError(f"positions {start_pos}..{start_pos + T - 1} exceed context_length "
                             f"{self.config.context_length}")
        x = self.token_embeddings(token_ids)  # (B, T, d)
        positions = torch.arange(start_pos, start_pos + T, device=token_ids.device)  # (T,)
        attn_mask = None
        if pad is not None:
            cols = positions  # the columns of these queries
            keys = torch.arange(start_pos + T, device=token_ids.device)  # (S,) the columns of all keys
            pad = pad.to(token_ids.device).view(-1, 1, 1)  # (B, 1, 1)
            attn_mask = (keys <= cols[:, None]) & ((keys >= pad) | (keys == cols[:, None]))  # (B, T, S)
            attn_mask = attn_mask.unsqueeze(1)  # (B, 1, T, S): the same for every head
            positions = (cols - pad[:, :, 0]).clamp_min(0)  # (B, T)
        if self.config.pos_emb == "learned":
            x = x + self.position_embeddings(positions)
        elif self.config.pos_emb == "sinusoidal":
            x = x + self.sinusoidal[positions].to(x.dtype)
        x = dropout(x, self.config.dropout, self.training)
        rope_pos = positions if self.config.pos_emb == "rope" else None
        for layer in self.layers:
            x = layer(x, rope_pos, start_pos, attn_mask)
        return self.lm_head(self.ln_final(x))

    def num_parameters(self) -> int:
        """Distinct parameters (a tied matrix counts once), as `account.parameter_counts` reports."""
        return sum(p.numel() for p in self.parameters())
