"""Loss, perplexity and bits-per-byte of a trained model over a whole token file.

The file is cut into deterministic, non-overlapping windows: window i feeds tokens
[i*T, (i+1)*T) and predicts tokens [i*T + 1, (i+1)*T + 1), so every token after the first is
predicted exactly once (the last window is shorter when the count does not divide evenly).

    mean loss       = total nats / predicted tokens
    perplexity      = exp(mean loss)
    bits per byte   = total nats / (source bytes x ln 2)

Bits per byte uses the UTF-8 byte count of the text the token file was encoded from (its
sidecar's `source_bytes`), so it compares models with different tokenizers. Worked example:
3 predicted tokens with losses 1, 2, 3 nats from a 4-byte text give mean loss 2 and
6 / (4 ln 2) = 2.164 bits per byte.

Loss by position (`per_position=True`): position p of a window is the prediction of its token p + 1
from the p + 1 tokens before it (position 0 sees one token, position T - 1 a full context). The nats
and the count of predictions at each position are summed over every window, so

    sum(position_nats)                        = total_nats
    sum(position_nats) / sum(position_tokens) = mean loss

and `position_buckets` groups positions into equal-width ranges for a table. Loss that keeps
falling with position means the model uses the longer context; a curve that turns up near the end,
or never falls, is the first thing to look at in a positional-encoding ablation.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tinystories_cli import paths, runs
from tinystories_cli.checkpoint import read_checkpoint
from tinystories_cli.data import window_batches
from tinystories_cli.device import Dist, pick_device
from tinystories_cli.errors import UserError
from tinystories_cli.model import cross_entropy, log_softmax
from tinystories_cli.tokens import check_tokens, open_tokens
from tinystories_cli.trained import model_from_checkpoint


def window_starts(num_tokens: int, context_length: int) -> list[tuple[int, int]]:
    """(start, length) of each non-overlapping window; lengths sum to num_tokens - 1.

    >>> window_starts(10, 4)
    [(0, 4), (4, 4), (8, 1)]
    """
    return [(s, min(context_length, num_tokens - 1 - s)) for s in range(0, num_tokens - 1, context_length)]


@torch.no_grad()
def evaluate_tokens(
    model: torch.nn.Module,
    tokens: np.ndarray,
    context_length: int,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    source_bytes: int | None = None,
    autocast: Callable | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    per_position: bool = False,
) -> dict:
    """Evaluate `model` on all of `tokens`; returns loss, perplexity, bits_per_byte and counts.

    With `per_position`, also `position_nats` and `position_tokens`: lists of `context_length`
    floats/ints, the summed loss and the number of predictions at each position in the window.
    """
    if len(tokens) < 2:
        raise UserError(f"token file holds {len(tokens)} tokens; evaluation needs at least 2", "encode more text")
    model.eval()
    windows = window_starts(len(tokens), context_length)
    full = [s for s, n in windows if n == context_length]
    batches = [(full[i:i + batch_size], context_length) for i in range(0, len(full), batch_size)]
    batches += [([s], n) for s, n in windows if n != context_length]  # the short tail window, if any
    score = _WindowScorer(model, tokens, torch.device(device), autocast, context_length if per_position else 0)
    total_nats = 0.0
    predicted = 0
    done = 0
    for starts, length in batches:
        total_nats += score(starts, length)
        predicted += len(starts) * length
        done += len(starts)
        if on_progress:
            on_progress(done, len(windows))
    mean = total_nats / predicted
    out = {
        "loss": mean,
        "perplexity": math.exp(mean) if mean < 700 else math.inf,
        "bits_per_byte": total_nats / (source_bytes * math.log(2)) if source_bytes else None,
        "total_nats": total_nats,
        "predicted_tokens": predicted,
        "tokens": int(len(tokens)),
        "source_bytes": source_bytes,
        "windows": len(windows),
        "context_length": context_length,
    }
    if per_position:
        out["position_nats"] = score.pos_nats.tolist()
        out["position_tokens"] = score.pos_count.tolist()
    return out


class _WindowScorer:
    """Summed next-token loss (nats) of windows of `tokens`; with `positions` > 0, also per position."""

    def __init__(self, model, tokens: np.ndarray, device: torch.device, autocast: Callable | None, positions: int):
        self.model, self.tokens, self.device, self.autocast = model, tokens, device, autocast
        self.per_position = positions > 0
        self.pos_nats = torch.zeros(positions, dtype=torch.float64)
        self.pos_count = torch.zeros(positions, dtype=torch.int64)

    def __call__(self, starts: list[int], length: int) -> float:
        idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(length + 1)[None, :]
        block = torch.from_numpy(np.asarray(self.tokens[idx], dtype=np.int64)).to(self.device)
        x, y = block[:, :-1], block[:, 1:]
        with (self.autocast() if self.autocast else contextlib.nullcontext()):
            logits = self.model(x)  # (B, T, V)
        logp = log_softmax(logits.float(), dim=-1)
        nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (B, T)
        if self.per_position:
            self.pos_nats[:length] += nll.double().sum(0).cpu()
            self.pos_count[:length] += len(starts)
        return nll.double().sum().item()


def position_buckets(position_nats: list[float], position_tokens: list[int], buckets: int = 8) -> list[dict]:
    """Equal-width ranges of positions (widths differ by at most one when `buckets` does not divide
    the context), each with its first and last position, predictions, nats and mean loss (None when
    no prediction fell in it).

    >>> for b in position_buckets([4.0, 2.0, 3.0, 1.0, 1.0], [2, 2, 2, 1, 1], 2):
    ...     print(b["first"], b["last"], b["tokens"], b["loss"])
    0 1 4 1.5
    2 4 4 1.25
    """
    n = len(position_nats)
    if len(position_tokens) != n:
        raise ValueError(f"position_nats has {n} entries but position_tokens {len(position_tokens)}")
    if buckets <= 0:
        raise ValueError(f"the number of position buckets must be positive, got {buckets}")
    buckets = min(buckets, n)
    out = []
    edges = [i * n // buckets for i in range(buckets + 1)] if n else []
    for lo, hi in zip(edges, edges[1:]):
        nats, count = sum(position_nats[lo:hi]), sum(position_tokens[lo:hi])
        out.append({"first": lo, "last": hi - 1, "tokens": count, "nats": nats,
                    "loss": nats / count if count else None})
    return out


def evaluate_run(run: str | os.PathLike | None, data: str | os.PathLike | None = None, *, batch_size: int = 16,
                 context_length: int | None = None, device: str = "auto", latest: bool = False,
                 on_progress: Callable[[int, int], None] | None = None, per_position: bool = False) -> dict:
    """Evaluate a run's best (or, with `latest`, its newest step) checkpoint on a whole token file.

    `run` is a run name, run directory or checkpoint file (None: runs/latest); `data` defaults to the
    run dataset's valid.npy; `context_length` (the window) defaults to, and may not exceed, the model's.
    Returns `evaluate_tokens`' result (with `per_position`, the loss at each position in the window
    too) plus run, checkpoint, step and data.
    """
    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    target = runs.resolve_run(run)
    run_dir = runs.run_dir_of(target)
    ckpt_path = runs.checkpoint_for(target, prefer_best=not latest)
    ckpt = read_checkpoint(ckpt_path)
    cfg = runs.model_config_of(ckpt, run_dir)
    tokenizer = runs.load_tokenizer(runs.tokenizer_dir_of(run_dir))
    window = cfg.context_length if context_length is None else context_length
    if window <= 0:
        raise UserError(f"the evaluation window must be positive, got {window}")
    if window > cfg.context_length:
        raise UserError(f"the evaluation window {window} exceeds the model's context length {cfg.context_length} "
                        "(its positional limit)", f"use {cfg.context_length} or less")
    dataset = "tinystories"
    try:
        dataset = (runs.read_run_config(run_dir).get("train") or {}).get("dataset", dataset)
    except UserError:
        pass  # a bare checkpoint directory without config.json: the default dataset
    data = Path(data) if data is not None else paths.tokens_path(dataset, "valid")
    tokens, meta = open_tokens(data, "evaluation", dataset, "valid")
    check_tokens(data, tokenizer.fingerprint, cfg.vocab_size, tokenizer_dir=runs.tokenizer_dir_of(run_dir))
    dev = pick_device(device)
    model = model_from_checkpoint(ckpt, cfg, dev)
    result = evaluate_tokens(model, tokens, window, batch_size, dev, meta.get("source_bytes"), on_progress=on_progress,
                             per_position=per_position)
    result.update(run=str(run_dir), checkpoint=str(ckpt_path), step=ckpt.iteration, data=str(data))
    return result


@torch.no_grad()
def fixed_window_loss(model, tokens: np.ndarray, starts: np.ndarray, context_length: int, batch_size: int,
                      device: torch.device, autocast: Callable, dist: Dist) -> float:
    """Mean loss over the windows at `starts` (split across DDP ranks, then summed): training's validation."""
    was_training = model.training
    model.eval()
    mine = starts[dist.rank::dist.world_size]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in window_batches(tokens, mine, context_length, batch_size, device):
        with autocast():
            logits = model(x)
        total[0] += cross_entropy(logits.float(), y).double() * y.numel()
        total[1] += y.numel()
    if dist.enabled:
        torch.distributed.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()
