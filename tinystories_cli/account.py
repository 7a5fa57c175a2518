"""Accounting for a `ModelConfig`: parameters, FLOPs, AdamW training memory and training time.

Pure functions of the config (no I/O, no torch) except `measure_activation_bytes`, which builds
the real model to check the activation estimate against what autograd actually keeps.

Conventions (the seeds' conventions, so their tables are reproduced exactly):
- a matrix product (m x n)(n x p) costs 2mnp FLOPs; only matrix products are counted;
- attention is counted over the full (T x T) score matrix (no causal halving);
- backward costs 2x forward, so one training step costs 3x forward;
- AdamW keeps two fp32 moments per parameter; Muon one momentum buffer per matrix it updates.

Worked example (GPT-2 small shape, the seeds' table):

>>> from tinystories_cli.config import PRESETS
>>> parameter_counts(PRESETS["gpt2-small"].model)["total"]
190460160
>>> round(forward_flops(PRESETS["gpt2-small"].model, seq_len=1024)["total"] / 1e9, 3)
349.63
"""

from __future__ import annotations

import math
import os
import re
import weakref

from tinystories_cli.config import ModelConfig
from tinystories_cli.console import human_bytes, human_count
from tinystories_cli.errors import UserError

FP32 = 4


def _norm_params(cfg: ModelConfig) -> int:
    if cfg.norm == "none":
        return 0
    if cfg.norm == "layernorm":
        return 2 * cfg.d_model if cfg.layernorm_bias else cfg.d_model
    return cfg.d_model


