"""Training on 2 processes (gloo, CPU): FSDP equals one process with the doubled batch, with and without
activation checkpointing, checkpoints move between world sizes and between DDP, FSDP and 1 process, and
a deadline's change of schedule length is the same on every rank.

Multi-process runs cost seconds each on a shared 2-core machine, so one spawn does all the 2-rank work
and the assertions are gathered in one test."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from tinystories_cli import paths, runs
from tinystories_cli import train as T
from tinystories_cli.checkpoint import read_checkpoint

from train_fixtures import TINY_MODEL, TINY_TRAIN, free_port, train_tiny
from train_fixtures import latest_weights as _weights

# float32: these tests compare the arithmetic across world sizes and shardings (bf16 autocast, the default on a
# CPU with native bf16, rounds differently for each per-rank batch shape)
STEPS = {"max_steps": 10, "eval_every": 5, "save_every": 5, "log_every": 5, "dtype": "float32"}


def _run(name, train=None, **opts):
    """The tiny run with this module's longer schedule (STEPS)."""
    return train_tiny(name, train={**STEPS, **(train or {})}, **opts)


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    paths.DATA_ROOT = Path(root) / "data"
    paths.RUNS_ROOT = Path(root) / "runs"
    half = {"batch_size": 2}
    out = {}
    try:
        out["fsdp"] = _run("fsdp", {**half, "parallel": "fsdp"}).train_losses
        out["fsdp_ac"] = _run("fsdp_ac", {**half, "parallel": "fsdp", "activation_checkpointing": True}).train_losses
        out["fsdp_split"] = _run("fsdp_split", {**half, "parallel": "fsdp"}, stop_at=5).train_losses
        out["ddp_split"] = _run("ddp_split", {**half, "parallel": "ddp"}, stop_at=5).train_losses
        # saved by one process (the parent, before spawning): continued on 2 ranks with the batch halved
        out["from_one"] = _run("from_one", {**half, "parallel": "fsdp"}, resume="auto").train_losses
        _deadline_run(rank, Path(root))
        if rank == 0:
            (Path(root) / "parallel.json").write_text(json.dumps(out))
    finally:
        torch.distributed.destroy_process_group()


def _deadline_run(rank: int, root: Path) -> None:
    """A DDP run with a deadline whose ranks propose different new lengths (caps 40 and 30 for a
    20-step WSD schedule with time to spare): all ranks must take the same one, the smallest."""
    run = T.prepare_run("debug", None, dict(TINY_MODEL),
                        {"dataset": "tiny", **TINY_TRAIN, **STEPS, "max_steps": 20, "batch_size": 2,
                         "parallel": "ddp", "schedule": "wsd"},
                        T.TrainOptions(run_name="ddp_deadline", display="quiet", peak_tflops=1.0))
    run.time_plan = T.time_plan(600.0, time.perf_counter() + 600.0, 0.0, 1e3, 20, max_steps_cap=30 if rank else 40)
    res = T.train(run)
    (root / f"deadline{rank}.json").write_text(json.dumps({"step": res.step, "max_steps": res.max_steps,
                                                           "replanned": run.time_plan.replanned or None}))


