import json
import math

import pytest

from tinystories_cli import account
from tinystories_cli.config import PRESETS, ModelConfig

# The seeds' accounting tables (001_*.txt): exact parameter counts and forward FLOPs at ctx 1024.
SEED_PARAMS = {
    "gpt2-small": 190_460_160,
    "gpt2-medium": 505_629_696,
    "gpt2-large": 1_072_469_760,
    "gpt2-xl": 2_127_057_600,
}
SEED_FLOPS = {"gpt2-small": "349.630B", "gpt2-medium": "1.033T", "gpt2-large": "2.258T", "gpt2-xl": "4.513T"}


@pytest.mark.parametrize("name", SEED_PARAMS)
def test_parameter_counts_match_seeds(name):
    assert account.parameter_counts(PRESETS[name].model)["total"] == SEED_PARAMS[name]


def _fmt(x: float) -> str:
    from tinystories_cli.console import human_count

    return human_count(x)


@pytest.mark.parametrize("name", SEED_FLOPS)
def test_forward_flops_match_seeds(name):
    assert _fmt(account.forward_flops(PRESETS[name].model, 1024)["total"]) == SEED_FLOPS[name]


def test_gpt2_xl_long_context_shares():
    cfg = PRESETS["gpt2-xl"].model.model_copy(update={"context_length": 16384})
    f = account.forward_flops(cfg)
    assert _fmt(f["total"]) == "149.523T"
    for k in ("attention_scores", "attention_weighted"):
        assert round(100 * f[k] / f["total"], 2) == 27.58
    # the seed's table, component by component
    assert _fmt(f["qkv_projections"]) == "12.080T"
    assert _fmt(f["ffn"]) == "48.318T"
    assert _fmt(f["lm_head"]) == "2.635T"


def test_architecture_switches_change_counts():
    base = ModelConfig(vocab_size=1000, context_length=64, d_model=64, num_layers=2, num_heads=4)
    p = account.parameter_counts(base)
    tied = account.parameter_counts(base.model_copy(update={"tie_embeddings": True}))
    assert p["total"] - tied["total"] == 1000 * 64
    learned = account.parameter_counts(base.model_copy(update={"pos_emb": "learned"}))
    assert learned["total"] - p["total"] == 64 * 64
    gelu = ModelConfig(**{**base.model_dump(), "ffn": "gelu", "d_ff": base.d_ff})
    assert p["ffn_per_layer"] - account.parameter_counts(gelu)["ffn_per_layer"] == 64 * base.d_ff
    ln = account.parameter_counts(base.model_copy(update={"norm": "layernorm"}))
    assert ln["total"] - p["total"] == (2 * 2 + 1) * 64  # a bias per norm: 2 per layer + final
    none = account.parameter_counts(base.model_copy(update={"norm": "none"}))
    assert p["total"] - none["total"] == (2 * 2 + 1) * 64


def test_training_flops_and_memory():
    cfg = PRESETS["gpt2-small"].model
    assert account.train_flops_per_step(cfg, 4) == 3 * 4 * account.forward_flops(cfg)["total"]
    m = account.training_memory(cfg, 2)
    n = SEED_PARAMS["gpt2-small"]
    assert (m["parameters"], m["gradients"], m["optimizer_state"]) == (4 * n, 4 * n, 8 * n)
    act = [account.training_memory(cfg, b)["activations"] for b in (1, 2, 3)]
    assert act[2] - act[1] == act[1] - act[0] > 0  # activations grow linearly with the batch
    bmax = account.max_batch_size(cfg, account.parse_memory("80GB"))
    assert account.training_memory(cfg, bmax)["total"] <= 80 * 2**30 < account.training_memory(cfg, bmax + 1)["total"]


def test_time_estimate():
    cfg = PRESETS["gpt2-small"].model
    rep = account.report(cfg, batch_size=8, steps=100, peak_tflops=10.0, mfu=0.5)
    expected = 100 * account.train_flops_per_step(cfg, 8) / 5e12
    assert rep["time"]["seconds"] == pytest.approx(expected)
    by_tokens = account.report(cfg, batch_size=8, tokens=8 * 1024 * 100, peak_tflops=10.0, mfu=0.5)
    assert by_tokens["time"]["steps"] == 100


@pytest.mark.parametrize("text", ["80XB", "", "-3GB", "GB", "0GB"])
def test_parse_memory_rejects(text):
    with pytest.raises(Exception, match="memory size"):
        account.parse_memory(text)


def test_cli_tables(run_cli):
    code, out, err = run_cli("account", "gpt2-xl", "--ctx", "16384")
    assert code == 0, err
    for figure in ("2,127,057,600", "149.523T", "27.58%", "41.232T"):
        assert figure in out


