"""Evaluation: bits-per-byte against a hand computation, windows, and `tslm eval` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinystories_cli import paths
from tinystories_cli.config import ModelConfig
from tinystories_cli.evaluate import evaluate_tokens, window_starts
from tinystories_cli.model import TransformerLM

from train_fixtures import make_dataset


def test_windows_predict_every_token_once():
    for n, ctx in ((10, 4), (9, 4), (2, 4), (100, 7)):
        w = window_starts(n, ctx)
        assert sum(length for _, length in w) == n - 1
        assert all(s == i * ctx for i, (s, _) in enumerate(w))


def test_bits_per_byte_matches_a_hand_computation():
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=40, context_length=8, d_model=16, num_layers=1, num_heads=2))
    tokens = np.random.default_rng(0).integers(0, 40, size=29).astype(np.uint16)
    source_bytes = 113
    got = evaluate_tokens(model, tokens, context_length=8, batch_size=2, source_bytes=source_bytes)
    # by hand: windows [0:8] [8:16] [16:24] predict the next 8 ids each, [24:28] predicts 4
    nats = 0.0
    with torch.no_grad():
        for start, length in ((0, 8), (8, 8), (16, 8), (24, 4)):
            x = torch.tensor(tokens[start:start + length], dtype=torch.long)[None]
            y = torch.tensor(tokens[start + 1:start + length + 1], dtype=torch.long)
            nats += F.cross_entropy(model(x)[0], y, reduction="sum").item()
    assert got["predicted_tokens"] == 28 and got["windows"] == 4
    assert got["loss"] == pytest.approx(nats / 28, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nats / 28), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nats / (source_bytes * math.log(2)), rel=1e-5)


@pytest.fixture(scope="module")
def _trained_dir(tmp_path_factory):
    """One tiny trained run shared by the CLI tests of this module (training is the slow part)."""
    from tinystories_cli.cli import main

    root = tmp_path_factory.mktemp("evalrun")
    make_dataset(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(paths, "DATA_ROOT", root / "data")
        mp.setattr(paths, "RUNS_ROOT", root / "runs")
        code = main(["train", "--preset", "debug", "--dataset", "tiny", "--ctx", "16", "--d-model", "32",
                     "--num-layers", "1", "--num-heads", "2", "--max-steps", "4", "--warmup-steps", "1",
                     "--eval-every", "2", "--device", "cpu", "--run-name", "ev", "--quiet", "--peak-tflops", "1"])
    assert code == 0
    return root


@pytest.fixture
def trained_run(_trained_dir, monkeypatch):
    monkeypatch.setattr(paths, "DATA_ROOT", _trained_dir / "data")
    monkeypatch.setattr(paths, "RUNS_ROOT", _trained_dir / "runs")
    return _trained_dir


def test_cli_eval_writes_json(trained_run, run_cli):
    code, out, err = run_cli("eval", "--json")  # runs/latest, data/tiny/valid.npy
    assert code == 0, err
    result = json.loads(out)
    saved = json.loads((trained_run / "runs" / "ev" / "eval_valid.json").read_text())
    assert saved["loss"] == result["loss"] and result["checkpoint"].endswith("best.safetensors")
    meta = json.loads((trained_run / "data" / "tiny" / "valid.json").read_text())
    assert result["predicted_tokens"] == meta["num_tokens"] - 1 and result["source_bytes"] == meta["source_bytes"]
    assert result["bits_per_byte"] == pytest.approx(
        result["loss"] * result["predicted_tokens"] / (meta["source_bytes"] * math.log(2)))
    # a checkpoint file and another data file work too
    ckpt = trained_run / "runs" / "ev" / "checkpoints" / "step_0000004.safetensors"
    out_file = trained_run / "e.json"
    out_file.unlink(missing_ok=True)
    code, out, err = run_cli("eval", str(ckpt), "--data", str(trained_run / "data" / "tiny" / "valid.npy"),
                             "--out", str(out_file), "--json", "--batch-size", "64")
    assert code == 0, err
    assert json.loads(out)["step"] == 4 and json.loads(out_file.read_text())["step"] == 4
    code, out, err = run_cli("eval", str(ckpt), "--out", str(out_file))
    assert code == 2 and "already exists" in err


@pytest.mark.parametrize("args, expected", [
    (["--ctx", "17"], "exceeds the model's context length 16"),
    (["--data", "nope.npy"], "not found"),
    (["missing-run"], "no run or checkpoint named 'missing-run'"),
    (["--batch-size", "0"], "--batch-size must be positive"),
])
def test_cli_eval_bad_input(trained_run, run_cli, args, expected):
    code, out, err = run_cli("eval", *args)
    assert code == 2 and expected in " ".join(err.split()), err


def test_cli_eval_corrupted_checkpoint(trained_run, run_cli):
    import shutil

    shutil.copytree(trained_run / "runs" / "ev", trained_run / "runs" / "broken")
    best = trained_run / "runs" / "broken" / "checkpoints" / "best.safetensors"
    best.write_bytes(best.read_bytes()[:100])
    code, out, err = run_cli("eval", "broken")
    assert code == 2 and "best.safetensors" in " ".join(err.split()) and "corrupted" in err