def test_fsdp_equals_one_process_and_checkpoints_move_between_world_sizes(workspace):
    tmp = workspace
    single = _run("single", {"batch_size": 4})
    _run("from_one", {"batch_size": 4}, stop_at=5)
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), str(tmp)), nprocs=2, join=True)
    got = {k: {int(s): v for s, v in d.items()} for k, d in json.loads((tmp / "parallel.json").read_text()).items()}
    want = single.train_losses
    assert len(want) == 10
    for name in ("fsdp", "fsdp_ac"):
        assert got[name].keys() == want.keys(), name
        assert all(abs(got[name][s] - want[s]) < 1e-5 for s in want), (name, got[name], want)
        a, b = _weights(tmp / "runs" / name), _weights(single.run_dir)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a), name
    # the FSDP checkpoint is the ordinary single-file one: full shapes, plain names, AdamW moments, step
    ckpt = read_checkpoint(runs.latest_checkpoint(tmp / "runs" / "fsdp_split"))
    one = read_checkpoint(runs.latest_checkpoint(single.run_dir))
    assert {k: v.shape for k, v in ckpt.model.items()} == {k: v.shape for k, v in one.model.items()}
    assert ckpt.optim.keys() == one.optim.keys() and ckpt.iteration == 5
    # 2 ranks (FSDP, DDP) -> 1 process with the doubled batch; 1 process -> 2 FSDP ranks
    for name in ("fsdp_split", "ddp_split"):
        resumed = _run(name, {"batch_size": 4}, resume="auto")
        losses = {**got[name], **resumed.train_losses}
        assert losses.keys() == want.keys() and all(abs(losses[s] - want[s]) < 1e-5 for s in want), name
    assert set(got["from_one"]) == set(range(6, 11))
    assert all(abs(got["from_one"][s] - want[s]) < 1e-5 for s in got["from_one"])
    # a resume that changes the global batch is refused, naming the values that keep it
    with pytest.raises(T.prepare.UserError, match="`batch_size` 4 or `grad_accum_steps` 2"):
        T.prepare_run(None, None, None, {"batch_size": 2, "dataset": "tiny"},
                      T.TrainOptions(run_name="fsdp_split", resume="auto"))
    # a resume on 1 process may also keep the global batch through accumulation instead
    _run("accum", {"batch_size": 4}, stop_at=5)
    resumed = _run("accum", {"batch_size": 2, "grad_accum_steps": 2}, resume="auto")
    assert all(abs(resumed.train_losses[s] - want[s]) < 1e-5 for s in range(6, 11))
    # a deadline's new schedule length is agreed by all ranks (the smallest proposed)
    ranks = [json.loads((tmp / f"deadline{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["step"] == ranks[0]["max_steps"] == 30, ranks
    assert ranks[0]["replanned"][0]["from"] == 20
    assert json.loads((tmp / "runs" / "ddp_deadline" / "config.json").read_text())["max_steps"] == 30


def test_activation_checkpointing_gives_the_plain_gradients():
    import copy

    from tinystories_cli.config import ModelConfig
    from tinystories_cli.model import TransformerLM, cross_entropy
    from tinystories_cli.train.parallel import apply_activation_checkpointing

    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=4,
                                      dropout=0.1))  # dropout: the recompute must replay the same masks
    twin = copy.deepcopy(model)
    apply_activation_checkpointing(twin)
    ids = torch.randint(0, 64, (3, 17))
    grads = []
    for m in (model, twin):
        torch.manual_seed(1)
        cross_entropy(m(ids[:, :-1]), ids[:, 1:]).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and list(model.state_dict()) == list(twin.state_dict())
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=1e-6, msg=n)


def test_sampler_reads_the_same_windows_for_any_split_of_the_global_batch():
    import numpy as np

    from tinystories_cli.data import BatchSampler

    data = np.arange(5000)

    def step_windows(batch, accum, world, steps=3, state=None):
        """{step: sorted starts of all ranks' micro-batches} for `steps` optimizer steps."""
        samplers = [BatchSampler(data, batch, 8, seed=3, rank=r, world_size=world, grad_accum=accum)
                    for r in range(world)]
        for s in samplers:
            if state is not None:
                s.load_state_dict(state)
        out = {}
        for k in range(steps):
            xs = [s.next("cpu")[0][:, 0] for _ in range(accum) for s in samplers]
            out[k] = sorted(torch.cat(xs).tolist())
        return out, samplers[0].state_dict()

    ref, _ = step_windows(8, 1, 1)
    assert step_windows(4, 1, 2)[0] == ref == step_windows(2, 2, 2)[0] == step_windows(1, 8, 1)[0]
    # micro-batch i of all ranks together is the same set whatever the world size (exact DDP/FSDP equality)
    one = BatchSampler(data, 4, 8, seed=3, grad_accum=2)
    two = [BatchSampler(data, 2, 8, seed=3, rank=r, world_size=2, grad_accum=2) for r in range(2)]
    for _ in range(4):
        assert one.next("cpu")[0].tolist() == two[0].next("cpu")[0].tolist() + two[1].next("cpu")[0].tolist()
    # a state saved with accumulation 1 on 2 ranks continues at the same step with accumulation 4 on 1
    _, state = step_windows(4, 1, 2, steps=2)
    later, _ = step_windows(2, 4, 1, steps=1, state=state)
    assert later[0] == ref[2]
