"""Files someone else made, and values nobody should pass: each is refused in one line (exit 2) before
anything is allocated or changed, never an internal error."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinystories_cli.checkpoint import read_checkpoint, save_checkpoint
from tinystories_cli.cli import main
from tinystories_cli.config import ModelConfig
from tinystories_cli.errors import UserError
from tinystories_cli.model import TransformerLM

from train_fixtures import TINY_MODEL, make_dataset, train_tiny, workspace_at


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run under runs/t (module-scoped: built once)."""
    root = tmp_path_factory.mktemp("hostile")
    make_dataset(root)
    with workspace_at(root):
        train_tiny("t")
    return root


@pytest.fixture
def at(trained, use_workspace):
    return use_workspace(trained)


@pytest.fixture
def crafted(at):
    """A path for a crafted checkpoint inside the run (so the run's tokenizer is found); removed after."""
    path = at / "runs" / "t" / "checkpoints" / "crafted.safetensors"
    yield path
    path.unlink(missing_ok=True)


def _craft(path, model_config: dict, tied: dict | None = None, cfg_for_weights: dict | None = None):
    """A weights-only checkpoint whose metadata claims `model_config`, with weights of another config."""
    model = TransformerLM(ModelConfig(**(cfg_for_weights or {**TINY_MODEL, "vocab_size": 300})))
    save_checkpoint(model, None, 1, path, metadata={"model_config": model_config})
    if tied is not None:  # rewrite the header's tie table in place of the real one
        data = path.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        tslm = json.loads(header["__metadata__"]["tslm"])
        tslm["tied"] = tied
        header["__metadata__"]["tslm"] = json.dumps(tslm)
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _one_line_error(capsys, args, match):
    t = time.perf_counter()
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert match in err and "Traceback" not in err and "internal error" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return time.perf_counter() - t


@pytest.mark.parametrize("override, match", [
    ({"num_layers": 10**9}, "num_layers: Input should be less than or equal to 1024"),
    ({"vocab_size": 2**40}, "vocab_size: Input should be less than or equal to 16777216"),
    ({"d_model": 8192, "num_layers": 1024, "num_heads": 64}, "its weights alone need"),
    ({"num_layers": 3}, "does not fit this model"),  # valid config, weights of another shape
])
def test_crafted_model_configs_are_refused_before_allocating(crafted, capsys, override, match):
    ckpt = crafted
    _craft(ckpt, {**TINY_MODEL, "vocab_size": 300, **override})
    seconds = _one_line_error(capsys, ["generate", "hi", "--run", str(ckpt), "--max-tokens", "2"], match)
    assert seconds < 10


