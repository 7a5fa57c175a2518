"""Sampling from a trained `TransformerLM`: temperature, top-k, top-p, a KV cache, batches, streaming.

The loop is gpt-fast shaped: three small steps that can each be compiled on their own,

    prefill(model, ids, pos)            one forward over the prompt; fills the KV cache
    decode_one_token(model, tok, pos)   one forward over one new token per row; reads/extends the cache
    sample(logits, noise, ...)          temperature -> top-k -> top-p -> one id per row

and a driver (`generate_batch`) that owns the cache, the random streams, stop conditions and the
context window. `generate_tokens` / `generate` are the batch-1 library API:

    >>> ids = list(generate_tokens(model, tok.encode("Once upon a time"), max_new_tokens=50, seed=0))  # doctest: +SKIP
    >>> generate(model, tok, "Once upon a time", max_new_tokens=50, temperature=0)                    # doctest: +SKIP
    ', there was a little girl named Lily...'

Sampling rules (each one is unit-tested in tests/test_generate.py):

- `temperature == 0` is greedy (argmax); otherwise logits are divided by the temperature.
- `top_k > 0` keeps the k highest logits; tokens tied with the k-th are kept too (so the result
  never depends on how a sort breaks ties). `top_k == 0` keeps everything.
- `top_p < 1` keeps the nucleus: the smallest set of most-likely tokens whose probability mass
  reaches p (within 1e-6, so float rounding cannot add a token), plus any token tied with the
  least likely member. It always keeps at least the most likely token. Applied after top-k, on the
  temperature-scaled distribution, as in Hugging Face's samplers.
- Randomness: row r of a batch has its own `torch.Generator` seeded with `seed + r`, and each step
  draws exactly one exponential variate per vocabulary entry from it (the "exponential race":
  argmax(p / E) with E ~ Exp(1) is a draw from p, with no host sync). So sample r of
  `--num-samples N --seed S` is exactly the single sample of `--seed S+r`.

Context window: positions run from 0 to `context_length - 1`. When a row's text fills the context
the window slides: the oldest half is dropped, the newest `context_length // 2` tokens are
re-prefilled into a fresh cache at positions 0.., and decoding continues (the llama.cpp
"context shift" policy: one prefill every `context_length // 2` tokens, so the cost stays
amortised O(1) per token). A prompt longer than the context keeps only its last
`context_length - 1` tokens (the report says how many were dropped). An empty prompt starts
from `<|endoftext|>`, the document separator the model was trained on.
"""

from __future__ import annotations

import codecs
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

# Float tolerance for "mass reaches p": a token is outside the nucleus when the tokens before it
# already hold at least p - TOP_P_TOL. Softmax in float32 rounds sums at ~1e-7.
TOP_P_TOL = 1e-6


# ---------------------------------------------------------------------------------------------
# Sampling: pure functions of logits (and, for randomness, pre-drawn noise)
# ---------------------------------------------------------------------------------------------


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Set every logit below the k-th largest (per row) to -inf; ties with the k-th survive.

    >>> top_k_filter(torch.tensor([[1.0, 3.0, 2.0, 3.0]]), 1).tolist()
    [[-inf, 3.0, -inf, 3.0]]
    """
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the nucleus: the fewest most-likely tokens whose probability reaches `p` (+ ties).

    >>> top_p_filter(torch.tensor([[0.5, 0.3, 0.2]]).log(), 0.8).exp().tolist()
    [[0.5, 0.30000001192092896, 0.0]]
    """
    if p >= 1.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_p, _ = torch.sort(probs, dim=-1, descending=True)  # (B, V)
    # float64 cumulative mass of the tokens strictly before each one (an exclusive cumsum)
    before = sorted_p.double().cumsum(-1) - sorted_p.double()
    keep_sorted = before < (p - TOP_P_TOL)
    keep_sorted[..., 0] = True  # never an empty set
    n_keep = keep_sorted.sum(-1, keepdim=True)  # (B, 1); kept tokens are a prefix of the sort
    threshold = sorted_p.gather(-1, n_keep - 1)  # the least likely kept probability
    return logits.masked_fill(probs < threshold, float("-inf"))  # ">= threshold" keeps ties


def logits_to_probs(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """The sampling distribution (B, V) after temperature, top-k and top-p (temperature > 0)."""
    logits = logits.float() / max(temperature, 1e-5)
    logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    return torch.softmax(logits, dim=-1)


def draw_noise(generators: Sequence[torch.Generator], vocab_size: int, device: torch.device | str = "cpu") -> Tensor:
    """(B, V) Exp(1) variates, row r from `generators[r]` (so rows are independent streams)."""
    noise = torch.empty(len(generators), vocab_size, device=device)
    for r, g in enumerate(generators):
        noise[r].exponential_(1.0, generator=g)
    return noise


def sample(logits: Tensor, noise: Tensor | None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """One token id per row from logits (B, V). `noise` is (B, V) Exp(1) (unused when greedy).

    argmax(p / E) with E_i ~ Exp(1) i.i.d. picks token i with probability p_i (the "exponential
    race"); tokens filtered out have p = 0 and can never win.

    >>> sample(torch.tensor([[0.0, 2.0, 1.0]]), None, temperature=0).tolist()
    [1]
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return torch.argmax(probs / noise, dim=-1)


def make_generators(seed: int, n: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per row, seeded seed, seed + 1, ... (row r == a single run with seed + r)."""
    gens = []
    for r in range(n):
        g = torch.Generator(device=device)
        g.manual_seed(seed + r)
        gens.append(g)
    return gens


def random_seed() -> int:
    """A fresh seed when the user gave none (reported, so any sample can be reproduced)."""
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def check_sampling_args(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    """Raise UserError for values outside their ranges (shared by the library API and the CLI)."""
    from tinystories_cli.errors import UserError

    if max_new_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_new_tokens}")
    if not temperature >= 0:  # also rejects NaN
        raise UserError(f"--temp must be >= 0 (0 means greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 disables it), got {top_k}")