def test_cli_json_matches_library(run_cli):
    code, out, _ = run_cli("account", "gpt2-xl", "--ctx", "16384", "--json", "--memory", "80GB", "--batch-size", "1")
    assert code == 0
    rep = json.loads(out)
    assert rep["parameters"]["total"] == SEED_PARAMS["gpt2-xl"]
    assert _fmt(rep["forward_flops"]["total"]) == "149.523T"
    assert rep["memory"]["max_batch_size"] >= 0
    assert rep["config"]["context_length"] == 16384


def test_cli_list(run_cli):
    code, out, _ = run_cli("account", "--list")
    assert code == 0
    for name in PRESETS:
        assert name in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["account", "gpt5"], "unknown preset 'gpt5'"),
        (["account", "gpt2-small", "--ctx", "0"], "context_length"),
        (["account", "tinystories-17m", "--num-heads", "7"], "divisible by num_heads"),
        (["account", "gpt2-small", "--memory", "80XB"], "cannot read memory size '80XB'"),
        (["account", "gpt2-small", "--mfu", "2"], "--mfu"),
        (["account", "gpt2-small", "--norm", "batchnorm"], "norm"),
    ],
)
def test_cli_bad_input_one_line_exit_2(run_cli, args, message):
    code, out, err = run_cli(*args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_cli_unknown_key_in_config_file(run_cli, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nwidth = 3\n")
    code, _, err = run_cli("account", "debug", "--config", str(cfg))
    assert code == 2 and "unknown key 'width'" in err


def test_fsdp_activation_checkpointing_and_dtype_memory_and_time():
    cfg = PRESETS["gpt2-xl"].model
    plain = account.training_memory(cfg, 4)
    ac = account.training_memory(cfg, 4, activation_checkpointing=True)
    assert ac["activations"] < plain["activations"] / 3 and ac["parameters"] == plain["parameters"]
    acts = account.activation_bytes(cfg, 4, activation_checkpointing=True)
    assert acts["layers"] == acts["checkpointed_inputs"] + acts["recomputed_layer"]
    fsdp = account.training_memory(cfg, 4, parallel="fsdp", world_size=8, dtype="bfloat16")
    p = account.parameter_counts(cfg)["total"]
    assert fsdp["parameters"] == math.ceil(p / 8) * 4 and fsdp["optimizer_state"] == 2 * fsdp["parameters"]
    assert fsdp["activations"] == plain["activations"]  # each rank runs its whole micro-batch
    assert fsdp["gather_buffers"] > 0 and fsdp["total"] < plain["total"]
    budget = account.parse_memory("24GB")
    setup = {"parallel": "fsdp", "world_size": 8, "activation_checkpointing": True}
    b = account.max_batch_size(cfg, budget, **setup)
    assert (
        account.training_memory(cfg, b, **setup)["total"]
        <= budget
        < account.training_memory(cfg, b + 1, **setup)["total"]
    )
    assert account.max_batch_size(cfg, budget) == 0  # replicated, it does not fit a 24 GB card at all
    # the time estimate uses the peak of the chosen precision, over all devices, plus the recompute
    fp32 = account.report(cfg, batch_size=4, steps=10, dtype="float32")["time"]
    bf16 = account.report(cfg, batch_size=4, steps=10, dtype="auto")["time"]
    assert fp32["peak_tflops"] == 156.0 and bf16["peak_tflops"] == 312.0
    assert fp32["seconds"] == pytest.approx(2 * bf16["seconds"])
    eight = account.report(cfg, batch_size=4, steps=10, world_size=8, activation_checkpointing=True)["time"]
    assert eight["seconds"] == pytest.approx(bf16["seconds"] * 4 / 3) and eight["tokens"] == 8 * bf16["tokens"]


def test_cli_account_fsdp_table(run_cli):
    code, out, _ = run_cli("account", "gpt2-xl", "--parallel", "fsdp", "--world-size", "8", "--memory", "24GB",
                           "--activation-checkpointing", "--batch-size", "1")
    text = " ".join(out.split())
    assert code == 0, out
    assert "FSDP on 8 processes" in text and "gather buffers" in text and "(sharded)" in text
    assert "block inputs kept by the checkpoints" in text and "largest batch per process" in text
    code, out, err = run_cli("account", "debug", "--world-size", "0")
    assert code == 2 and "--world-size" in out + err


@pytest.mark.parametrize(
    "ffn, tie, bias, norm",
    [
        ("swiglu", False, True, "rmsnorm"),
        ("gelu_tanh", True, True, "layernorm"),
        ("relu", False, False, "layernorm"),
        ("silu", True, True, "none"),
    ],
)
def test_parameter_counts_equal_the_built_model(ffn, tie, bias, norm):
    """`parameter_counts` counts what TransformerLM builds, biases included (imported GPT-2 models have them)."""
    from tinystories_cli.model import TransformerLM

    cfg = ModelConfig(vocab_size=97, context_length=16, d_model=32, num_layers=2, num_heads=4, ffn=ffn,
                      tie_embeddings=tie, bias=bias, norm=norm, pos_emb="learned")
    assert account.parameter_counts(cfg)["total"] == TransformerLM(cfg).num_parameters()
