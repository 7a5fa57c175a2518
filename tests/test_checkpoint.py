"""Checkpoints: safetensors round trips, plain names after compile/DDP, tied weights, damage, kill -9."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from tinystories_cli.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from tinystories_cli.config import ModelConfig
from tinystories_cli.errors import UserError
from tinystories_cli.model import TransformerLM, cross_entropy
from tinystories_cli.optim import AdamW, make_param_groups

CFG = dict(vocab_size=50, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)


def _trained(tie: bool = False, steps: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = TransformerLM(ModelConfig(**CFG, tie_embeddings=tie))
    opt = AdamW(make_param_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(steps):
        x = torch.randint(0, 50, (2, 8))
        cross_entropy(model(x), x).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _fresh(tie: bool = False):
    torch.manual_seed(123)
    model = TransformerLM(ModelConfig(**CFG, tie_embeddings=tie))
    return model, AdamW(make_param_groups(model, 0.0), lr=1.0)


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("target", ["path", "fileobj"])
def test_round_trip_model_and_optimizer(tmp_path, target):
    model, opt = _trained()
    m2, o2 = _fresh()
    if target == "path":
        save_checkpoint(model, opt, 17, tmp_path / "c.safetensors")
        it = load_checkpoint(tmp_path / "c.safetensors", m2, o2)
    else:
        buf = io.BytesIO()
        save_checkpoint(model, opt, 17, buf)
        buf.seek(0)
        it = load_checkpoint(buf, m2, o2)
    assert it == 17 and _same_state(model, m2)
    s1, s2 = opt.state_dict(), o2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]  # lr, betas (a tuple again), weight decay, names
    for k in s1["state"]:
        for key, v in s1["state"][k].items():
            assert torch.equal(v, s2["state"][k][key]) if torch.is_tensor(v) else v == s2["state"][k][key]
    # one more identical step from both: the optimizer state really was restored
    x = torch.randint(0, 50, (2, 8))
    for m, o in ((model, opt), (m2, o2)):
        cross_entropy(m(x), x).backward()
        o.step()
    assert _same_state(model, m2)


def test_file_is_plain_safetensors_with_json_metadata(tmp_path):
    from safetensors import safe_open

    model, opt = _trained()
    save_checkpoint(model, opt, 3, tmp_path / "c.safetensors", metadata={"note": "hi"})
    with safe_open(tmp_path / "c.safetensors", "pt") as f:
        names = list(f.keys())
        meta = json.loads(f.metadata()["tslm"])
    assert meta["iteration"] == 3 and meta["metadata"] == {"note": "hi"}
    assert meta["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.95]
    assert any(n.startswith("optim.") and n.endswith("exp_avg_sq") for n in names)
    assert all(n.startswith(("model.", "optim.")) for n in names)


def test_tied_weights_saved_once_and_retied(tmp_path):
    model, opt = _trained(tie=True)
    save_checkpoint(model, opt, 1, tmp_path / "t.safetensors")
    ck = read_checkpoint(tmp_path / "t.safetensors")
    assert ck.tied == {"lm_head.weight": "token_embeddings.weight"} and "lm_head.weight" not in ck.model
    m2, o2 = _fresh(tie=True)
    load_checkpoint(tmp_path / "t.safetensors", m2, o2)
    assert m2.lm_head.weight is m2.token_embeddings.weight and _same_state(model, m2)


def test_plain_names_after_torch_compile(tmp_path):
    # A real torch.compile (dynamo graph capture + AOT autograd) of the tiniest model, with a forward
    # and backward through it. The `_orig_mod.` prefix comes from the OptimizedModule wrapper, which
    # every backend shares; "aot_eager" skips inductor's C++ code generation (over a minute on 2 CPU
    # cores). If torch.compile is broken here this test fails: it is never skipped.
    torch._dynamo.reset()  # compiled code is cached per function: keep other tests' compiles independent
    try:
        _check_compiled_names(tmp_path)
    finally:
        torch._dynamo.reset()


def _check_compiled_names(tmp_path):
    model, opt = _trained(steps=0)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randint(0, 50, (1, 4))
    cross_entropy(compiled(x), x).backward()
    opt.step()
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())  # the problem being solved
    save_checkpoint(compiled, opt, 1, tmp_path / "c.safetensors")
    names = list(read_checkpoint(tmp_path / "c.safetensors").model)
    assert names and not any("_orig_mod" in n or n.startswith("module.") for n in names)
    m2, o2 = _fresh()
    load_checkpoint(tmp_path / "c.safetensors", m2, o2)  # loads into a plain, uncompiled model
    assert _same_state(model, m2)
    load_checkpoint(tmp_path / "c.safetensors", torch.compile(_fresh()[0]))  # and into a compiled one


def test_ddp_style_module_prefix_is_stripped(tmp_path):
    class Wrapper(torch.nn.Module):  # names like DistributedDataParallel's: module.<name>
        def __init__(self, m):
            super().__init__()
            self.module = m

    model, _ = _trained()
    save_checkpoint(Wrapper(model), None, 5, tmp_path / "w.safetensors")
    assert not any(n.startswith("module.") for n in read_checkpoint(tmp_path / "w.safetensors").model)
    m2, _ = _fresh()
    assert load_checkpoint(tmp_path / "w.safetensors", m2, None) == 5 and _same_state(model, m2)


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage", "header", "foreign"])
def test_damaged_checkpoint_is_a_user_error_naming_the_file(tmp_path, damage):
    from safetensors.torch import save_file

    model, opt = _trained()
    f = tmp_path / "bad.safetensors"
    save_checkpoint(model, opt, 1, f)
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) - 100])
    elif damage == "empty":
        f.write_bytes(b"")
    elif damage == "garbage":
        f.write_bytes(os.urandom(4096))
    elif damage == "header":
        f.write_bytes(data[:8] + b"{not json" + data[17:])
    else:
        save_file({"x": torch.zeros(2)}, str(f))  # valid safetensors, not a tslm checkpoint
    with pytest.raises(UserError) as e:
        load_checkpoint(f, _fresh()[0], None)
    assert str(f) in str(e.value)


def test_shape_mismatch_is_a_user_error(tmp_path):
    model, _ = _trained()
    save_checkpoint(model, None, 1, tmp_path / "c.safetensors")
    other = TransformerLM(ModelConfig(**{**CFG, "d_model": 32}))
    with pytest.raises(UserError, match="shape"):
        load_checkpoint(tmp_path / "c.safetensors", other)
    with pytest.raises(UserError, match="no optimizer state"):
        load_checkpoint(tmp_path / "c.safetensors", _fresh()[0], _fresh()[1])


def test_kill_9_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    """A child process saves step 1, then starts saving step 2 over it and is SIGKILLed while the
    bytes are being written (fsync is made to block, so the kill lands mid-write)."""
    target = tmp_path / "ckpt.safetensors"
    started = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import os, time, torch
        from tinystories_cli import checkpoint
        from tinystories_cli.config import ModelConfig
        from tinystories_cli.model import TransformerLM
        model = TransformerLM(ModelConfig(**{CFG!r}))
        checkpoint.save_checkpoint(model, None, 1, {str(target)!r})
        def stuck_fsync(fd):
            open({str(started)!r}, "w").close()
            time.sleep(60)
        os.fsync = stuck_fsync
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        checkpoint.save_checkpoint(model, None, 2, {str(target)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not started.exists():
            assert proc.poll() is None, "writer exited before reaching the write"
            assert time.time() < deadline, "writer never reached the write"
            time.sleep(0.05)
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.safetensors.")]
        assert temps and temps[0].stat().st_size > 0  # the new bytes are in a temp file, not the target
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    model = TransformerLM(ModelConfig(**CFG))
    assert load_checkpoint(target, model) == 1  # the previous checkpoint, intact