def ffn_matrices(cfg: ModelConfig) -> int:
    """SwiGLU has three d_model x d_ff matrices (w1, w2, w3); the plain FFNs have two."""
    return 3 if cfg.ffn == "swiglu" else 2


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by component. `total` equals `sum(p.numel() for p in TransformerLM(cfg).parameters())`."""
    d, V = cfg.d_model, cfg.vocab_size
    attention = 4 * d * d + (4 * d if cfg.bias else 0)  # W_Q, W_K, W_V, W_O (+ their biases with `bias`)
    ffn = ffn_matrices(cfg) * d * cfg.d_ff + ((ffn_matrices(cfg) - 1) * cfg.d_ff + d if cfg.bias else 0)
    norms = 2 * _norm_params(cfg)
    layer = attention + ffn + norms
    counts = {
        "token_embedding": V * d,
        "position_embedding": cfg.context_length * d if cfg.pos_emb == "learned" else 0,
        "attention_per_layer": attention,
        "ffn_per_layer": ffn,
        "norms_per_layer": norms,
        "layer": layer,
        "layers": cfg.num_layers * layer,
        "final_norm": _norm_params(cfg),
        "lm_head": 0 if cfg.tie_embeddings else V * d,
    }
    counts["total"] = (
        counts["token_embedding"]
        + counts["position_embedding"]
        + counts["layers"]
        + counts["final_norm"]
        + counts["lm_head"]
    )
    return counts


FLOP_COMPONENTS = ("qkv_projections", "attention_scores", "attention_weighted", "output_projection", "ffn", "lm_head")


def forward_flops(cfg: ModelConfig, seq_len: int | None = None, batch_size: int = 1) -> dict[str, int]:
    """Forward-pass matmul FLOPs by component for `batch_size` sequences of `seq_len` tokens."""
    T = seq_len or cfg.context_length
    d, L = cfg.d_model, cfg.num_layers
    per_layer = {
        "qkv_projections": 3 * 2 * T * d * d,
        # per head (T x hd)(hd x T), summed over heads = 2 T^2 d
        "attention_scores": 2 * T * T * d,
        "attention_weighted": 2 * T * T * d,
        "output_projection": 2 * T * d * d,
        "ffn": ffn_matrices(cfg) * 2 * T * d * cfg.d_ff,
    }
    flops = {k: batch_size * L * v for k, v in per_layer.items()}
    flops["lm_head"] = batch_size * 2 * T * d * cfg.vocab_size
    flops["total"] = sum(flops[k] for k in FLOP_COMPONENTS)
    return flops


def train_flops_per_step(cfg: ModelConfig, batch_size: int, seq_len: int | None = None) -> int:
    """Forward + backward (2x forward) for one optimizer step of `batch_size` sequences."""
    return 3 * forward_flops(cfg, seq_len, batch_size)["total"]


# --- memory -----------------------------------------------------------------------------------

def activation_bytes(cfg: ModelConfig, batch_size: int, seq_len: int | None = None, bytes_per_el: int = FP32,
                     activation_checkpointing: bool = False) -> dict[str, int]:
    """Bytes of activations autograd keeps for backward in this project's `TransformerLM` (one training
    step with cross-entropy), counted tensor by tensor as `tinystories_cli.model` saves them and checked
    against `measure_activation_bytes` (within 10%, tests/test_account_measure.py).

    Describes the from-scratch attention (`attention_backend` "reference", and "auto", as the
    conservative bound that also holds for the seeds' accounting), which keeps the (B, h, T, T)
    exp-scores and probabilities; with `attention_backend="sdpa"` the fused kernel keeps only its
    output and a (B, h, T) log-sum-exp instead. Per layer, in units of B*T*d_model elements:
    the attention input, q, k, v and the output fed to W_O (5, also with sdpa); the FFN input
    (1) plus the d_ff-wide tensors its activation keeps (SwiGLU 5, SiLU 3, GELU 4, ReLU 2; with sdpa's
    fused SiLU, SwiGLU 4 and SiLU 2); each norm
    keeps its input (or centered input) and normalized value (2) and a per-row 1/rms; with dropout > 0
    every dropout site adds its keep-mask (embeddings 1, each residual branch 1, attention probabilities
    one more (B, h, T, T)). Then the final norm, the LM-head input and, for the loss, one (B, T, V)
    tensor of exp(logits - max).

    With `activation_checkpointing` each block keeps only its input (B*T*d_model) through the forward, and
    the backward recomputes one block at a time: the layers then cost `num_layers` inputs plus one
    layer's activations (a slight overcount: that layer's recompute happens after the loss's tensors
    are freed).
    """
    B, T = batch_size, seq_len or cfg.context_length
    d, h, dff, V = cfg.d_model, cfg.num_heads, cfg.d_ff, cfg.vocab_size
    n, be = B * T, bytes_per_el
    btd = n * d * be
    sdpa = cfg.attention_backend == "sdpa"
    dropout = cfg.dropout > 0
    norm_bytes = 0 if cfg.norm == "none" else 2 * btd + n * FP32  # input (or centered) + normalized, 1/rms
    if sdpa:
        # q, k, v, the kernel output (+ its log-sum-exp) and the input; the output comes back in the
        # (B, T, h, hs) layout of q, so flattening it for W_O is a view, not a copy
        attention = 5 * btd + B * h * T * FP32
    else:
        scores = B * h * T * T * be
        attention = 5 * btd + (3 if dropout else 2) * scores + B * h * T * be + T * T  # + row sums, bool mask
    if cfg.pos_emb == "rope":
        attention += 4 * T * (cfg.head_dim // 2) * be  # cos/sin rows gathered for q and for k
    ffn_units = {"swiglu": 5, "silu": 3, "gelu": 4, "relu": 2}[cfg.ffn]
    if sdpa and cfg.ffn in ("swiglu", "silu"):
        ffn_units -= 1  # the fused SiLU of the non-reference path keeps only its input
    ffn = btd + ffn_units * n * dff * be
    per_layer = attention + ffn + 2 * norm_bytes + (2 * btd if dropout else 0)
    out = {
        "embedding": n * 8 + (T * 8 if cfg.pos_emb == "learned" else 0) + (btd if dropout else 0),
        "per_layer": per_layer,
        "layers": cfg.num_layers * per_layer,
        "final_norm": norm_bytes,
        "lm_head_input": btd,
        "logits": n * V * be + n * FP32 + 2 * n * 8,  # exp(logits - max), row sums, target indices
    }
    if activation_checkpointing:
        out["checkpointed_inputs"] = cfg.num_layers * btd
        out["recomputed_layer"] = per_layer
        out["layers"] = out["checkpointed_inputs"] + per_layer
    out["total"] = out["embedding"] + out["layers"] + out["final_norm"] + out["lm_head_input"] + out["logits"]
    return out


def measure_activation_bytes(cfg: ModelConfig, batch_size: int, seq_len: int | None = None,
                             activation_checkpointing: bool = False) -> int:
    """Bytes autograd actually keeps for backward: build `TransformerLM(cfg)` on CPU, run one training
    forward (cross-entropy loss included) and backward, and add up the tensors saved for backward.

    Saved tensors are counted once per storage (views of one buffer count once); parameters and
    buffers are excluded (they are counted as parameters); tensors saved by graph nodes that are
    freed before the backward (e.g. by ops on detached values) are not counted. With
    `attention_backend="auto"` the reference attention is measured, the path `activation_bytes`
    describes. Meant for small configs: it allocates the real activations.

    With `activation_checkpointing` the blocks run under non-reentrant `torch.utils.checkpoint`, as
    `tslm train --activation-checkpointing` runs them: what the forward saves outside the blocks, plus
    the block inputs the checkpoints hold, plus what one block saves when the backward reruns it.
    """
    import torch  # only for --measure: `tslm account` itself needs no torch

    from tinystories_cli.model import TransformerLM, cross_entropy

    T = seq_len or cfg.context_length
    if cfg.attention_backend == "auto":
        cfg = cfg.model_copy(update={"attention_backend": "reference"})
    torch.manual_seed(0)
    model = TransformerLM(cfg).train()
    saved = _SavedTensors(model)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, T + 1))
    block_inputs: dict[int, int] = {}
    layer_bytes = 0
    if activation_checkpointing:
        _checkpoint_blocks(model, block_inputs)
        # one block's own saved tensors, as its recompute in the backward keeps them
        x = torch.randn(batch_size, T, cfg.d_model, requires_grad=True)
        pos = torch.arange(T) if cfg.pos_emb == "rope" else None
        with saved.hooks():
            y = type(model.layers[0]).forward(model.layers[0], x, pos)
        layer_bytes = sum(v for k, v in saved.live_bytes().items() if k != x.untyped_storage().data_ptr())
        del y
        saved.handles.clear()
    with saved.hooks():
        loss = cross_entropy(model(ids[:, :-1]), ids[:, 1:])
    sizes = {**saved.live_bytes(), **block_inputs}
    loss.backward()
    return sum(sizes.values()) + layer_bytes


class _Saved:  # a handle per saved tensor; it dies with the graph node that holds it
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


class _SavedTensors:
    """The tensors autograd saves for backward while `hooks()` is active, by storage; the model's own
    parameters and buffers are left out."""

    def __init__(self, model):
        self.owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.handles: list[weakref.ref] = []

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda h: h.t)

    def _pack(self, t) -> _Saved:
        h = _Saved(t)
        self.handles.append(weakref.ref(h))
        return h

    def live_bytes(self) -> dict[int, int]:
        """{storage: bytes} of the saved tensors whose graph nodes are still alive."""
        sizes: dict[int, int] = {}
        for ref in self.handles:
            h = ref()
            if h is not None and h.t.untyped_storage().data_ptr() not in self.owned:
                sizes[h.t.untyped_storage().data_ptr()] = h.t.untyped_storage().nbytes()
        return sizes


def _checkpoint_blocks(model, block_inputs: dict[int, int]) -> None:
    """Run each block under non-reentrant checkpointing, recording the input it holds in `block_inputs`."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        def forward(x, *args, _inner=block.forward):
            block_inputs[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return checkpoint(_inner, x, *args, use_reentrant=False)

        block.forward = forward


PEAK_TFLOPS = {"float32": 156.0, "bfloat16": 312.0, "float16": 312.0}  # A100 dense: TF32 (float32 under
# `tslm train`, which sets "high" matmul precision on CUDA), bf16, fp16


def peak_tflops_for(dtype: str) -> float:
    """The A100 peak of the precision `tslm train --dtype DTYPE` computes in on a CUDA GPU (auto = bfloat16)."""
    return PEAK_TFLOPS["bfloat16" if dtype == "auto" else dtype]


def muon_parameters(cfg: ModelConfig) -> int:
    """Parameters that `--optimizer muon` updates with Muon: the hidden 2-D matrices (attention's four
    projections and the FFN's matrices of every block, biases excluded); the rest stays on AdamW.

    >>> from tinystories_cli.config import PRESETS
    >>> cfg = PRESETS["tinystories-17m"].model
    >>> muon_parameters(cfg) == cfg.num_layers * (4 * cfg.d_model ** 2 + 3 * cfg.d_model * cfg.d_ff)
    True
    """
    return cfg.num_layers * (4 * cfg.d_model * cfg.d_model + ffn_matrices(cfg) * cfg.d_model * cfg.d_ff)


def training_memory(cfg: ModelConfig, batch_size: int, seq_len: int | None = None, *,
                    activation_checkpointing: bool = False, parallel: str = "ddp", world_size: int = 1,
                    dtype: str = "float32", optimizer: str = "adamw") -> dict[str, int]:
    """Training memory of one process: parameters + gradients + optimizer state (fp32) + activations.

    The optimizer state is AdamW's two moments per parameter, or with `optimizer="muon"` one momentum
    buffer per Muon matrix (`muon_parameters`) and AdamW's two moments for the rest.

    With `parallel="fsdp"` parameters, gradients and moments are sharded over `world_size` ranks, while
    activations stay whole (each rank runs its own micro-batch), and the gathers add buffers: the root unit
    (embeddings, final norm, LM head) for the forward, two blocks (the one computing and the one prefetched)
    in the compute dtype, and one block's unsharded gradients in fp32 before their reduce-scatter.
    """
    if optimizer == "muon" and parallel == "fsdp":
        raise ValueError("`optimizer` muon needs whole matrices and cannot run with `parallel` fsdp: use ddp, or adamw")
    counts = parameter_counts(cfg)
    p = counts["total"]
    shard = math.ceil(p / world_size) if parallel == "fsdp" else p
    mem = {
        "parameters": shard * FP32,
        "gradients": shard * FP32,
        "optimizer_state": (2 * shard - (muon_parameters(cfg) if optimizer == "muon" else 0)) * FP32,
        "activations": activation_bytes(cfg, batch_size, seq_len,
                                         activation_checkpointing=activation_checkpointing)["total"],
    }
    if parallel == "fsdp":
        compute_bytes = 2 if dtype in ("auto", "bfloat16", "float16") else FP32
        block, root = counts["layer"], p - counts["layers"]
        mem["gather_buffers"] = (root + 2 * block) * compute_bytes + block * FP32
    mem["total"] = sum(mem.values())
    return mem


def max_batch_size(cfg: ModelConfig, memory_bytes: int, seq_len: int | None = None, **setup) -> int:
    """Largest (micro-)batch per process whose training memory fits `memory_bytes` (0 when not even batch 1
    fits); `setup` as for `training_memory`."""
    fixed = training_memory(cfg, 1, seq_len, **setup)
    per_sample = fixed["activations"]
    free = memory_bytes - (fixed["total"] - per_sample)
    return max(0, free // per_sample)


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


def parse_memory(text: str) -> int:
    """Parse a memory size. GB and GiB both mean 2^30 bytes, as GPU vendors label cards.

    >>> parse_memory("80GB"), parse_memory("512 MiB"), parse_memory("1.5T")
    (85899345920, 536870912, 1649267441664)
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(f"cannot read memory size {text!r}",
                        "use a positive number with a unit, e.g. 80GB, 24GiB, 512MB")
    return int(float(m.group(1)) * _UNITS[unit])


def training_time_seconds(total_flops: float, peak_tflops: float, mfu: float) -> float:
    return total_flops / (peak_tflops * 1e12 * mfu)


def report(
    cfg: ModelConfig,
    *,
    batch_size: int,
    steps: int | None = None,
    tokens: int | None = None,
    memory: int | None = None,
    peak_tflops: float | None = None,
    mfu: float = 0.5,
    dtype: str = "auto",
    activation_checkpointing: bool = False,
    parallel: str = "ddp",
    world_size: int = 1,
    optimizer: str = "adamw",
) -> dict:
    """Every figure `tslm account` shows, as one JSON-ready dict. Memory is per process; `batch_size` is
    the micro-batch of one process (FLOPs and time count all `world_size` processes). `peak_tflops`
    defaults to the A100 peak of `dtype` (`peak_tflops_for`)."""
    setup = {"activation_checkpointing": activation_checkpointing, "parallel": parallel,
             "world_size": world_size, "dtype": dtype, "optimizer": optimizer}
    peak_tflops = peak_tflops_for(dtype) if peak_tflops is None else peak_tflops
    T = cfg.context_length
    if tokens is not None:
        steps = math.ceil(tokens / (batch_size * T * world_size))
    step_flops = train_flops_per_step(cfg, batch_size)
    fwd = forward_flops(cfg, T)
    params = parameter_counts(cfg)
    out = {
        "config": cfg.model_dump(),
        "parameters": params | {"bytes_fp32": params["total"] * 4, "bytes_bf16": params["total"] * 2},
        "forward_flops": fwd,
        "forward_flops_share": {k: fwd[k] / fwd["total"] for k in FLOP_COMPONENTS},
        "training": {
            "batch_size": batch_size,
            "seq_len": T,
            "tokens_per_step": batch_size * T,
            "flops_per_step": step_flops,
            "flops_per_token": step_flops / (batch_size * T),
        },
        "memory": training_memory(cfg, batch_size, **setup),
        "activations": activation_bytes(cfg, batch_size, activation_checkpointing=activation_checkpointing),
        "setup": setup,
    }
    if memory is not None:
        out["memory"]["budget"] = memory
        out["memory"]["max_batch_size"] = max_batch_size(cfg, memory, **setup)
    if steps is not None:
        total = step_flops * steps * world_size
        recompute = 4 / 3 if activation_checkpointing else 1.0  # the backward reruns each block's forward
        out["time"] = {
            "steps": steps,
            "tokens": steps * batch_size * T * world_size,
            "total_flops": total,
            "peak_tflops": peak_tflops,
            "mfu": mfu,
            "devices": world_size,
            "recompute_factor": recompute,
            "seconds": training_time_seconds(total, peak_tflops, mfu) / world_size * recompute,
        }
    return out


def host_memory_bytes() -> int:
    """This machine's physical memory (what a CPU process could at most use)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits_in_memory(cfg: ModelConfig, what: str, bytes_per_param: int = FP32,
                         available: int | None = None) -> None:
    """Refuse (one line) a model whose weights alone exceed this machine's memory, before allocating them.

    >>> check_fits_in_memory(ModelConfig(d_model=8192, num_layers=512, num_heads=64), "a crafted model",
    ...                      available=2**34)
    Traceback (most recent call last):
    tinystories_cli.errors.UserError: a crafted model has 413.026B parameters: its weights alone need 1.50 TiB, more than this machine's 16.00 GiB (use a smaller model, or a machine with more memory)
    """  # noqa: E501 (a doctest's expected one-line error message)
    n = parameter_counts(cfg)["total"]
    have = host_memory_bytes() if available is None else available
    if n * bytes_per_param > have:
        raise UserError(f"{what} has {human_count(n)} parameters: its weights alone need "
                        f"{human_bytes(n * bytes_per_param)}, more than this machine's {human_bytes(have)}",
                        "use a smaller model, or a machine with more memory")
    tables = position_table_bytes(cfg)
    if n * bytes_per_param + tables > have:
        raise UserError(f"{what} (context {cfg.context_length:,}, {cfg.num_layers} layers, width {cfg.d_model}) needs "
                        f"{human_bytes(n * bytes_per_param + tables)} for its weights and position tables "
                        f"({human_bytes(tables)} of them tables), more than this machine's {human_bytes(have)}",
                        "use a shorter context length, or a machine with more memory")


def position_table_bytes(cfg: ModelConfig) -> int:
    """Host memory the position tables of `TransformerLM(cfg)` take while it is built: RoPE's cos and sin
    (context x head_dim, float32, in every layer, plus the float64 temporaries one layer's tables are computed in),
    or the sinusoidal table (context x d_model). They scale with the declared context, not with the weights.

    >>> position_table_bytes(ModelConfig(context_length=1 << 20, d_model=256, num_layers=64, num_heads=4))
    35970351104
    """
    ctx = cfg.context_length
    if cfg.pos_emb == "rope":
        head_dim = cfg.d_model // cfg.num_heads
        return cfg.num_layers * 2 * ctx * head_dim * FP32 + 3 * ctx * head_dim * 8
    if cfg.pos_emb == "sinusoidal":
        return ctx * cfg.d_model * FP32
    return 0
