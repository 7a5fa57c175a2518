"""Batches: get_batch's contract, the resumable sampler, DDP sharding, fixed validation windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinystories_cli.data import BatchSampler, fixed_windows, get_batch, window_batches


def test_get_batch_shapes_shift_and_dtype():
    data = np.arange(100, dtype=np.uint16)
    x, y = get_batch(data, batch_size=5, context_length=7, device="cpu")
    assert x.shape == y.shape == (5, 7) and x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
    assert torch.equal(y, x + 1)  # consecutive ids: y is x shifted by one
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_get_batch_starts_cover_every_valid_start_uniformly():
    n, ctx = 30, 5
    data = np.arange(n)
    np.random.seed(0)
    starts = np.concatenate([get_batch(data, 64, ctx, "cpu")[0][:, 0].numpy() for _ in range(200)])
    counts = np.bincount(starts, minlength=n)
    assert starts.min() == 0 and starts.max() == n - ctx - 1  # all valid starts, never past the end
    assert (counts[: n - ctx] > 0).all() and counts[n - ctx:].sum() == 0
    expected = len(starts) / (n - ctx)
    assert np.abs(counts[: n - ctx] - expected).max() < 0.25 * expected  # roughly uniform


def test_get_batch_reads_a_memmap(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(1000, dtype=np.uint16))
    data = np.load(tmp_path / "t.npy", mmap_mode="r")
    x, y = get_batch(data, 3, 10, "cpu")
    assert torch.equal(y, x + 1)


def test_too_short_dataset_is_an_error():
    with pytest.raises(ValueError):
        get_batch(np.arange(5), 1, 5, "cpu")


def test_sampler_state_resumes_exactly():
    data = np.arange(10_000)
    a = BatchSampler(data, 4, 16, seed=3)
    for _ in range(5):
        a.next("cpu")
    state = a.state_dict()
    expected = [a.next("cpu")[0] for _ in range(3)]
    b = BatchSampler(data, 4, 16, seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(e, b.next("cpu")[0]) for e in expected)
    c = BatchSampler(data, 4, 16, seed=4)
    c.load_state_dict({"seed": 4, "draws": 5})
    assert not torch.equal(expected[0], c.next("cpu")[0])  # a different seed, different windows


def test_ranks_split_the_global_batch_of_one_process():
    data = np.arange(10_000)
    single = BatchSampler(data, 6, 8, seed=1)
    ranks = [BatchSampler(data, 3, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        whole = single.next("cpu")[0]
        parts = [r.next("cpu")[0] for r in ranks]
        assert torch.equal(whole, torch.cat(parts))
        assert not torch.equal(parts[0], parts[1])


def test_fixed_windows_are_deterministic_and_in_range():
    a = fixed_windows(5000, 64, 10)
    assert a.tolist() == fixed_windows(5000, 64, 10).tolist()
    assert a[0] == 0 and a[-1] == 5000 - 64 - 1 and (np.diff(a) > 0).all()
    assert len(fixed_windows(70, 64, 100)) == 6  # never more windows than valid starts
    batches = list(window_batches(np.arange(5000), a, 64, 4, "cpu"))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert batches[0][0][1, 0].item() == a[1]
