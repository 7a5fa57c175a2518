"""Training batches from memmapped token files: random windows for training, fixed windows for validation.

A token file (`tslm encode`) is a 1-D `.npy` array of ids opened with `mmap_mode="r"`, so a 10 GB
file costs no RAM: a batch reads only its `batch x (context + 1)` ids.

    >>> import numpy as np
    >>> x, y = get_batch(np.arange(100), batch_size=2, context_length=4, device="cpu")
    >>> x.shape, bool((y[:, :-1] == x[:, 1:]).all())
    (torch.Size([2, 4]), True)

Randomness for training is a pure function of (seed, optimizer step): step k's global batch uses
`np.random.default_rng([seed, k])`. The sampler's whole state is therefore a few integers, which
makes resuming exact, and every rank draws the same global batch and keeps its own slices, so
two processes with batch B see exactly the windows of one process with batch 2B. Since a step's
windows depend only on the global batch, a run may resume on another world size (with the
per-process batch or accumulation that keeps the global batch) and read the same windows.
"""

from __future__ import annotations

import numpy as np
import torch


def _windows(dataset: np.ndarray, starts: np.ndarray, context_length: int, device: str | torch.device):
    """x = dataset[s : s + T], y = dataset[s + 1 : s + T + 1] for each start s; int64 (len(starts), T)."""
    offsets = np.arange(context_length + 1)
    idx = starts[:, None] + offsets[None, :]  # (B, T+1)
    block = torch.from_numpy(np.asarray(dataset[idx], dtype=np.int64))
    x, y = block[:, :-1], block[:, 1:]
    device = torch.device(device)
    if device.type == "cuda":  # async host-to-device copy from pinned memory
        return (x.contiguous().pin_memory().to(device, non_blocking=True),
                y.contiguous().pin_memory().to(device, non_blocking=True))
    return x.contiguous().to(device), y.contiguous().to(device)


def num_starts(num_tokens: int, context_length: int) -> int:
    """Valid window starts: every s with s + context_length < num_tokens (y needs one more id)."""
    return num_tokens - context_length


def get_batch(
    dataset: np.ndarray,
    batch_size: int,
    context_length: int,
    device: str,
    rng: np.random.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `batch_size` windows with starts uniform over all valid starts; return (x, y) int64 on `device`.

    x, y have shape (batch_size, context_length) and y is x shifted by one token. Without `rng`
    the starts come from NumPy's global generator (seed it with `np.random.seed` for repeatability).
    """
    n = num_starts(len(dataset), context_length)
    if n <= 0:
        raise ValueError(f"dataset of {len(dataset)} tokens is too short for context length {context_length}")
    starts = (rng.integers(0, n, size=batch_size) if rng is not None
              else np.random.randint(0, n, size=batch_size))
    return _windows(dataset, starts.astype(np.int64), context_length, device)


class BatchSampler:
    """Deterministic, resumable random windows, sharded over ranks and micro-batches.

    Optimizer step k draws its global batch of `batch_size * grad_accum * world_size` starts from
    `default_rng([seed, k])`; micro-batch i of rank r is the slice starting at `(i * world_size + r) *
    batch_size`, so micro-batch i of all ranks together is the same set of windows for any world size.
    Each call to `next()` returns this rank's next micro-batch.

    >>> data = np.arange(1000)
    >>> a = BatchSampler(data, 4, 8, seed=1); _ = a.next("cpu"); state = a.state_dict(); x1, _ = a.next("cpu")
    >>> b = BatchSampler(data, 4, 8, seed=1); b.load_state_dict(state); x2, _ = b.next("cpu")
    >>> bool((x1 == x2).all())
    True
    """

    def __init__(self, dataset: np.ndarray, batch_size: int, context_length: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1):
        if num_starts(len(dataset), context_length) <= 0:
            raise ValueError(f"dataset of {len(dataset)} tokens is too short for context length {context_length}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.context_length = context_length
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.grad_accum = grad_accum
        self.draws = 0  # micro-batches this rank has taken
        self._cached: tuple[int, np.ndarray] | None = None

    def starts(self) -> np.ndarray:
        step, micro = divmod(self.draws, self.grad_accum)
        self.draws += 1
        if self._cached is None or self._cached[0] != step:
            rng = np.random.default_rng([self.seed, step])
            n = num_starts(len(self.dataset), self.context_length)
            size = self.batch_size * self.grad_accum * self.world_size
            self._cached = (step, rng.integers(0, n, size=size, dtype=np.int64))
        first = (micro * self.world_size + self.rank) * self.batch_size
        return self._cached[1][first:first + self.batch_size]

    def next(self, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return _windows(self.dataset, self.starts(), self.context_length, device)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "draws": self.draws, "grad_accum": self.grad_accum}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`, also when it was saved with another accumulation or world size: the
        position is kept in optimizer steps (a saved state lies on a step boundary)."""
        saved_accum = int(state.get("grad_accum", self.grad_accum))
        steps, rest = divmod(int(state["draws"]), saved_accum)
        if rest and saved_accum != self.grad_accum:
            raise ValueError(f"sampler state at micro-batch {rest} of a step cannot change the accumulation")
        self.seed = int(state["seed"])
        self.draws = steps * self.grad_accum + rest
        self._cached = None


def fixed_windows(num_tokens: int, context_length: int, count: int) -> np.ndarray:
    """`count` window starts spread evenly over the file: the same windows at every evaluation, so
    validation curves are comparable across steps and runs.

    >>> fixed_windows(1000, 100, 4).tolist()
    [0, 299, 599, 899]
    """
    n = num_starts(num_tokens, context_length)
    if n <= 0:
        raise ValueError(f"{num_tokens} tokens are too few for context length {context_length}")
    count = max(1, min(count, n))
    if count == 1:
        return np.zeros(1, dtype=np.int64)
    return (np.arange(count, dtype=np.int64) * (n - 1)) // (count - 1)


def window_batches(dataset: np.ndarray, starts: np.ndarray, context_length: int, batch_size: int,
                   device: str | torch.device):
    """Yield (x, y) batches of the windows at `starts`, in order."""
    for i in range(0, len(starts), batch_size):
        yield _windows(dataset, starts[i:i + batch_size], context_length, device)
