"""`account.activation_bytes` (the estimate) against what autograd really saves (`measure_activation_bytes`),
and `account.parameter_counts` against the real model."""

import json

import pytest

from tinystories_cli import account
from tinystories_cli.cli import main
from tinystories_cli.config import ModelConfig
from tinystories_cli.model import TransformerLM

SMALL = dict(vocab_size=300, context_length=64, d_model=96, num_layers=2, num_heads=4)


@pytest.mark.parametrize("arch", [
    dict(),  # pre-norm RMSNorm / RoPE / SwiGLU
    dict(norm="layernorm", norm_position="post", pos_emb="sinusoidal", ffn="relu", tie_embeddings=True),  # vanilla
])
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_activation_estimate_within_10_percent_of_measured(arch, backend):
    cfg = ModelConfig(**SMALL, **arch, attention_backend=backend)
    measured = account.measure_activation_bytes(cfg, batch_size=3)
    estimated = account.activation_bytes(cfg, batch_size=3)["total"]
    assert measured > 0
    assert abs(estimated / measured - 1) < 0.10, (estimated, measured)


def test_activation_estimate_other_switches():
    for arch in (dict(norm="none", pos_emb="nope", ffn="gelu"), dict(pos_emb="learned", ffn="silu", dropout=0.1)):
        cfg = ModelConfig(**SMALL, **arch)
        measured = account.measure_activation_bytes(cfg, batch_size=2, seq_len=32)
        estimated = account.activation_bytes(cfg, batch_size=2, seq_len=32)["total"]
        assert abs(estimated / measured - 1) < 0.10, (arch, estimated, measured)


def test_parameter_counts_match_the_model_for_presets():
    for arch in (dict(), dict(norm="layernorm", layernorm_bias=False, pos_emb="learned", tie_embeddings=True),
                 dict(norm="layernorm", norm_position="post", ffn="gelu")):
        cfg = ModelConfig(**SMALL, **arch)
        model = TransformerLM(cfg)
        assert account.parameter_counts(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_cli_account_measure(capsys):
    rc = main(["account", "debug", "--measure", "--batch-size", "2", "--json"])
    out = capsys.readouterr().out
    assert rc in (0, None), out
    assert '"activations_measured"' in out


@pytest.mark.parametrize("arch", [dict(), dict(norm="layernorm", norm_position="post", ffn="relu", dropout=0.1)])
def test_activation_checkpointing_estimate_and_measurement_shrink_together(arch):
    cfg = ModelConfig(**{**SMALL, "num_layers": 4}, **arch)
    plain = account.measure_activation_bytes(cfg, batch_size=2)
    checkpointed = account.measure_activation_bytes(cfg, batch_size=2, activation_checkpointing=True)
    estimated = account.activation_bytes(cfg, batch_size=2, activation_checkpointing=True)["total"]
    assert checkpointed < plain / 2
    assert abs(estimated / checkpointed - 1) < 0.10, (estimated, checkpointed)


def test_cli_account_measure_with_activation_checkpointing(capsys):
    rc = main(["account", "debug", "--measure", "--batch-size", "2", "--activation-checkpointing", "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rc in (0, None)
    m = rep["memory"]
    assert abs(m["activations"] / m["activations_measured"] - 1) < 0.10
