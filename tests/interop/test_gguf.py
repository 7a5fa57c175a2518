"""`tslm export --format gguf`: the file read back with the `gguf` package's own reader, key by key and
tensor by tensor, in f32, f16 and q8_0; models llama.cpp's `llama` architecture cannot run are refused.
(That llama.cpp itself computes the same tokens from it: tests/benchmarks/check_gguf_llamacpp.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, quants

from tinystories_cli import runs
from tinystories_cli.tokenizer.files import decode_token_string

from train_fixtures import trained_runs, workspace_at

Q = GGMLQuantizationType


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return trained_runs(root, {"untied": ["--quiet"], "tied": ["--quiet", "--tie-embeddings"],
                               "gpt2ish": ["--quiet", "--norm", "layernorm", "--pos-emb", "learned", "--ffn", "gelu"],
                               "biased": ["--quiet", "--bias"]})


def _export(run_cli, root, run, out, *flags):
    with workspace_at(root):
        return run_cli("export", run, "--format", "gguf", "--out", str(out), *flags)


def _fields(reader: GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("gtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("run", ["untied", "tied"])
def test_gguf_round_trips_through_ggufs_reader(ws, run_cli, tmp_path, run, gtype):
    code, out, err = _export(run_cli, ws, run, tmp_path / "m.gguf", "--dtype", gtype)
    assert code == 0, out + err
    with workspace_at(ws):
        model, tok, cfg = runs.load_trained_model(runs.resolve_run(run), "cpu")
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    reader = GGUFReader(tmp_path / "m.gguf")
    fields = _fields(reader)

    eot = tok.eot_id
    want = {
        "general.architecture": "llama", "general.name": "m",
        "general.file_type": {"f32": 0, "f16": 1, "q8_0": 7}[gtype], "general.quantization_version": 2,
        "llama.context_length": cfg.context_length, "llama.embedding_length": cfg.d_model,
        "llama.feed_forward_length": cfg.d_ff, "llama.block_count": cfg.num_layers,
        "llama.attention.head_count": cfg.num_heads, "llama.attention.head_count_kv": cfg.num_heads,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(cfg.norm_eps, rel=1e-6),
        "llama.rope.freq_base": pytest.approx(cfg.rope_theta), "llama.rope.dimension_count": cfg.head_dim,
        "llama.vocab_size": cfg.vocab_size,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": eot, "tokenizer.ggml.eos_token_id": eot,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False,
    }
    tokens, types, merges = (fields.pop(k) for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                                     "tokenizer.ggml.merges"))
    assert fields == want  # every key, and no other
    # the tokenizer: each id's bytes, special tokens as CONTROL text, merges in rank order
    assert len(tokens) == len(types) == cfg.vocab_size == tok.vocab_size
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if i == eot:
            assert (t, ty) == ("<|endoftext|>", 3)
        else:
            assert (decode_token_string(t), ty) == (tok.vocab[i], 1)
    assert [tuple(decode_token_string(p) for p in m.split(" ")) for m in merges] == list(tok.merges)

    # every tensor: llama.cpp's name, our layout (q/k rows NOT permuted: llama.cpp's NORM rope pairs (2i, 2i+1))
    names = {"token_embd.weight": "token_embeddings.weight", "output_norm.weight": "ln_final.weight"}
    if run == "untied":
        names["output.weight"] = "lm_head.weight"
    for i in range(cfg.num_layers):
        names.update({f"blk.{i}.{theirs}": f"layers.{i}.{ours}" for ours, theirs in [
            ("attn.q_proj.weight", "attn_q.weight"), ("attn.k_proj.weight", "attn_k.weight"),
            ("attn.v_proj.weight", "attn_v.weight"), ("attn.output_proj.weight", "attn_output.weight"),
            ("ffn.w1.weight", "ffn_gate.weight"), ("ffn.w3.weight", "ffn_up.weight"),
            ("ffn.w2.weight", "ffn_down.weight"), ("ln1.weight", "attn_norm.weight"),
            ("ln2.weight", "ffn_norm.weight")]})
    assert {t.name for t in reader.tensors} == set(names)
    for t in reader.tensors:
        ours = sd[names[t.name]]
        assert list(t.shape) == list(reversed(ours.shape)), t.name  # GGUF lists dimensions innermost first
        if ours.ndim == 1 or gtype == "f32":
            assert t.tensor_type == Q.F32 and np.array_equal(np.asarray(t.data).reshape(ours.shape), ours), t.name
        elif gtype == "f16":
            assert t.tensor_type == Q.F16
            assert np.array_equal(np.asarray(t.data).reshape(ours.shape), ours.astype(np.float16)), t.name
        else:
            assert t.tensor_type == Q.Q8_0
            assert np.array_equal(np.asarray(t.data), quants.quantize(ours, Q.Q8_0)), t.name
            back = quants.dequantize(np.asarray(t.data), Q.Q8_0).reshape(ours.shape)
            blocks = np.abs(ours).reshape(*ours.shape[:-1], -1, 32).max(-1, keepdims=True) / 127
            err = np.abs(back - ours).reshape(blocks.shape[:-1] + (32,))
            # half a step of the block scale, plus the scale rounded to f16 (up to 127 steps x 2^-11)
            assert (err <= blocks * 0.57).all(), t.name


def test_gguf_refuses_what_llama_cpp_cannot_run_naming_the_setting(ws, run_cli, tmp_path):
    code, out, err = _export(run_cli, ws, "gpt2ish", tmp_path / "x.gguf")
    text = (out + err).strip()
    assert code == 2 and "norm=layernorm" in text and "pos_emb=learned" in text and "ffn=gelu" in text
    assert len(text.splitlines()) == 1 and not (tmp_path / "x.gguf").exists()
    code, out, err = _export(run_cli, ws, "biased", tmp_path / "x.gguf")
    assert code == 2 and "bias=True" in out + err and not (tmp_path / "x.gguf").exists()


def test_gguf_output_file_rules(ws, run_cli, tmp_path):
    out = tmp_path / "m.gguf"
    assert _export(run_cli, ws, "untied", out)[0] == 0
    code, o, e = _export(run_cli, ws, "untied", out)
    assert code == 2 and "already exists" in o + e
    assert _export(run_cli, ws, "untied", out, "--force", "--dtype", "f16")[0] == 0
    assert GGUFReader(out).fields["general.file_type"].contents() == 1
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    code, o, e = _export(run_cli, ws, "untied", other, "--force")
    assert code == 2 and "not a GGUF file" in o + e and other.read_text() == "mine"
    code, o, e = _export(run_cli, ws, "untied", tmp_path / "y.gguf", "--dtype", "q4_0")
    assert code == 2 and "q8_0" in o + e
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "notes.txt"]  # no temporaries left