def test_a_crafted_tie_cannot_replace_another_weight(crafted, capsys):
    ckpt = crafted
    _craft(ckpt, {**TINY_MODEL, "vocab_size": 300}, tied={"layers.0.ln1.weight": "ln_final.weight"})
    _one_line_error(capsys, ["generate", "hi", "--run", str(ckpt), "--max-tokens", "2"], "ties")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_checkpoint_headers_are_user_errors(tmp_path, data):
    """Mutate a real checkpoint's header (bytes, JSON values, lengths): reading it either works or raises
    UserError; never another exception."""
    model = TransformerLM(ModelConfig(**{**TINY_MODEL, "vocab_size": 64}))
    path = tmp_path / "c.safetensors"
    save_checkpoint(model, None, 3, path, metadata={"model_config": {**TINY_MODEL, "vocab_size": 64}})
    blob = bytearray(path.read_bytes())
    n = struct.unpack("<Q", blob[:8])[0]
    kind = data.draw(st.sampled_from(["flip", "length", "json", "truncate"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, 8 + n - 1))
            blob[i] = data.draw(st.integers(0, 255))
    elif kind == "length":
        blob[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    elif kind == "truncate":
        del blob[data.draw(st.integers(0, len(blob) - 1)):]
    else:
        header = json.loads(blob[8:8 + n])
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = data.draw(st.one_of(
            st.integers(-2**70, 2**70), st.text(max_size=5), st.lists(st.integers(-5, 2**40), max_size=4),
            st.none(), st.recursive(st.none(), lambda c: st.lists(c, max_size=2), max_leaves=3)))
        raw = json.dumps(header).encode()
        blob = bytearray(struct.pack("<Q", len(raw)) + raw + bytes(blob[8 + n:]))
    path.write_bytes(bytes(blob))
    try:
        read_checkpoint(path)
    except UserError:
        pass


def test_deeply_nested_json_is_a_clean_error(at, crafted, capsys):
    ckpt = crafted
    model = TransformerLM(ModelConfig(**{**TINY_MODEL, "vocab_size": 300}))
    save_checkpoint(model, None, 1, ckpt, metadata={"model_config": {**TINY_MODEL, "vocab_size": 300}})
    data = ckpt.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["tslm"] = "[" * 100_000 + "]" * 100_000
    raw = json.dumps(header).encode()
    ckpt.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    _one_line_error(capsys, ["eval", str(ckpt)], "corrupted")
    cfg = at / "runs" / "t" / "config.json"
    saved = cfg.read_text()
    try:
        cfg.write_text("[" * 100_000 + "]" * 100_000)
        _one_line_error(capsys, ["compare", "t"], "nested too deeply")
    finally:
        cfg.write_text(saved)


@pytest.mark.parametrize(
    "args, match",
    [
        (["account", "gpt2-small", "--tokens", "inf"], "--tokens must be a positive finite number"),
        (["account", "gpt2-small", "--tokens", "nan"], "--tokens must be a positive finite number"),
        (["account", "gpt2-small", "--peak-tflops", "inf"], "--peak-tflops must be a positive finite number"),
        (["train", "--preset", "debug", "--dataset", "tiny", "--lr", "inf"], "lr: Input should be a finite number"),
        (
            ["train", "--preset", "debug", "--dataset", "tiny", "--train-tokens", "nan"],
            "train_tokens: Input should be a finite",
        ),
        (["train", "--preset", "debug", "--dataset", "tiny", "--seed", str(2**70)], "seed: Input should be less than"),
        (
            ["train", "--preset", "debug", "--dataset", "tiny", "--d-model", "100000000"],
            "d_model: Input should be less",
        ),
        (["generate", "hi", "--run", "t", "--seed", str(2**70)], "--seed must be in [0, 2^63)"),
        (["generate", "hi", "--run", "t", "-n", "1000000000"], "--num-samples x prompts = 1000000000 rows need"),
        (["eval", "t", "--ctx", "0"], "--ctx must be positive"),
    ],
)
def test_bad_values_are_one_line(at, capsys, args, match):
    _one_line_error(capsys, args, match)


def test_non_utf8_prompt_on_stdin(at):
    proc = subprocess.run([sys.executable, "-m", "tinystories_cli", "generate", "-", "--run",
                           str(at / "runs" / "t"), "--max-tokens", "2", "--device", "cpu"],
                          input=b"\xff\xfe bad", capture_output=True, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "not UTF-8" in err and "Traceback" not in err, err


@pytest.mark.parametrize("change, match", [
    ({"source_bytes": -5}, "source_bytes: Input should be greater than 0"),
    ({"num_tokens": "7"}, "num_tokens: Input should be a valid integer"),
    ({"max_id": True}, "max_id: Input should be a valid integer"),
    ({"dtype": "float32"}, "dtype: Input should be 'uint16' or 'uint32'"),
    ({"vocab_size": 2**40}, "vocab_size: Input should be less than or equal to"),
])
def test_crafted_token_sidecars_are_refused(at, capsys, change, match):
    valid = at / "data" / "tiny" / "valid.npy"
    side = valid.with_suffix(".json")
    saved = side.read_text()
    try:
        side.write_text(json.dumps({**json.loads(saved), **change}))
        _one_line_error(capsys, ["eval", "t", "--data", str(valid)], match)
    finally:
        side.write_text(saved)


def test_an_npz_renamed_npy_is_one_line(at, tmp_path, capsys):
    import numpy as np

    valid = at / "data" / "tiny" / "valid.npy"
    fake = tmp_path / "valid.npy"
    with open(fake, "wb") as f:
        np.savez(f, ids=np.load(valid))
    fake.with_suffix(".json").write_text(valid.with_suffix(".json").read_text())
    _one_line_error(capsys, ["eval", "t", "--data", str(fake)], "not a single .npy array")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(
        ["format_version", "dtype", "num_tokens", "max_id", "vocab_size", "fingerprint", "source_bytes"]
    ),
    value=st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(),
        st.text(max_size=8),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    ),
)
def test_fuzzed_token_sidecars_load_or_raise_user_errors(at, key, value):
    from tinystories_cli.tokens import load_token_file

    valid = at / "data" / "tiny" / "valid.npy"
    side = valid.with_suffix(".json")
    saved = side.read_text()
    try:
        side.write_text(json.dumps({**json.loads(saved), key: value}))
        try:
            load_token_file(valid)
        except UserError:
            pass
    finally:
        side.write_text(saved)


def test_a_tokenizer_directory_with_mixed_files_is_refused(at, capsys):
    tok = at / "runs" / "t" / "tokenizer"
    merges = tok / "merges.txt"
    saved = merges.read_bytes()
    try:
        merges.write_bytes(b"\n".join(saved.splitlines()[:-1]) + b"\n")  # one merge short: another tokenizer's file
        _one_line_error(capsys, ["generate", "hi", "--run", "t", "--max-tokens", "2"], "is inconsistent: merges.txt")
    finally:
        merges.write_bytes(saved)


def test_a_vocab_with_an_id_past_the_cap_is_refused(tmp_path):
    from tinystories_cli.tokenizer.files import MAX_ID, read_vocab_merges

    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": MAX_ID}))
    (tmp_path / "merges.txt").write_text("")
    with pytest.raises(UserError, match="exceeds the largest id"):
        read_vocab_merges(tmp_path / "vocab.json", tmp_path / "merges.txt")
