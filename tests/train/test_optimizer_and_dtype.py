"""The trainer's optimizer and compute-dtype choices (issue 27): `optimizer` muon (Muon on the hidden matrices,
AdamW on the rest) trains, checkpoints and resumes exactly; `dtype` auto picks bf16 autocast on a CPU with
native bf16, records the choice, and a resumed run keeps the dtype it started with."""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys

import pytest
import torch

from tinystories_cli import device as D
from tinystories_cli import runs
from tinystories_cli.checkpoint import read_checkpoint

from train_fixtures import latest_weights
from train_fixtures import train_tiny as _run

MUON = {"optimizer": "muon", "muon_lr": 0.02}


def _chosen(run_dir) -> dict:
    return json.loads((run_dir / "config.json").read_text())["chosen"]


def test_muon_trains_checkpoints_and_resumes_bit_for_bit(workspace):
    full = _run("full", train=MUON)
    first = _run("split", train=MUON, stop_at=4)
    second = _run("split", train=MUON, resume="auto")
    assert {**first.train_losses, **second.train_losses} == full.train_losses
    assert full.train_losses[8] < full.train_losses[1]  # it learns
    a, b = latest_weights(full.run_dir), latest_weights(second.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt = read_checkpoint(runs.latest_checkpoint(full.run_dir))
    assert ckpt.optimizer_meta["class"] == "MuonWithAdamW"
    groups = ckpt.optimizer_meta["param_groups"]
    assert [g["algorithm"] for g in groups][0] == "muon" and groups[0]["max_lr"] == 0.02
    buffers = [k for k in ckpt.optim if k.endswith("momentum_buffer")]
    assert len(buffers) == 7  # q, k, v, o and the three SwiGLU matrices of the one block
    cfg = json.loads((full.run_dir / "config.json").read_text())
    assert cfg["train"]["optimizer"] == "muon"


def test_muon_follows_the_schedule_with_its_own_peak(workspace):
    """The schedule scales every group from its own peak: at the last step (cosine to min_lr = lr / 10) AdamW's
    groups are at 3e-4 and Muon's at 0.02 / 10, as the step-8 checkpoint records them."""
    res = _run("sched", train=MUON)
    groups = read_checkpoint(runs.latest_checkpoint(res.run_dir)).optimizer_meta["param_groups"]
    assert [g["algorithm"] for g in groups] == ["muon", "adamw", "adamw"]
    assert groups[0]["lr"] == pytest.approx(0.002) and groups[1]["lr"] == groups[2]["lr"] == pytest.approx(3e-4)
    # AdamW keeps the LM head (its decayed group) and the embedding and norms (undecayed); Muon the block matrices
    assert [n.split(".")[0] for n in groups[1]["names"]] == ["lm_head"]
    assert groups[2]["names"] == ["token_embeddings.weight", "layers.0.ln1.weight", "layers.0.ln2.weight",
                                  "ln_final.weight"]


def test_muon_refuses_fsdp_in_one_line(workspace):
    from tinystories_cli.config import ModelConfig, TrainConfig
    from tinystories_cli.model import TransformerLM
    from tinystories_cli.optim import build_optimizer

    model = TransformerLM(ModelConfig(vocab_size=64, context_length=8, d_model=16, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="`optimizer` muon needs whole matrices.*`parallel` fsdp"):
        build_optimizer(model, TrainConfig(optimizer="muon"), sharded=True)


def test_auto_dtype_is_bf16_where_the_cpu_has_it_and_is_recorded(workspace):
    res = _run("auto", train={"max_steps": 4})
    assert _chosen(res.run_dir)["dtype"] == ("bfloat16" if D.cpu_native_bf16() else "float32")
    forced = _run("fp32", train={"max_steps": 4, "dtype": "float32"})
    assert _chosen(forced.run_dir)["dtype"] == "float32"


def test_a_resumed_run_keeps_the_dtype_it_started_with(workspace, monkeypatch):
    monkeypatch.setattr(D, "cpu_flags", lambda: {"avx2"})  # started on a CPU without bf16: float32
    first = _run("moved", stop_at=4)
    assert _chosen(first.run_dir)["dtype"] == "float32"
    monkeypatch.setattr(D, "cpu_flags", lambda: {"avx512_bf16"})  # resumed where auto would pick bf16
    second = _run("moved", resume="auto")
    assert _chosen(second.run_dir)["dtype"] == "float32"
    straight = _run("straight", train={"dtype": "float32"})
    assert {**first.train_losses, **second.train_losses} == straight.train_losses


_FAULTS = """
import resource, sys, torch
from tinystories_cli.device import keep_freed_cpu_memory
applied = keep_freed_cpu_memory(torch.device("cpu")) if sys.argv[1] == "1" else False
for _ in range(10):  # the heap grows for the first few steps (aligned blocks do not fit the freed ones at first)
    torch.ones(2**24).sum()  # 64 MiB, above glibc's largest mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    torch.ones(2**24).sum()
print(int(applied), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory tunes glibc's malloc")
def test_keep_freed_memory_reuses_a_steps_buffers_instead_of_faulting_them_in_again():
    def faults(keep: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS, keep], capture_output=True, text=True, check=True)
        applied, n = out.stdout.split()
        return int(applied), int(n)

    pages = 2**26 // resource.getpagesize()  # one 64 MiB buffer
    applied, kept = faults("1")
    assert applied == 1 and kept <= 2 * pages  # six more "steps" fault in (almost) nothing new
    assert faults("0")[1] >= 5 * pages  # glibc's default: each 64 MiB block is mapped and faulted in afresh
    assert not D.keep_freed_cpu_memory(torch.device("meta"))  # only a CPU's malloc is tuned
