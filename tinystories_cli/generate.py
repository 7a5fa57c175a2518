"""Sampling from a trained `TransformerLM`: temperature, top-k, top-p, a KV cache, batches, streaming.

The loop is gpt-fast shaped: three small steps that can each be compiled on their own,

    prefill(model, ids, pos)            one forward over the prompt; fills the KV cache
    decode_one_token(model, tok, pos)   one forward over one new token per row; reads/extends the cache
    sample(logits, noise, ...)          temperature -> top-k -> top-p -> one id per row

and a driver (`BatchDecoder`) that owns the cache, the random streams, stop conditions and the
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
`context_length` tokens (`Sample.prompt_dropped` and the CLI's summary say how many were cut).
An empty prompt starts from `<|endoftext|>`, the document separator the model was trained on.

Batches of different prompts: shorter prompts are left-padded to the longest. The model gets the
padding per row (`TransformerLM.forward(..., pad=)`): each row's positions start at 0 at its first
real token, and no query attends to a padding column, so a row decodes exactly as it would alone
(tested against single runs). The rows share the window's columns, padding included, so in a batch
every row slides when the longest one fills the context.
"""

from __future__ import annotations

import codecs
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from tinystories_cli import fastpath
from tinystories_cli.account import host_memory_bytes
from tinystories_cli.config import setting
from tinystories_cli.console import human_bytes
from tinystories_cli.errors import UserError

