"""The training loop: exact resume, DDP equivalence, signals, guard rails, run directory, bad input."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from tinystories_cli import paths, runs
from tinystories_cli import train as T
from tinystories_cli.checkpoint import read_checkpoint
from tinystories_cli.config import ModelConfig
from tinystories_cli.device import autocast_factory
from tinystories_cli.errors import UserError
from tinystories_cli.train.loop import make_loss_fn

from train_fixtures import TINY_MODEL, TINY_TRAIN, free_port, write_token_file
from train_fixtures import latest_weights as _weights
from train_fixtures import train_tiny as _run


def test_exact_resume_matches_uninterrupted_run(workspace):
    # dropout > 0 so the restored torch RNG state matters too
    model = {"dropout": 0.1}
    full = _run("full", model)
    first = _run("split", model, stop_at=4)
    assert first.stopped == "stop_at" and first.step == 4
    second = _run("split", model, resume="auto")
    assert second.step == 8 and set(second.train_losses) == {5, 6, 7, 8}
    losses = {**first.train_losses, **second.train_losses}
    assert losses == full.train_losses  # bit-identical, not approximately equal
    assert second.val_losses == {8: full.val_losses[8]}
    a, b = _weights(full.run_dir), _weights(second.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # metrics.jsonl of the resumed run has each step once, in order
    steps = [json.loads(line)["step"] for line in (second.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_run_directory_contents(tiny_workspace):
    tmp, tok = tiny_workspace
    res = _run("contents", train={"keep_last": 1})
    d = res.run_dir
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == tok.vocab_size  # from the tokenizer, not the preset's 512
    assert cfg["tokens_per_step"] == 4 * 16 and cfg["planned_tokens"] == 8 * 4 * 16
    assert cfg["parameters"] > 0 and cfg["tokenizer"]["fingerprint"] == tok.fingerprint
    assert sorted(p.name for p in (d / "tokenizer").iterdir()) == sorted(
        p.name for p in (tmp / "data" / "tiny" / "tokenizer").iterdir())
    assert [s for s, _ in runs.step_checkpoints(d)] == [8]  # keep_last=1
    assert runs.best_checkpoint(d) is not None
    assert (tmp / "runs" / "latest").resolve() == d.resolve()
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert all({"step", "tokens", "elapsed_s", "train_loss", "lr", "grad_norm"} <= r.keys() for r in records)
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
    assert records[-1]["lr"] == pytest.approx(3e-4)  # the cosine ends exactly at max_steps
    model, tokenizer, mcfg = runs.load_trained_model("contents")
    assert not model.training and tokenizer.fingerprint == tok.fingerprint and mcfg.vocab_size == tok.vocab_size


def test_train_tokens_sets_the_schedule(workspace):
    res = _run("tokens", train={"train_tokens": 4 * 16 * 5 + 1, "max_steps": 1000, "warmup_steps": 1})
    assert res.max_steps == 6 and res.step == 6


@pytest.fixture
def sigint_disposition():
    """Set SIGINT's disposition for the test and restore the inherited one afterwards: a suite started in the
    background (CI, `nohup`, `cmd &`) inherits SIG_IGN, one started at a terminal the default handler."""
    inherited = signal.getsignal(signal.SIGINT)

    def set_to(handler):
        signal.signal(signal.SIGINT, handler)

    yield set_to
    signal.signal(signal.SIGINT, inherited)


def test_sigint_saves_checkpoint_and_exits_cleanly(workspace, sigint_disposition):
    sigint_disposition(signal.default_int_handler)

    def interrupt(step, record):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives after step 2's work: noticed at the end of step 3

    run = T.prepare_run("debug", None, TINY_MODEL, {"dataset": "tiny", **TINY_TRAIN},
                        T.TrainOptions(run_name="sig", display="quiet", peak_tflops=1.0))
    res = T.train(run, on_step=interrupt)
    assert res.stopped == "interrupted" and res.step == 3
    assert [s for s, _ in runs.step_checkpoints(res.run_dir)] == [3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    assert _run("sig", resume="auto").step == 8


def test_inherited_ignored_sigint_is_respected(workspace, sigint_disposition):
    sigint_disposition(signal.SIG_IGN)  # as a background job starts

    def interrupt(step, record):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # ignored: the run goes on to the end

    run = T.prepare_run("debug", None, TINY_MODEL, {"dataset": "tiny", **TINY_TRAIN},
                        T.TrainOptions(run_name="sigign", display="quiet", peak_tflops=1.0))
    res = T.train(run, on_step=interrupt)
    assert res.stopped == "finished" and res.step == 8
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_nonfinite_loss_stops_with_clear_message(workspace, monkeypatch):
    import tinystories_cli.train.loop as L  # the loss the training loop calls

    real = L.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, targets):
        out = real(logits, targets)
        if torch.is_grad_enabled():  # training forwards only (evaluation runs under no_grad)
            calls["n"] += 1
            if calls["n"] == 5:
                return out * float("nan")
        return out

    monkeypatch.setattr(L, "cross_entropy", poisoned)
    with pytest.raises(T.NonFiniteError) as e:
        _run("nan")
    msg = str(e.value)
    assert "step 5" in msg and "step_0000004.safetensors" in msg and "`lr`" in msg  # (the CLI shows --lr)
    calls["n"] = 0
    res = _run("nan2", skip_nonfinite=1)  # skipped, then the run finishes
    assert res.step == 8 and res.train_losses[5] != res.train_losses[5]  # NaN logged for the skipped step


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_loss_equals_eager(dtype):
    # `train --compile` compiles the whole loss (model + cross-entropy, under autocast) as one graph;
    # aot_eager runs the same dynamo capture + AOT autograd as inductor without a C++ compiler.
    from tinystories_cli.model import TransformerLM

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=4))
    x, y = torch.randint(0, 64, (2, 2, 16)).unbind(0)
    autocast, _ = autocast_factory(torch.device("cpu"), dtype)
    eager = make_loss_fn(model, autocast)
    grads = []
    for fn in (eager, torch.compile(eager, backend="aot_eager")):
        model.zero_grad(set_to_none=True)
        loss = fn(x, y)
        loss.backward()
        grads.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    tol = 1e-5 if dtype == "float32" else 2e-2
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert not any(k.startswith("_orig_mod.") for k in model.state_dict())


def test_compile_failure_falls_back_to_eager(workspace, monkeypatch, capsys):
    class Broken(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

        def forward(self, *a, **k):
            raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda m, **k: Broken(m))
    run = T.prepare_run("debug", None, TINY_MODEL, {"dataset": "tiny", **TINY_TRAIN, "compile": True},
                        T.TrainOptions(run_name="comp", display="plain", peak_tflops=1.0))
    res = T.train(run)
    assert res.step == 8
    assert "torch.compile failed" in capsys.readouterr().out


def _ddp_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    paths.DATA_ROOT = Path(root) / "data"
    paths.RUNS_ROOT = Path(root) / "runs"
    try:
        res = _run("ddp", train={"max_steps": 4, "eval_every": 2, "save_every": 4, "batch_size": 2, "dtype": "float32"})
        if rank == 0:
            Path(out).write_text(json.dumps({"losses": res.train_losses, "val": res.val_losses}))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_equal_one_process_with_double_batch(workspace):
    tmp = workspace
    out = tmp / "ddp.json"
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), str(tmp), str(out)), nprocs=2, join=True)
    ddp = json.loads(out.read_text())
    # float32 on both sides: the comparison is of the arithmetic (bf16 autocast rounds per batch shape)
    single = _run("single", train={"max_steps": 4, "eval_every": 2, "save_every": 4, "batch_size": 4,
                                   "dtype": "float32"})
    assert [float(v) for v in ddp["losses"].values()] == pytest.approx(list(single.train_losses.values()), rel=1e-5)
    assert [float(v) for v in ddp["val"].values()] == pytest.approx(list(single.val_losses.values()), rel=1e-5)
    a, b = _weights(tmp / "runs" / "ddp"), _weights(single.run_dir)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    cfg = json.loads((tmp / "runs" / "ddp" / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["tokens_per_step"] == 2 * 2 * 16


# ---------------------------------------------------------------- bad input through the CLI


def _cli(run_cli, *args):
    code, out, err = run_cli("train", "--preset", "debug", "--dataset", "tiny", "--ctx", "16", "--d-model", "32",
                             "--num-layers", "1", "--num-heads", "2", "--max-steps", "4", "--warmup-steps", "1",
                             "--device", "cpu", "--quiet", *args)
    return code, " ".join((out + err).split())


def test_cli_trains_and_refuses_to_clobber_a_run(workspace, run_cli):
    code, text = _cli(run_cli, "--run-name", "r1")
    assert code == 0, text
    code, text = _cli(run_cli, "--run-name", "r1")
    assert code == 2 and "already holds a run" in text and "--resume" in text and "--force" in text
    assert _cli(run_cli, "--run-name", "r1", "--force")[0] == 0


@pytest.mark.parametrize("args, expected", [
    (["--lr", "-1"], "lr"),
    (["--warmup-steps", "10"], "warmup_steps (10) must not exceed max_steps (4)"),
    (["--vocab-size", "100"], "smaller than the tokenizer's 300"),
    (["--stop-at", "9"], "--stop-at 9 is outside 1..4"),
    (["--dataset", "nope"], "tokenizer not found"),
    (["--dtype", "float64"], "dtype"),
])
def test_cli_bad_config(workspace, run_cli, args, expected):
    code, text = _cli(run_cli, "--run-name", "bad", *args)
    assert code == 2 and expected in text, text
    assert "Traceback" not in text


def test_cli_missing_token_file_names_encode_command(workspace, run_cli):
    tmp = workspace
    (tmp / "data" / "tiny" / "valid.npy").unlink()
    code, text = _cli(run_cli, "--run-name", "m")
    assert code == 2 and "valid.npy" in text and "tslm encode" in text


def test_cli_tokenizer_mismatch_and_bad_ids(tiny_workspace, run_cli):
    tmp, tok = tiny_workspace
    f = tmp / "data" / "tiny" / "valid.npy"
    meta = json.loads(f.with_suffix(".json").read_text())
    meta["fingerprint"] = "0" * 64
    f.with_suffix(".json").write_text(json.dumps(meta))
    code, text = _cli(run_cli, "--run-name", "m")
    assert code == 2 and "valid.npy" in text and "tokenizer" in text, text

    # ids >= the model's vocab, as the sidecar says ...
    write_token_file(f, list(range(20)) + [tok.vocab_size + 5], tok, 100, vocab_size=tok.vocab_size + 10)
    code, text = _cli(run_cli, "--run-name", "m")
    assert code == 2 and "valid.npy" in text and f"id {tok.vocab_size + 5}" in text, text
    # ... and when a damaged sidecar hides them (the ids themselves are scanned)
    write_token_file(f, list(range(20)) + [tok.vocab_size + 5], tok, 100, max_id=19, vocab_size=tok.vocab_size + 10)
    code, text = _cli(run_cli, "--run-name", "m")
    assert code == 2 and "valid.npy" in text and f"id {tok.vocab_size + 5}" in text and "damaged" in text, text


def test_cli_corrupted_checkpoint_refused_previous_kept(workspace, run_cli):
    code, text = _cli(run_cli, "--run-name", "c", "--stop-at", "2", "--save-every", "1")
    assert code == 0, text
    d = paths.RUNS_ROOT / "c"
    latest = runs.latest_checkpoint(d)
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])
    code, text = _cli(run_cli, "--run-name", "c", "--resume")
    assert code == 2 and "step_0000002.safetensors" in text and "corrupted or truncated" in text
    assert "step_0000001.safetensors" in text  # names the previous one to resume from
    assert read_checkpoint(d / "checkpoints" / "step_0000001.safetensors").iteration == 1
    code, text = _cli(run_cli, "--resume", str(d / "checkpoints" / "step_0000001.safetensors"))
    assert code == 0, text


def test_prepare_run_rejects_changed_settings_on_resume(workspace):
    _run("chg", stop_at=2)
    with pytest.raises(UserError, match="lr"):
        T.prepare_run(None, None, None, {"lr": 1e-2}, T.TrainOptions(run_name="chg", resume="auto"))
    with pytest.raises(UserError, match="d_model"):
        T.prepare_run(None, None, {"d_model": 64}, None, T.TrainOptions(run_name="chg", resume="auto"))
    # settings that do not change what a step computes may change
    run = T.prepare_run(None, None, None, {"log_every": 3, "dataset": "tiny"},
                        T.TrainOptions(run_name="chg", resume="auto"))
    assert run.resume_from is not None and run.train_cfg.log_every == 3


def test_resume_auto_starts_a_run_that_has_no_checkpoint(workspace):
    res = _run("fresh", resume="auto", stop_at=1, train={"save_every": 100})
    assert res.step == 1 and (res.run_dir / "config.json").is_file()
    (res.run_dir / "checkpoints" / "step_0000001.safetensors").unlink()  # as if killed before its first save
    assert _run("fresh", resume="auto").step == 8  # started over (no "already holds a run" refusal)


def test_resume_across_processes_is_bit_identical_on_cpu(workspace):
    """N steps + resume N steps in fresh processes equals 2N steps bit for bit (losses and weights), as does
    a second fresh 2N run. The guarantee tested is the one that holds on any machine: one intra-op thread.
    With several threads the deterministic kernels (device.deterministic_on_cpu) made every comparison
    we ran identical (see the README), but a BLAS library may still pick its own partition of a matmul."""
    tmp = workspace
    import subprocess
    import sys

    env = {**os.environ, "TSLM_DATA": str(tmp / "data"), "TSLM_RUNS": str(tmp / "runs"), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    # Big enough that the embedding's backward would run on several threads if it had them.
    model = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY_MODEL, "context_length": 64, "d_model": 64,
                                                             "num_heads": 4}.items()]
    base = [sys.executable, "-m", "tinystories_cli", "train", "--preset", "debug", "--dataset", "tiny", "--quiet",
            "--peak-tflops", "1", "--device", "cpu", "--max-steps", "24", "--warmup-steps", "2", "--log-every", "1",
            "--batch-size", "16", *model]

    def tslm(*args):
        proc = subprocess.run([*base, *args], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr

    tslm("--run-name", "whole")
    tslm("--run-name", "again")
    tslm("--run-name", "halves", "--stop-at", "12")
    tslm("--run-name", "halves", "--resume")

    def losses(name):
        return [(r["step"], r["train_loss"]) for r in map(json.loads, (tmp / "runs" / name / "metrics.jsonl")
                                                           .read_text().splitlines()) if "train_loss" in r]

    assert losses("whole") == losses("again") == losses("halves") and len(losses("whole")) == 24
    w = _weights(tmp / "runs" / "whole")
    assert all(torch.equal(w[k], v) for k, v in _weights(tmp / "runs" / "halves").items())


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_cli_interrupted_run_saves_and_exits_with_the_signal_code(workspace, run_cli, monkeypatch, sigint_disposition,
                                                                  sig, code):
    # A scheduler (Slurm requeue) must see that the run did not finish: 128 + the signal's number.
    sigint_disposition(signal.default_int_handler)
    real = T.train

    def train_and_signal(run):
        return real(run, on_step=lambda step, record: step == 2 and os.kill(os.getpid(), sig))

    monkeypatch.setattr(T, "train", train_and_signal)
    got, text = _cli(run_cli, "--run-name", f"s{code}")
    assert got == code, text
    res = read_checkpoint(runs.latest_checkpoint(paths.RUNS_ROOT / f"s{code}"))
    assert res.iteration == 3  # saved at the end of the step that noticed the signal


def test_no_host_sync_between_log_steps(workspace, monkeypatch):
    # Every way Python code reads a tensor's value on the host; each would stall a GPU pipeline per step.
    calls: list[str] = []
    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    per_step: dict[int, list[str]] = {}

    def count(step, record):
        per_step[step] = list(calls)
        calls.clear()

    run = T.prepare_run("debug", None, TINY_MODEL,
                        {"dataset": "tiny", **TINY_TRAIN, "log_every": 4, "eval_every": 100, "save_every": 100,
                         "grad_accum_steps": 2},
                        T.TrainOptions(run_name="sync", display="quiet", peak_tflops=1.0))
    res = T.train(run, on_step=count)
    assert res.step == 8 and len(res.train_losses) == 8  # every step's loss still reaches the result
    assert all(v == v for v in res.train_losses.values())
    assert {s: per_step[s] for s in (2, 3, 5, 6, 7)} == {s: [] for s in (2, 3, 5, 6, 7)}
    assert per_step[4]  # the log step does read values (the counter works)


def test_auto_dtype_compile_and_matmul_precision_follow_the_device(workspace, monkeypatch):
    from tinystories_cli import device as D

    cuda, cpu, mps = torch.device("cuda", 0), torch.device("cpu"), torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(D, "cpu_flags", lambda: {"avx512f", "avx2"})  # a CPU without bf16 units
    assert [D.choose_dtype("auto", d) for d in (cuda, cpu, mps)] == ["bfloat16", "float32", "float32"]
    monkeypatch.setattr(D, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})  # one with them (or amx_bf16)
    assert [D.choose_dtype("auto", d) for d in (cuda, cpu, mps)] == ["bfloat16", "bfloat16", "float32"]
    assert D.choose_dtype("float16", cpu) == "float16" and D.choose_dtype("float32", cuda) == "float32"
    assert D.choose_dtype("float32", cpu) == "float32"  # the old CPU path, forced
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert D.choose_dtype("auto", cuda) == "float32"
    assert [D.choose_compile(None, d) for d in (cuda, cpu, mps)] == [True, False, False]
    assert D.choose_compile(True, cpu) and not D.choose_compile(False, cuda)
    # on a CPU, auto compiles a run expected to train long enough to pay the compile back, with a compiler
    monkeypatch.setattr(D, "cxx_compiler", lambda: "/usr/bin/c++")
    assert not D.choose_compile(None, cpu, expected_seconds=D.COMPILE_PAYS_AFTER_S - 1)
    assert D.choose_compile(None, cpu, expected_seconds=D.COMPILE_PAYS_AFTER_S)
    monkeypatch.setattr(D, "cxx_compiler", lambda: None)
    assert not D.choose_compile(None, cpu, expected_seconds=1e6)
    assert not D.choose_compile(None, mps, expected_seconds=1e6)
    precision = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", precision.append)
    D.use_fast_fp32_matmul(cpu)
    assert precision == []  # CPU matmuls stay exact
    D.use_fast_fp32_matmul(cuda)
    assert precision == ["high"]  # TF32 for what stays float32 on a GPU
    res = _run("chosen")  # the CPU flags patched above say avx512_bf16; no C++ compiler: eager
    cfg = json.loads((res.run_dir / "config.json").read_text())
    assert cfg["train"]["dtype"] == "auto" and cfg["train"]["compile"] is None
    assert cfg["chosen"] == {"dtype": "bfloat16", "compile": False, "parallel": "none",
                             "float32_matmul_precision": "highest", "activation_checkpointing": False}


def test_float16_loss_scaling_trains_resumes_exactly_and_survives_an_inf(workspace, monkeypatch):
    import tinystories_cli.train.loop as L

    fp16 = {"dtype": "float16"}
    full = _run("fp16", train=fp16)
    assert all(v == v for v in full.train_losses.values())
    assert full.train_losses[8] < full.train_losses[1]
    first = _run("fp16split", train=fp16, stop_at=4)
    second = _run("fp16split", train=fp16, resume="auto")
    assert {**first.train_losses, **second.train_losses} == full.train_losses  # scaler state resumed exactly
    ckpt = read_checkpoint(runs.latest_checkpoint(second.run_dir))
    assert {"scaler.scale", "scaler.good_steps"} <= ckpt.extra.keys()

    real, calls = L.clip_grad_norm_, {"n": 0}

    def inject(params, max_norm):
        params = list(params)
        calls["n"] += 1
        if calls["n"] == 5:
            params[0].grad[0, 0] = float("inf")  # as an overflowing float16 backward leaves it
        return real(params, max_norm)

    monkeypatch.setattr(L, "clip_grad_norm_", inject)
    res = _run("fp16inf", train=fp16)  # --skip-nonfinite 0, yet the run goes on: the scaler owns this
    assert res.step == 8 and all(v == v for v in res.train_losses.values())
    records = {r["step"]: r for r in map(json.loads, (res.run_dir / "metrics.jsonl").read_text().splitlines())}
    assert records[5]["skipped_steps"] == records[4]["skipped_steps"] + 1
    assert records[5]["loss_scale"] == records[4]["loss_scale"] / 2


def test_time_budget_plans_the_schedule_from_a_probe_and_keeps_the_deadline(workspace, monkeypatch):
    import time

    import tinystories_cli.train.loop as L
    from tinystories_cli.train.loop import plan_time_budget

    # the probe as a shared machine might report it: 200 tokens/s after 0.5 s (deterministic plan)
    monkeypatch.setattr(L, "measure_throughput", lambda run, max_seconds, max_steps: (200.0, 0.5))
    train = {"dataset": "tiny", **TINY_TRAIN, "eval_every": 1000, "save_every": 1000}
    res = T.train(T.prepare_run("debug", None, TINY_MODEL, train,
                                T.TrainOptions(run_name="budget", display="quiet", peak_tflops=1.0, time_budget=6.0)))
    cfg = json.loads((res.run_dir / "config.json").read_text())
    tb = cfg["time_budget"]
    steps = int((6.0 - 0.5 - 0.18) * 200.0 / 64 / (1 + 2 / (3 * 1000)))
    assert tb["budget_s"] == 6.0 and tb["planned_steps"] == res.max_steps == cfg["train"]["max_steps"] == steps
    assert tb["probe_tokens_per_s"] > 0 and 0 < tb["actual_s"] < 6.0 * 1.5 + 2 and tb["steps_done"] == res.step
    assert "time budget (s)" in (res.run_dir / "README.md").read_text()
    records = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["lr"] == pytest.approx(3e-4)  # the cosine was planned to end at the planned step
    # a machine that slows down: the run stops at the deadline, with a checkpoint
    run = T.prepare_run("debug", None, TINY_MODEL, train,
                        T.TrainOptions(run_name="late", display="quiet", peak_tflops=1.0, time_budget=6.0))
    plan_time_budget(run)
    run.time_plan.deadline = time.perf_counter()
    late = T.train(run)
    assert late.stopped == "time_budget" and late.step == 1
    assert [s for s, _ in runs.step_checkpoints(late.run_dir)] == [1]
    with pytest.raises(UserError, match="resumed run keeps its plan"):
        T.prepare_run(None, None, None, None, T.TrainOptions(run_name="late", resume="auto", time_budget=60.0))
    with pytest.raises(UserError, match="cannot read duration"):
        T.parse_duration("ninety minutes")


def test_a_deadline_that_passes_at_the_last_step_is_a_finished_run(workspace):
    """Reaching the deadline on the run's last step ends it normally: not "interrupted" (which made
    quickstart exit 130 on a busy machine) and not "time_budget"."""
    import time

    train = {"dataset": "tiny", **TINY_TRAIN, "max_steps": 1, "warmup_steps": 1}
    run = T.prepare_run("debug", None, TINY_MODEL, train,
                        T.TrainOptions(run_name="just-in-time", display="quiet", peak_tflops=1.0))
    run.time_plan = T.time_plan(1.0, time.perf_counter() - 1.0, 0.0, 1e3, 1)
    res = T.train(run)
    assert res.stopped == "finished" and res.step == 1 and res.signal is None
    assert [s for s, _ in runs.step_checkpoints(res.run_dir)] == [1]


def test_a_run_that_slows_down_shortens_its_schedule_to_end_by_the_deadline(workspace):
    """The probe saw a fast machine, then every step got 30 ms slower: instead of being cut off at full
    learning rate, the run shortens its schedule (WSD here) so that it decays, evaluates and saves its
    last step before the deadline; config.json holds the new length, so a resume agrees with it."""
    import time

    train = {"dataset": "tiny", **TINY_TRAIN, "max_steps": 400, "schedule": "wsd", "eval_every": 25,
             "save_every": 50, "log_every": 5}
    run = T.prepare_run("debug", None, TINY_MODEL, train,
                        T.TrainOptions(run_name="slow", display="quiet", peak_tflops=1.0))
    start = time.perf_counter()
    run.time_plan = T.time_plan(4.0, start + 4.0, 0.0, 1e6, 400)
    res = T.train(run, on_step=lambda step, record: time.sleep(0.03))  # 400 steps would take 12 s
    took = time.perf_counter() - start
    assert res.stopped == "finished" and 20 < res.step == res.max_steps < 400, (res.stopped, res.step)
    assert took < 4.0 + 1.0
    cfg = json.loads((res.run_dir / "config.json").read_text())
    assert cfg["max_steps"] == cfg["train"]["max_steps"] == res.step
    assert cfg["time_budget"]["replanned"][-1]["to"] == res.step and cfg["time_budget"]["planned_steps"] == 400
    # The first change shortens (the probe over-read the machine). A later one may lengthen again while the
    # WSD schedule is still flat, when the pace measured since turns out faster than the early steps said
    # (fit_to_deadline's documented behaviour); the deadline and the decayed end are asserted above and below.
    replanned = cfg["time_budget"]["replanned"]
    assert replanned[0]["from"] == 400 and replanned[0]["to"] < 400
    assert all(r["to"] < r["from"] or r["at_step"] < replanned[-1]["to"] * 0.8 for r in replanned)
    records = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == res.step and records[-1]["lr"] == pytest.approx(3e-4)  # decayed to the end
    assert "val_loss" in records[-1] and [s for s, _ in runs.step_checkpoints(res.run_dir)][-1] == res.step
    again = T.prepare_run(None, None, None, None, T.TrainOptions(run_name="slow", resume="auto"))
    assert again.max_steps == again.end_step == again.train_cfg.max_steps == res.step


def test_a_run_faster_than_its_probe_lengthens_a_flat_wsd_schedule_up_to_its_cap(workspace):
    """The probe under-read the machine: 60 steps were planned for a deadline that leaves time for many
    more. A WSD run still in its flat phase lengthens its schedule to the cap (quickstart's passes over
    the data); every step before the change kept the rate it had, and the run still decays to its end.
    A cosine run keeps its 60 steps (lengthening would change the rate of steps already taken)."""
    import time

    train = {"dataset": "tiny", **TINY_TRAIN, "max_steps": 60, "schedule": "wsd", "eval_every": 20,
             "save_every": 20, "log_every": 5}
    run = T.prepare_run("debug", None, TINY_MODEL, train,
                        T.TrainOptions(run_name="fast", display="quiet", peak_tflops=1.0))
    run.time_plan = T.time_plan(600.0, time.perf_counter() + 600.0, 0.0, 1e3, 60, max_steps_cap=150)
    res = T.train(run)
    assert res.stopped == "finished" and res.step == res.max_steps == 150, (res.stopped, res.step)
    cfg = json.loads((res.run_dir / "config.json").read_text())
    assert cfg["max_steps"] == cfg["train"]["max_steps"] == 150
    changes = cfg["time_budget"]["replanned"]
    assert changes[0]["from"] == 60 and changes[-1]["to"] == 150 and cfg["time_budget"]["max_steps_cap"] == 150
    assert changes[0]["at_step"] < 60 - 12  # before the 60-step schedule's decay began (its last 20%)
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (res.run_dir / "metrics.jsonl").read_text().splitlines())
           if "lr" in r}
    assert all(lr == pytest.approx(3e-3) for s, lr in lrs.items() if 2 <= s <= 120)  # flat through the old end
    assert lrs[150] == pytest.approx(3e-4) and lrs[135] < 3e-3  # the decay moved to the new end
    assert [s for s, _ in runs.step_checkpoints(res.run_dir)][-1] == 150
    again = T.prepare_run(None, None, None, None, T.TrainOptions(run_name="fast", resume="auto"))
    assert again.max_steps == again.end_step == 150

    cosine = T.prepare_run("debug", None, TINY_MODEL, {**train, "schedule": "cosine"},
                           T.TrainOptions(run_name="fast-cosine", display="quiet", peak_tflops=1.0))
    cosine.time_plan = T.time_plan(600.0, time.perf_counter() + 600.0, 0.0, 1e3, 60, max_steps_cap=150)
    res = T.train(cosine)
    assert res.step == res.max_steps == 60 and not cosine.time_plan.replanned


def test_a_schedule_already_decaying_is_not_lengthened(workspace):
    """Only the flat phase may grow: a WSD run whose decay began before its pace was known keeps its length."""
    import time

    train = {"dataset": "tiny", **TINY_TRAIN, "max_steps": 60, "schedule": "wsd", "decay_fraction": 0.9,
             "eval_every": 20, "save_every": 20, "log_every": 5}
    run = T.prepare_run("debug", None, TINY_MODEL, train,
                        T.TrainOptions(run_name="decaying", display="quiet", peak_tflops=1.0))
    run.time_plan = T.time_plan(600.0, time.perf_counter() + 600.0, 0.0, 1e3, 60, max_steps_cap=150)
    res = T.train(run)  # the decay starts at step 6, before the pace is trusted (5% of 60, at least 5 steps)
    assert res.step == res.max_steps == 60 and not run.time_plan.replanned


@pytest.mark.parametrize("model, batch, budget", [
    ({"context_length": 64, "d_model": 64, "num_layers": 2, "num_heads": 4, "d_ff": 192}, 32, "20MB"),
    ({"context_length": 128, "d_model": 96, "num_layers": 3, "num_heads": 4, "d_ff": 256}, 16, "40MB"),
    ({"context_length": 64, "d_model": 64, "num_layers": 2, "num_heads": 4, "d_ff": 192,
      "vocab_size": 4096}, 24, "30MB"),
])
def test_fit_memory_choice_stays_under_the_budget_by_measure(workspace, model, batch, budget):
    from tinystories_cli import account
    from tinystories_cli.train.prepare import FIT_MARGIN

    limit = account.parse_memory(budget)
    run = T.prepare_run("debug", None, model, {"dataset": "tiny", **TINY_TRAIN, "batch_size": batch},
                        T.TrainOptions(run_name="fit", fit_memory=limit))
    tc = run.train_cfg
    assert tc.batch_size * tc.grad_accum_steps == batch and 1 <= tc.batch_size < batch  # global batch kept
    assert run.notes and f"micro-batch {tc.batch_size} x accumulation {tc.grad_accum_steps}" in run.notes[0]
    mem = account.training_memory(run.model_cfg, tc.batch_size)
    measured = account.measure_activation_bytes(run.model_cfg, tc.batch_size)
    assert mem["total"] - mem["activations"] + measured <= limit * (1 - FIT_MARGIN)
    bigger = min(b for b in range(tc.batch_size + 1, batch + 1) if batch % b == 0)
    assert account.training_memory(run.model_cfg, bigger)["total"] > limit * (1 - FIT_MARGIN)  # the largest that fits
