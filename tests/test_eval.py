"""Evaluation: bits-per-byte against a hand computation, windows, and `tslm eval` end to end."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinystories_cli.config import ModelConfig
from tinystories_cli.evaluate import evaluate_tokens, position_buckets, window_starts
from tinystories_cli.model import TransformerLM

from train_fixtures import trained_runs


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
    return trained_runs(tmp_path_factory.mktemp("evalrun"), {"ev": []})


@pytest.fixture
def trained_run(_trained_dir, use_workspace):
    return use_workspace(_trained_dir)


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


# ---------------------------------------------------------------- loss by position (--per-position)


def test_per_position_losses_add_up_to_the_overall_loss():
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=40, context_length=8, d_model=16, num_layers=1, num_heads=2))
    tokens = np.random.default_rng(1).integers(0, 40, size=29).astype(np.uint16)
    plain = evaluate_tokens(model, tokens, context_length=8, batch_size=2)
    got = evaluate_tokens(model, tokens, context_length=8, batch_size=2, per_position=True)
    # the existing keys and values are unchanged by the option
    assert {k: got[k] for k in plain} == plain
    # windows [0:8] [8:16] [16:24] cover positions 0..7, the tail [24:28] positions 0..3
    assert got["position_tokens"] == [4, 4, 4, 4, 3, 3, 3, 3]
    assert sum(got["position_nats"]) == pytest.approx(got["total_nats"], rel=1e-12)
    assert sum(got["position_nats"]) / sum(got["position_tokens"]) == pytest.approx(got["loss"], rel=1e-12)
    # position p by hand: the loss of predicting token p + 1 of each window
    by_hand = [0.0] * 8
    with torch.no_grad():
        for start, length in ((0, 8), (8, 8), (16, 8), (24, 4)):
            x = torch.tensor(tokens[start:start + length], dtype=torch.long)[None]
            y = torch.tensor(tokens[start + 1:start + length + 1], dtype=torch.long)
            nll = F.cross_entropy(model(x)[0], y, reduction="none")
            for p in range(length):
                by_hand[p] += nll[p].item()
    assert got["position_nats"] == pytest.approx(by_hand, rel=1e-5)
    buckets = position_buckets(got["position_nats"], got["position_tokens"], 3)
    assert [(b["first"], b["last"]) for b in buckets] == [(0, 1), (2, 4), (5, 7)]
    assert sum(b["tokens"] for b in buckets) == got["predicted_tokens"]
    assert sum(b["nats"] for b in buckets) == pytest.approx(got["total_nats"], rel=1e-12)
    assert buckets[0]["loss"] == pytest.approx(sum(by_hand[:2]) / 8, rel=1e-5)
    assert len(position_buckets(got["position_nats"], got["position_tokens"], 100)) == 8  # at most one per position
    with pytest.raises(ValueError, match="must be positive"):
        position_buckets(got["position_nats"], got["position_tokens"], 0)


def test_position_buckets_doctest():
    import doctest

    from tinystories_cli import evaluate

    assert doctest.testmod(evaluate).failed == 0


def test_cli_eval_per_position_table_json_and_plot(trained_run, run_cli):
    png = trained_run / "pos.png"
    png.unlink(missing_ok=True)
    out_file = trained_run / "pos.json"
    out_file.unlink(missing_ok=True)
    code, out, err = run_cli("eval", "--per-position", "--buckets", "4", "--json", "--out", str(out_file),
                             "--plot", str(png))
    assert code == 0, err
    r = json.loads(out)
    assert r == json.loads(out_file.read_text())
    assert len(r["position_nats"]) == len(r["position_tokens"]) == r["context_length"] == 16
    assert sum(r["position_tokens"]) == r["predicted_tokens"]
    assert sum(r["position_nats"]) == pytest.approx(r["total_nats"], rel=1e-9)
    assert sum(r["position_nats"]) / sum(r["position_tokens"]) == pytest.approx(r["loss"], rel=1e-9)
    assert [(b["first"], b["last"]) for b in r["position_buckets"]] == [(0, 3), (4, 7), (8, 11), (12, 15)]
    weighted = sum(b["loss"] * b["tokens"] for b in r["position_buckets"]) / r["predicted_tokens"]
    assert weighted == pytest.approx(r["loss"], rel=1e-9)
    # the same overall numbers as a plain eval
    code, out, err = run_cli("eval", "--json", "--out", str(trained_run / "plain.json"), "--force")
    assert code == 0, err
    assert json.loads(out)["loss"] == r["loss"] and "position_nats" not in json.loads(out)
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the rich table: one row per bucket
    code, out, err = run_cli("eval", "--per-position", "--out", str(out_file), "--force")
    assert code == 0, err
    text = " ".join(out.split())
    assert "loss by position" in text and "0-1 " in text and "14-15" in text and "vs overall" in text


@pytest.mark.parametrize("args, expected", [
    (["--per-position", "--buckets", "0"], "--buckets must be positive"),
    (["--plot", "pos.txt"], "--plot writes a PNG"),
])
def test_cli_eval_per_position_bad_input(trained_run, run_cli, args, expected):
    code, out, err = run_cli("eval", *args)
    assert code == 2 and expected in " ".join(err.split()), err
    assert len(err.strip().splitlines()) == 1