# Float tolerance for "mass reaches p": a token is outside the nucleus when the tokens before it
# already hold at least p - TOP_P_TOL. Softmax in float32 rounds sums at ~1e-7.
TOP_P_TOL = 1e-6
# Candidates examined before falling back to sorting the whole vocabulary in top-p.
TOP_P_CANDIDATES = 128
# prompts (rows x tokens) longer than this prefill with one batched fp32 torch forward on the fast path
FAST_PREFILL_MAX_TOKENS = 16
# greedy steps the fast path runs inside the kernel between two returns to Python (streaming comes in
# bursts of up to this many tokens; the ids are the same as one step at a time)
GREEDY_CHUNK = 16


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

    >>> (top_p_filter(torch.tensor([[0.5, 0.3, 0.2]]).log(), 0.8) > float("-inf")).tolist()
    [[True, True, False]]
    """
    if p >= 1.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    # Fast path: when the TOP_P_CANDIDATES most likely tokens already hold mass p in every row (a
    # trained model, usually), the nucleus lies among them and a top-k replaces the full sort.
    k = min(TOP_P_CANDIDATES, probs.size(-1))
    sorted_p = torch.topk(probs, k, dim=-1).values  # (B, k), descending
    if k == probs.size(-1) or bool((sorted_p.double().sum(-1) < p).any()):
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
    return noise.clamp_min_(1e-30)  # a variate of exactly 0 would turn p / E into inf or nan


def sample(logits: Tensor, noise: Tensor | None, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> Tensor:
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


MAX_SEED = 2**63 - 2**31  # room for seed + sample index inside torch's seed range


def check_batch_fits(cfg, rows: int, available: int | None = None) -> None:
    """Refuse (ValueError) a batch whose KV cache and logits would not fit in memory, before allocating them.

    >>> from tinystories_cli.config import ModelConfig
    >>> check_batch_fits(ModelConfig(), 10**9, available=2**34)
    Traceback (most recent call last):
    ValueError: `num_samples` x prompts = 1000000000 rows need 3887.46 TiB for the KV cache and logits, more than this machine's 16.00 GiB
    """  # noqa: E501 (a doctest's expected one-line output)
    need = rows * 4 * (cfg.num_layers * 2 * cfg.context_length * cfg.d_model + 2 * cfg.vocab_size)
    have = host_memory_bytes() if available is None else available
    if need > have:
        raise ValueError(f"`num_samples` x prompts = {rows} rows need {human_bytes(need)} for the KV cache and "
                         f"logits, more than this machine's {human_bytes(have)}")


class SamplingSettings(BaseModel):
    """The sampling settings of `generate_samples`, each declared once: its description is its `tslm generate` --help.

    >>> SamplingSettings().model_dump()
    {'max_new_tokens': 256, 'temperature': 1.0, 'top_p': 1.0, 'top_k': 0, 'seed': None, 'num_samples': 1}
    """

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = setting(256, "At most this many new tokens per sample.", flags=("--max-tokens",))
    temperature: float = setting(1.0, "Temperature; 0 means greedy.", flags=("--temp", "--temperature"))
    top_p: float = setting(1.0, "Nucleus sampling mass in (0, 1]; 1 disables it.")
    top_k: int = setting(0, "Keep the k most likely tokens; 0 disables it.")
    seed: int | None = setting(None, "Random seed (default: a fresh one, reported); sample i uses seed + i.")
    num_samples: int = setting(1, "Samples per prompt, generated as one batch.", flags=("--num-samples", "-n"))


def check_sampling_args(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    """Raise ValueError, naming the parameter, for values outside their ranges.

    >>> check_sampling_args(1, -1.0, 1.0, 0)
    Traceback (most recent call last):
    ValueError: `temperature` must be >= 0 (0 means greedy), got -1.0
    """
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}")
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"`temperature` must be >= 0 (0 means greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"`top_k` must be >= 0 (0 disables it), got {top_k}")


# ---------------------------------------------------------------------------------------------
# The model steps (gpt-fast shaped; each one is a plain function that torch.compile can take)
# ---------------------------------------------------------------------------------------------


def _forward(model, ids: Tensor, start_pos: int, pad: Tensor | None) -> Tensor:
    # `pad` only when there is padding, so any model taking (ids, start_pos=) can be driven
    logits = model(ids, start_pos=start_pos) if pad is None else model(ids, start_pos=start_pos, pad=pad)
    return logits[:, -1]


def prefill(model, ids: Tensor, start_pos: int = 0, pad: Tensor | None = None) -> Tensor:
    """Forward the prompt ids (B, T) at columns start_pos.. (filling the cache when one is set up);
    returns the logits of the last column (B, V). `pad` (B,): left padding per row (see
    `TransformerLM.forward`)."""
    return _forward(model, ids, start_pos, pad)


def decode_one_token(model, token: Tensor, pos: int, pad: Tensor | None = None) -> Tensor:
    """Forward one token per row, token (B, 1) at column `pos`, reading the cache for columns
    0..pos-1; returns the next-token logits (B, V)."""
    return _forward(model, token, pos, pad)


def full_forward(model, window: Tensor, pad: Tensor | None = None) -> Tensor:
    """The uncached step: recompute the whole window (B, n) from scratch; logits of its last column."""
    return _forward(model, window, 0, pad)


# ---------------------------------------------------------------------------------------------
# The driver: a batch of prompts (left-padded to one length), one random stream per row
# ---------------------------------------------------------------------------------------------

# why a row stopped
EOT, STOP_TOKEN, STOP_STRING, MAX_TOKENS = "end_of_text", "stop_token", "stop_string", "max_tokens"


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model always has parameters
        return torch.device("cpu")


class BatchDecoder:
    """Decode B rows at once. Prompts of different lengths are left-padded to the longest: each row
    keeps its own positions (its first token at position 0) and never attends to its padding, so a
    row decodes as it would alone. The rows share one window of `context_length` columns, padding
    included: when the longest row fills it, every row slides at once.

    Iterating yields, per step, a list of B entries: the new id of each live row, or None for a
    row that has finished (a stop id ends a row and is not yielded). A consumer may end a row
    early with `finish(r, reason)` (stop strings). After iteration `stop_reasons`, `new_tokens`,
    `finish_times` and `context_shifts` describe what happened.

    >>> dec = BatchDecoder(model, [[1, 2, 3]] * 2, seeds=[0, 1], max_new_tokens=5)    # doctest: +SKIP
    >>> [step for step in dec]                                                         # doctest: +SKIP
    [[17, 4], [9, 4], ...]
    """

    def __init__(
        self,
        model,
        prompts: Sequence[Sequence[int]],
        *,
        seeds: Sequence[int] | None,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop_ids: Sequence[int] | None = None,
        eot_id: int | None = None,
        use_cache: bool = True,
        allowed_vocab: int | None = None,
        engine: str = "auto",
        precision: str = "fp32",
    ):
        check_sampling_args(max_new_tokens, temperature, top_p, top_k)
        # the decode path: the C kernel (fastpath) where it runs, else the torch model; `engine_note`
        # says why "auto" fell back to torch
        self.fast, self.engine_note = fastpath.select(model, engine, precision, use_cache=use_cache)
        self.precision = precision
        if not prompts or not all(len(p) for p in prompts):
            raise ValueError("BatchDecoder needs >= 1 non-empty prompts")
        cfg = model.config
        self.model, self.ctx, self.vocab_size = model, cfg.context_length, cfg.vocab_size
        for p in prompts:
            bad = [i for i in p if not 0 <= i < self.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the model's vocabulary (0..{self.vocab_size - 1})")
        self.batch_size = len(prompts)
        # a prompt longer than the context keeps its last context_length tokens
        self.prompt_dropped = [max(0, len(p) - self.ctx) for p in prompts]
        self.prompts = [list(p[-self.ctx:]) for p in prompts]
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.stop_ids = set(stop_ids or ())
        self.eot_id = eot_id
        self.use_cache = use_cache
        # ids a tokenizer smaller than the model's vocabulary could not decode are never sampled
        self.allowed_vocab = allowed_vocab if allowed_vocab and allowed_vocab < self.vocab_size else None
        if temperature > 0 and (seeds is None or len(seeds) != self.batch_size):
            raise ValueError("sampling (temperature > 0) needs one seed per row")
        self.seeds = list(seeds) if seeds is not None else None
        self.finished = [False] * self.batch_size
        self.stop_reasons: list[str | None] = [None] * self.batch_size
        self.new_tokens = [0] * self.batch_size
        self.finish_times = [0.0] * self.batch_size
        self.context_shifts = 0
        self.start_time = 0.0

    def finish(self, row: int, reason: str) -> None:
        if not self.finished[row]:
            self.finished[row] = True
            self.stop_reasons[row] = reason
            self.finish_times[row] = time.perf_counter() - self.start_time

    def _accept(self, toks: list[int], step: int) -> list[int | None]:
        """One step's ids -> what is yielded (None for finished rows); ends rows at stop ids and at the last step."""
        out: list[int | None] = []
        for r, tok in enumerate(toks):
            if self.finished[r]:
                out.append(None)
            elif tok in self.stop_ids:
                self.finish(r, EOT if tok == self.eot_id else STOP_TOKEN)
                out.append(None)
            else:
                self.new_tokens[r] += 1
                out.append(tok)
        if step == self.max_new_tokens - 1:
            for r in range(self.batch_size):
                self.finish(r, MAX_TOKENS)
        return out

    def _fast_prefill(self, ids: Tensor, pad: Tensor | None) -> Tensor:
        # A long prompt (or the re-read half of a full window) is one batched fp32 torch forward
        # (matrix-matrix products) that fills the shared KV cache; a short one goes token by token
        # through the kernel in the chosen precision.
        if ids.numel() > FAST_PREFILL_MAX_TOKENS:
            return prefill(self.model, ids, pad=pad)
        return self.fast.prefill(ids, pad)

    def _logits(self, logits: Tensor) -> Tensor:
        if self.allowed_vocab is not None:
            logits = logits.clone()
            logits[:, self.allowed_vocab:] = float("-inf")
        return logits

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[int | None]]:
        model, ctx, B = self.model, self.ctx, self.batch_size
        device = _model_device(model)
        was_training = model.training
        model.eval()
        self.start_time = time.perf_counter()
        gens = self._generators(device)
        window, n, pad = self._window(device)
        keep = max(1, ctx // 2)  # tokens kept when the window slides
        fast = self.fast
        try:
            if fast is not None or self.use_cache:
                model.setup_caches(B, window.shape[1])
            if fast is not None:
                fast.bind_caches(model)
            logits = self._read(window[:, :n], pad)
            step = 0
            greedy_chunks = fast is not None and self.temperature == 0
            while step < self.max_new_tokens:
                if greedy_chunks and n < ctx:
                    # greedy on the fast path: up to GREEDY_CHUNK steps inside the kernel (argmax
                    # included), then yielded one by one; the ids are those of one step at a time
                    k = min(GREEDY_CHUNK, self.max_new_tokens - step, ctx - n)
                    feeds = k if step + k < self.max_new_tokens else k - 1  # the last id is never fed
                    ids = fast.greedy(logits, n, pad, k, feeds, self.allowed_vocab)  # (k, B)
                    if feeds:
                        window[:, n:n + feeds] = ids[:feeds].t()
                    n += feeds
                    logits = fast.logits[:B]
                    for row in ids.tolist():
                        yield self._accept(row, step)
                        step += 1
                        if all(self.finished):
                            return
                    continue
                noise = draw_noise(gens, self.vocab_size, device) if self.temperature > 0 else None
                nxt = sample(self._logits(logits), noise, self.temperature, self.top_k, self.top_p)  # (B,)
                yield self._accept(nxt.tolist(), step)
                step += 1
                if all(self.finished):
                    break
                # feed the new token back in
                if n == ctx:
                    # the context is full: slide, keeping the newest `keep` tokens, and re-prefill
                    window[:, : keep - 1] = window[:, n - keep + 1 : n].clone()
                    window[:, keep - 1] = nxt
                    if pad is not None:  # the dropped columns take padding with them
                        pad = (pad - (n - keep + 1)).clamp_min(0)
                        pad = pad if bool(pad.any()) else None
                    n = keep
                    self.context_shifts += 1
                    logits = self._read(window[:, :n], pad)
                else:
                    window[:, n] = nxt
                    n += 1
                    logits = self._next_logits(window, n, nxt, pad)
        finally:
            if self.use_cache:
                model.clear_caches()
            model.train(was_training)

    def _generators(self, device: torch.device) -> list[torch.Generator]:
        """One random stream per row, seeded with its seed (none for greedy decoding)."""
        if self.temperature > 0:
            return [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        return make_generators(0, 0)

    def _window(self, device: torch.device) -> tuple[Tensor, int, Tensor | None]:
        """(the token window with the left-padded prompts in its first n columns, n, padding per row or None).

        The window holds the tokens in the context (row-major, positions 0..n-1); the cache mirrors them.
        It and the KV cache are sized to what generation can use: the prompt and the new tokens, at most
        the context (then the window slides), not to the declared context (which may be 2^20).
        """
        n = max(map(len, self.prompts))
        window = torch.empty(self.batch_size, min(self.ctx, n + self.max_new_tokens), dtype=torch.long, device=device)
        # left padding (id 0: any id would do, padding columns are never attended to)
        window[:, :n] = torch.tensor([[0] * (n - len(p)) + p for p in self.prompts], dtype=torch.long, device=device)
        pad = torch.tensor([n - len(p) for p in self.prompts], device=device)
        return window, n, pad if bool(pad.any()) else None

    def _read(self, ids: Tensor, pad: Tensor | None) -> Tensor:
        """Logits after reading `ids` from position 0 (the prompt, or the kept half of a full window)."""
        if self.fast is not None:
            return self._fast_prefill(ids, pad)
        if self.use_cache:
            return prefill(self.model, ids, pad=pad)
        return full_forward(self.model, ids, pad)

    def _next_logits(self, window: Tensor, n: int, nxt: Tensor, pad: Tensor | None) -> Tensor:
        """Logits after the newest token `nxt`, which sits at position n - 1 of the window."""
        if self.fast is not None:
            return self.fast.step(nxt, n - 1, pad)
        if self.use_cache:
            return decode_one_token(self.model, window[:, n - 1 : n], n - 1, pad)
        return full_forward(self.model, window[:, :n], pad)


# ---------------------------------------------------------------------------------------------
# The library API (batch 1): token ids in, token ids out
# ---------------------------------------------------------------------------------------------


def generate_tokens(
    model,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_ids: list[int] | None = None,
    precision: str = "fp32",
    engine: str = "auto",
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids after `prompt_ids`, one at a time.

    Stops early (without yielding it) at any id in `stop_ids`. The KV cache is set up and freed
    inside the call. An empty prompt starts from `stop_ids[0]` (pass the end-of-text id first; the
    text-level `generate` does). Same seed, same arguments -> same ids.

    `engine`: "auto" decodes with the C kernel (tinystories_cli.fastpath) where the model is
    Llama-style and on the CPU, else with the torch model; "fast" or "torch" forces one. `precision`
    ("fp32", "bf16", "int8") is the fast engine's weight precision; fp32 is exact fp32 arithmetic.
    """
    check_sampling_args(max_new_tokens, temperature, top_p, top_k)
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        eot = getattr(model, "eot_id", None)
        if eot is None and stop_ids:
            eot = stop_ids[0]
        if eot is None:
            raise ValueError("empty prompt: pass stop_ids=[<|endoftext|> id] so generation can start from it")
        prompt_ids = [eot]
    seed = random_seed() if seed is None else seed
    dec = BatchDecoder(model, [prompt_ids], seeds=[seed], max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, top_k=top_k, stop_ids=stop_ids, engine=engine, precision=precision)
    for step in dec:
        if step[0] is None:
            return
        yield step[0]


# ---------------------------------------------------------------------------------------------
# Text: prompts in, completions out (streaming complete UTF-8 characters, stop strings)
# ---------------------------------------------------------------------------------------------


def _token_bytes_fn(tokenizer) -> Callable[[int], bytes] | None:
    """id -> raw bytes when the tokenizer exposes its byte vocabulary (then streaming is O(1)/token)."""
    vocab = getattr(tokenizer, "vocab", None)
    if isinstance(vocab, dict) and vocab and isinstance(next(iter(vocab.values())), (bytes, bytearray)):
        return lambda i: bytes(vocab.get(i, b"\xef\xbf\xbd"))  # an id with no bytes decodes as U+FFFD
    return None


class TextStream:
    """The completion text of one row, grown a token at a time.

    Only complete UTF-8 characters are released: a token that ends inside a multi-byte character
    waits for the next one (an incremental decoder). With stop strings, text that could still be
    the start of a stop string is held back until it is decided.

    >>> s = TextStream(lambda ids: bytes(ids).decode("utf-8", "replace"), token_bytes=lambda i: bytes([i]))
    >>> [s.push(b) for b in "é!".encode()]      # 'é' is two bytes: nothing until both arrived
    ['', 'é', '!']
    """

    def __init__(self, decode: Callable[[list[int]], str], token_bytes: Callable[[int], bytes] | None = None,
                 stop_strings: Sequence[str] = ()):
        self._decode, self._token_bytes = decode, token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop_strings = [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.text = ""  # decoded so far (complete characters only)
        self.released = 0  # len of text handed out by push()
        self.stopped = False

    def _decoded(self, final: bool) -> str:
        if self._token_bytes is not None:
            return self.text + self._utf8.decode(self._token_bytes(self.ids[-1]) if self.ids and not final else b"",
                                                 final=final)
        text = self._decode(self.ids)
        if not final:
            text = text.rstrip("\ufffd")  # maybe an incomplete character: wait for more bytes
        return text

    def push(self, token_id: int) -> str:
        """Add one token; return the newly releasable text ('' if none yet, or once stopped)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        self.text = self._decoded(final=False)
        return self._release(final=False)

    def close(self) -> str:
        """End of the row: flush what is left. A character the row stopped in the middle of (its last
        bytes never came) is held back, not shown as U+FFFD.

        >>> s = TextStream(lambda ids: bytes(ids).decode("utf-8", "replace"), token_bytes=lambda i: bytes([i]))
        >>> [s.push(b) for b in "hi é".encode()[:-1]], s.close(), s.text
        (['h', 'i', ' ', ''], '', 'hi ')
        """
        if not self.stopped:
            if self._token_bytes is not None:
                self._utf8.reset()  # drop an incomplete trailing sequence
            else:
                self.text = self._decoded(final=False)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop_strings and not self.stopped:
            hits = [i for i in (self.text.find(s) for s in self.stop_strings) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
        end = len(self.text)
        if not final and not self.stopped:
            end -= _partial_stop_len(self.text, self.stop_strings)
        chunk = self.text[self.released:end]
        self.released = max(self.released, end)
        return chunk


def _partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string.

    >>> _partial_stop_len("The end.\\n", ["\\n\\n"]), _partial_stop_len("abc", ["x"])
    (1, 0)
    """
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass
class Sample:
    """One generated completion and how it came about (the --json record)."""

    prompt: str
    seed: int | None
    text: str
    prompt_tokens: int
    new_tokens: int
    tokens_per_s: float
    stop_reason: str
    prompt_dropped: int = 0  # prompt tokens cut because the prompt was longer than the context
    context_shifts: int = 0  # times the window slid because the context filled up
    token_ids: list[int] = field(default_factory=list, repr=False)
    prompt_ids: list[int] = field(default_factory=list, repr=False)  # the prompt as the model read it

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("token_ids", "prompt_ids")}
        d["tokens_per_s"] = round(self.tokens_per_s, 2)
        d["ids"] = list(self.prompt_ids) + list(self.token_ids)  # prompt ids, then the generated ones
        return d


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt is the end-of-text token (where every story starts)."""
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        if tokenizer.eot_id is None:
            raise UserError("empty prompt, and the tokenizer has no <|endoftext|> token to start from",
                            "give a prompt")
        ids = [tokenizer.eot_id]
    return ids


def generate_samples(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_at_eot: bool = True,
    stop_strings: Sequence[str] = (),
    use_cache: bool = True,
    on_text: Callable[[int, str], None] | None = None,
    precision: str = "fp32",
    engine: str = "auto",
) -> list[Sample]:
    """`num_samples` completions of each prompt, ordered prompt by prompt.

    Batching: every row (prompts x samples) runs in one batch; prompts of different lengths are
    left-padded (see `BatchDecoder`). Sample i of every prompt uses seed `seed + i`, so `--seed S+i`
    reproduces it alone (until the context fills: rows of a batch slide together). `on_text(k,
    chunk)` is called with text as it becomes final for sample k (the index in the returned list).
    """
    check_sampling_args(max_new_tokens, temperature, top_p, top_k)
    if num_samples < 1:
        raise ValueError(f"`num_samples` must be at least 1, got {num_samples}")
    if seed is not None and not 0 <= seed < MAX_SEED:
        raise ValueError(f"`seed` must be in [0, 2^63), got {seed}")
    check_batch_fits(model.config, len(prompts) * num_samples)
    seed = random_seed() if seed is None else seed
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    token_bytes = _token_bytes_fn(tokenizer)
    stop_ids = [tokenizer.eot_id] if stop_at_eot and tokenizer.eot_id is not None else []
    rows = [(j, i) for j in range(len(prompts)) for i in range(num_samples)]  # (prompt index, sample index)
    dec = BatchDecoder(
        model, [encoded[j] for j, _ in rows], seeds=[seed + i for _, i in rows],
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        stop_ids=stop_ids, eot_id=tokenizer.eot_id, use_cache=use_cache,
        allowed_vocab=getattr(tokenizer, "vocab_size", None), engine=engine, precision=precision,
    )
    streams = [TextStream(tokenizer.decode, token_bytes, stop_strings) for _ in rows]
    _decode_text(dec, streams, on_text)
    return [_finished_sample(dec, r, streams[r], prompts[j], seed + i if temperature > 0 else None, on_text)
            for r, (j, i) in enumerate(rows)]


def _decode_text(dec: BatchDecoder, streams: list[TextStream], on_text: Callable[[int, str], None] | None) -> None:
    """Run the decoder, feeding each row's ids to its text stream; a stop string ends the row."""
    for step in dec:
        for r, tok in enumerate(step):
            if tok is None:
                continue
            chunk = streams[r].push(tok)
            if chunk and on_text:
                on_text(r, chunk)
            if streams[r].stopped:
                dec.finish(r, STOP_STRING)


def _finished_sample(dec: BatchDecoder, r: int, s: TextStream, prompt: str, seed: int | None,
                     on_text: Callable[[int, str], None] | None) -> Sample:
    """Row r's Sample, once the decoder is done (the rest of its text is flushed to `on_text` first)."""
    chunk = s.close()
    if chunk and on_text:
        on_text(r, chunk)
    n_new, secs = dec.new_tokens[r], dec.finish_times[r]
    return Sample(
        prompt=prompt, seed=seed, text=s.text,
        prompt_tokens=len(dec.prompts[r]), new_tokens=n_new,
        tokens_per_s=n_new / secs if secs > 0 else 0.0, stop_reason=dec.stop_reasons[r] or MAX_TOKENS,
        prompt_dropped=dec.prompt_dropped[r], context_shifts=dec.context_shifts, token_ids=s.ids,
        prompt_ids=list(dec.prompts[r]),
    )


def generate(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_ids: list[int] | None = None,
    precision: str = "fp32",
    engine: str = "auto",
) -> str:
    """The completion text of `prompt` (without the prompt).

    `stop_ids=None` stops at the tokenizer's end-of-text; pass `[]` to never stop early. An empty
    prompt starts from end-of-text. `precision` and `engine`: see `generate_tokens`.
    """
    ids = encode_prompt(tokenizer, prompt)
    stops = ([] if tokenizer.eot_id is None else [tokenizer.eot_id]) if stop_ids is None else stop_ids
    new = list(generate_tokens(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               top_k=top_k, seed=seed, stop_ids=stops, precision=precision, engine=engine))
    return tokenizer.decode(new)
